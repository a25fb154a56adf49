"""Server side: secret-share a Keras model across the cluster and serve private queries."""
import gc
import json
import signal
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from typing import Callable, List, NamedTuple, Optional

import numpy as np
from tensorflow.python.ops import gen_data_flow_ops as queue_ops
from tensorflow.python.ops import gen_lookup_ops

from ._tf import tf, tfe
from .config import ClusterConfig
from .data import IMAGE_SHAPE
from .dealing import HANDLES, MISMATCH, NUMBER, Lots, Stock, pack_of
from .network import SecretNetwork
from .protocol import LOCAL_DEVICE, VALUE_LIMIT, links_ready
from .queues import (BATCH_BUCKETS, MAX_BATCH_SIZE, NOBODY, PIXELS, REFUSED, REQUEST_DTYPES, SERVING_SILENCE,
                     PublishedCosts, ServingLease, bucket_of, request_queue, row_keys, server_tables,
                     someone_serves, take_waiting)
from .traffic import crossings, party
from .value_range import fitting
from .waiting import WATCH_INTERVAL, BackgroundCall, bounded, wait_for
from .watch import ServerUnreachableError, ServerWatch, first_dead_server

# How long serving waits for a server whose host went silent to come back, counted from when it was
# first found silent: short enough that the serving side still stops, naming it, within 15 s of the
# outage when it does not come back.
OUTAGE_GRACE_SECONDS = 10.0
QUICK_CALL_SECONDS = 30.0  # a call that returns at once unless a server is silent, or the machine is busy
RESTART_ADVICE = ("Serving cannot go on. If that server's process died, the servers' state, the "
                  "model's shares included, is lost: start the servers and share the model again "
                  "(notebook 02 from the top, or restart the three servers and the serve command). If "
                  "its machine only dropped off the network, serve again once it is back.")


# What _Session._next returns for a client's goodbye, instead of what happened to a query.
CLIENT_DONE = object()
PLAINTEXT_RUNS = 9  # the plaintext model's published time is the median of this many runs
KEYS = tf.TensorSpec([None], tf.int64)  # queries' keys, or their batch sizes


class Served(NamedTuple):
    """How a run of :meth:`SecureModel.serve` ended."""
    queries: int  # answered or refused
    interrupted: bool  # by Ctrl-C, or Jupyter's "Interrupt the kernel"


class _Interrupted(Exception):
    """The serving was interrupted: it ends once the request in hand is answered and reported."""


@contextmanager
def _interrupt_ends_serving(interrupted: threading.Event):
    """While serving in the main thread, Ctrl-C (or "Interrupt the kernel") sets ``interrupted``
    instead of raising wherever the thread happens to be: serving then ends between two steps,
    so that no answered query goes unreported and the report is the same on every run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda number, frame: interrupted.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ServingConflictError(RuntimeError):
    """Another serving side already serves this cluster."""


class SecureModel:
    """A Keras model whose weights exist only as secret shares on the servers."""

    def __init__(self, protocol, network: SecretNetwork, value_bound: float, divisor: int = 1, plaintext=None):
        self.protocol = protocol
        self.network = network
        self.value_bound = value_bound  # proven: no value inside the network is larger, for any image
        self.divisor = divisor  # the servers compute every value divided by this (value_range.fitting)
        self.plaintext = plaintext  # the Keras model, timed for the costs published to clients
        self.servers = ServerWatch(ClusterConfig(dict(tfe.get_config().hostmap)), RESTART_ADVICE)
        self._answer_functions = {}
        self._lots = {}  # bucket -> its material dealt ahead, in queues on the servers (dealing.py)
        self._making_lots = threading.Lock()  # one bucket's Lots made once, whichever thread asks first
        # One lot of each larger size waits (dealt as the query before it is answered), not two: a lot of 64
        # images is 66 MiB, and a second gained nothing measurable on two cores (docs/performance.md).
        self.stock = Stock(lambda bucket, number: self.lots(bucket).deal(number),
                           lambda bucket: self.lots(bucket).renew(), pack_of, lots_per_bucket=1)
        self.tables = self._quick(server_tables, protocol)
        self.lease = self._quick(ServingLease, protocol.server_0.device_name)
        self.published = self._quick(PublishedCosts, protocol.server_0.device_name)
        self.costs = {}  # batch size -> what was published about it

    def _quick(self, function, *args):
        return bounded(function, *args, timeout=QUICK_CALL_SECONDS, watches=[self.servers.check],
                       message=f"The servers did not answer within {QUICK_CALL_SECONDS:.0f} s.")

    def weight_shares(self, layer: int = 0):
        """What server0 and server1 hold of one layer's kernel, as fixed-point integers.

        For teaching only: fetching both shares to one place is exactly what the
        protocol never does with a client's data.
        """
        return self.network.kernel_shares(layer)

    def _answer_function(self, bucket: int):
        """The traced computation that answers queries of this bucket together, made once per bucket.

        Given queries (keys and batch sizes, at most ``bucket`` images in all), it answers them. Asked
        to take the next request instead, it waits for one on the servers and, if its batch is of this
        bucket and its shares are there, answers it there and then: a client asking again saves a
        round trip through this process and the launch of a computation. Either way it returns the
        queries it looked at, and whether it answered them.
        """
        if bucket not in self._answer_functions:
            # One trace per bucket, however many queries it is given (their number is not part of the trace).
            self._answer_functions[bucket] = tf.function(
                lambda *args: self._answer_on_servers(bucket, *args),
                input_signature=[tf.TensorSpec([], tf.resource), tf.TensorSpec([], tf.bool), KEYS, KEYS, NUMBER,
                                 HANDLES])
        return self._answer_functions[bucket]

    def lots(self, bucket: int) -> Lots:
        """This bucket's material dealt ahead (dealing.py): the network traced on zero images, its dealing kept."""
        with self._making_lots:
            if bucket not in self._lots:
                self._lots[bucket] = Lots(lambda images: self.network(self._zero_images(images)), bucket, party,
                                          pack_of(bucket))
        return self._lots[bucket]

    def lot_to_take(self, bucket: int):
        """What the next query of this bucket takes (dealing.py): its lot's number, and the servers' queues."""
        return tf.constant(self.stock.next(bucket), tf.int64), self.lots(bucket).handles()

    def _zero_images(self, bucket: int):
        shares = []
        for server in (self.protocol.server_0, self.protocol.server_1):
            with tf.device(server.device_name):
                shares.append(self.protocol.tensor_factory.tensor(tf.zeros((bucket,) + IMAGE_SHAPE, tf.int64)))
        return tfe.protocol.pond.PondPrivateTensor(self.protocol, *shares, True)

    def _answer_on_servers(self, bucket, requests, take_next, given_keys, given_batches, lot, queues):
        protocol, tables = self.protocol, self.tables
        with tf.device(protocol.server_0.device_name):
            keys, batches = tf.cond(
                take_next, lambda: tuple(value[None] for value in queue_ops.queue_dequeue_v2(requests, list(REQUEST_DTYPES))),
                lambda: (tf.identity(given_keys), tf.identity(given_batches)))
            keys.set_shape([None])
            batches.set_shape([None])
            total = tf.reduce_sum(batches)
            smaller = max([0] + [size for size in BATCH_BUCKETS if size < bucket])
            # Taken here, a request is answered here only if it is of this bucket, both its shares are in,
            # and no other request waits behind it; given, it was checked already (_Session). Otherwise it
            # goes back to the serving process, which answers it with those waiting (a class's queries
            # together: one batch of 32 costs about what 4 single images cost alone).
            with tf.control_dependencies([keys, batches]):  # counted once this request is out of the queue
                alone = tf.equal(queue_ops.queue_size_v2(requests), 0)
            fits = tf.logical_or(tf.logical_not(take_next),
                                 tf.logical_and(alone, tf.logical_and(total > smaller, total <= bucket)))
        complete = self._complete(tables, keys, batches)
        with tf.device(protocol.server_0.device_name):
            answer = tf.logical_and(fits, tf.reduce_any(complete))
            answered = tf.cond(answer, lambda: self._compute(bucket, tables, keys, batches, complete, lot, queues),
                               lambda: tf.constant(False))
        self._publish(bucket, tf.compat.v1.get_default_graph())
        return _here(protocol.server_0.device_name, keys, batches, answered)

    @staticmethod
    def _complete(tables, keys, batches):
        """Which of the queries have both their shares in, as announced (decided on server0)."""
        staged = []
        for table in tables:
            with tf.device(table.device):
                staged.append(table.present(keys))
        with tf.device(tables[0].device):
            return tf.logical_and(tf.logical_and(tf.equal(staged[0], batches), tf.equal(staged[1], batches)),
                                  tf.logical_and(batches >= 1, batches <= MAX_BATCH_SIZE))

    def sort_out(self, keys: List[int], batches: List[int]) -> List[bool]:
        """Which of these queries have both shares in, as announced; what the servers hold of the others is
        removed. A quick look, in one call, no secure computation."""
        if not keys:
            return []
        return self._sort_out(tf.constant(keys, tf.int64), tf.constant(batches, tf.int64)).numpy().tolist()

    @tf.function(input_signature=[KEYS, KEYS])
    def _sort_out(self, keys, batches):
        complete = self._complete(self.tables, keys, batches)
        forgotten = []
        for table in self.tables:
            with tf.device(table.device):
                forgotten.append(table.forget(tf.boolean_mask(keys, tf.logical_not(complete))))
        with tf.device(self.tables[0].device), tf.control_dependencies(forgotten):
            return tf.identity(complete)

    def refuse(self, keys: List[int]) -> None:
        """Remove what both servers hold of these queries, and tell their doors that they were refused."""
        self._refuse_now(tf.constant(keys, tf.int64))

    @tf.function(input_signature=[KEYS])
    def _refuse_now(self, keys):
        said = []
        for table in self.tables:
            with tf.device(table.device):
                with tf.control_dependencies([table.forget(keys)]):
                    said.append(table.say(keys, tf.fill(tf.shape(keys), tf.constant(REFUSED, tf.int64))))
        with tf.device(self.tables[0].device), tf.control_dependencies(said):
            return tf.constant(True)

    @tf.function
    def uncollected(self):
        """How many answers and notices the doors have not taken yet, on both servers."""
        left = []
        for table in self.tables:
            with tf.device(table.device):
                left.append(tf.cast(gen_lookup_ops.lookup_table_size_v2(table.answers), tf.int64)
                            + tf.cast(queue_ops.queue_size_v2(table.answered), tf.int64))
        with tf.device(self.tables[0].device):
            return tf.add_n(left)

    def _publish(self, bucket: int, graph) -> None:
        """Publish for clients what a batch of ``bucket`` images costs: the plaintext model's time here, and
        the bytes the servers send each other (counted on ``graph``, the computation being built).

        Called while the bucket's computation is first built, so before it first answers: a client that
        has been answered can always read the costs of its batch size.
        """
        with tf.init_scope():  # runs now, on this process and server0, not as part of the computation
            # The queries' keys and sizes are the only tensors of unknown size: at most one per image.
            lots = self.lots(bucket)  # dealt before the query, a pack of lots at once: its share of the bytes counts
            dealing = lots.dealing.get_concrete_function().graph
            self.costs[bucket] = {"plaintext_seconds": self._plaintext_seconds(bucket),
                                  "servers_bytes": sum(crossings(graph, largest=bucket).values())
                                  + sum(crossings(dealing).values()) // lots.pack}
            self.published.write(json.dumps(self.costs))

    def _plaintext_seconds(self, bucket: int) -> Optional[float]:
        """The median time of the plaintext Keras model on a batch of ``bucket`` images, on this machine."""
        if self.plaintext is None:
            return None
        call, images = tf.function(self.plaintext), tf.zeros((bucket,) + IMAGE_SHAPE)
        call(images)  # built once for this size, as the private computation is
        seconds = []
        for _ in range(PLAINTEXT_RUNS):
            start = time.perf_counter()
            call(images).numpy()
            seconds.append(time.perf_counter() - start)
        return float(np.median(seconds))

    def _compute(self, bucket, tables, keys, batches, complete, lot, queues):
        """Answer the complete queries among ``keys`` in one secure computation; refuse the others.

        Each server reads its rows of the complete queries' shares from its table, removes everything of
        all the queries, pads the rows to ``bucket`` images (zero rows are valid shares of zero images,
        dropped before answering), and after the network puts its rows of each answer in its table.
        """
        protocol = self.protocol
        factory = protocol.tensor_factory
        with tf.device(tables[0].device):
            used = tf.where(complete, batches, tf.zeros_like(batches))
            rows = row_keys(keys, used)
            images = tf.reduce_sum(used)
        shares = []
        for table in tables:
            with tf.device(table.device):
                found = gen_lookup_ops.lookup_table_find_v2(table.shares, rows, tf.zeros([PIXELS], tf.int64))
                found.set_shape([None, PIXELS])
                with tf.control_dependencies([found]):
                    forgotten = table.forget(keys)
                with tf.control_dependencies([forgotten]):
                    padded = tf.pad(found, [[0, bucket - images], [0, 0]])
                shares.append(factory.tensor(tf.reshape(padded, (bucket,) + IMAGE_SHAPE)))
        x = tfe.protocol.pond.PondPrivateTensor(protocol, shares[0], shares[1], True)
        with self.lots(bucket).taking(lot, queues):  # material dealt before this query, taken from the servers' queues
            y = self.network(x).unwrapped
        said = []
        for table, share in zip(tables, y):
            with tf.device(table.device):
                # Multiplying each share by a public whole number is exact and needs no message.
                stored = gen_lookup_ops.lookup_table_insert_v2(table.answers, rows, share.value[:images] * self.divisor)
                with tf.control_dependencies([stored]):  # the door reads the rows once it is told
                    said.append(table.say(keys, tf.where(complete, batches, tf.fill(tf.shape(keys), tf.constant(REFUSED, tf.int64)))))
        with tf.device(tables[0].device), tf.control_dependencies(said):
            return tf.constant(True)

    def serve(self, num_requests: Optional[int] = None, timeout: Optional[float] = None,
              report: Optional[Callable[[str], None]] = print, until_done: bool = False) -> Served:
        """Answer private queries: ``num_requests`` of them, or (None) until interrupted.

        An interrupt (Ctrl-C, or Jupyter's "Interrupt the kernel") ends serving once the request in
        hand is answered, and returns; so does a client's goodbye (``PrivateClient.done()``) with
        ``until_done=True``, for a program that serves one client. A class's or an operator's serving
        leaves it False: one client's goodbye must not end the others' service. ``timeout`` limits
        the wait for each request (None: however long it takes). Refuses at once if another serving
        side serves this cluster. Unless interrupted, returns once every client has collected its
        results, so the servers can be stopped right after without cutting off a client.
        """
        with _Session(self, report or (lambda line: None)) as session:
            return session.run(num_requests, timeout, until_done)

    def __enter__(self) -> "SecureModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete the weight shares from the servers; the model cannot serve afterwards.

        Call it before stopping the servers (or use the model in a ``with`` block): otherwise
        Python deletes the shares only when it exits, after the servers are gone, and
        complains on the way out.
        """
        self.network = None
        self._answer_functions.clear()
        try:  # the lots dealt ahead take memory on the servers: freed now, while they are there
            bounded(self._empty_lots, timeout=QUICK_CALL_SECONDS, message="", watches=[self.servers.check])
        except (tf.errors.OpError, TimeoutError, ServerUnreachableError):
            pass  # the servers are gone, or silent: nothing to free, or it goes when they stop
        self._lots.clear()
        gc.collect()

    def _empty_lots(self) -> None:
        self.stock.close()
        for lots in self._lots.values():
            lots.close()


class _Session:
    """One run of :meth:`SecureModel.serve`: its lease, its request queue, its requests set aside."""

    def __init__(self, model: SecureModel, report: Callable[[str], None]):
        self.model, self.report = model, report
        self.id = uuid.uuid4().hex
        self.dropped = 0  # requests with no shares behind them
        self.backlog = deque()  # requests (key, batch) taken from the queue together, not answered yet
        self._incoming: Optional[BackgroundCall] = None
        # The bucket of a computation whose outcome is not read yet (the request awaited, or a group answered):
        # if the session ends then, it may have taken its lot on some servers only.
        self._unread: Optional[int] = None
        self.bucket = 1  # of the queries answered last: a request of that size is answered on arrival
        self._stopped = threading.Event()
        self._interrupted = threading.Event()  # set by Ctrl-C while serving (_interrupt_ends_serving)
        self._taken_over = None
        self.answered = set()

    def __enter__(self):
        model = self.model
        owner, age = model._quick(model.lease.read)
        stale_after = SERVING_SILENCE
        if someone_serves(owner, age):
            # A live serving side renews its lease twice a second; one killed a moment ago does not.
            time.sleep(2 * WATCH_INTERVAL)
            later_owner, later_age = model._quick(model.lease.read)
            if later_owner != owner or later_age < age:
                raise self._conflict(later_age)
            stale_after = 2 * WATCH_INTERVAL
        owner, age = model._quick(model.lease.claim, self.id, stale_after)
        if owner not in (NOBODY, self.id) and age <= stale_after:
            raise self._conflict(age)
        self.requests = model._quick(request_queue, model.protocol, self.id)
        self._heartbeat = threading.Thread(target=self._beat, name="serving heartbeat", daemon=True)
        self._heartbeat.start()
        try:
            # Two sides that claimed at the same moment: the one whose claim landed last keeps
            # the lease, and the other learns it at its first beat, before taking any request.
            time.sleep(WATCH_INTERVAL)
            self.check_lease()
        except BaseException:
            self.__exit__()
            raise
        return self

    @staticmethod
    def _conflict(age: float) -> ServingConflictError:
        return ServingConflictError(
            f"Another serving side already serves this cluster (it renewed its lease {age:.1f} s ago), "
            "and two would compete for the same requests. Stop it first (interrupt its serve cell or "
            "end its serve command), or use it as it is.")

    def _beat(self) -> None:
        # A thread of its own, so the lease is renewed while a long batch is computed.
        while not self._stopped.wait(WATCH_INTERVAL):
            try:
                owner = self.model.lease.renew(self.id)
            except tf.errors.OpError:
                return  # the server is gone: the main thread's watch says which
            if owner != self.id:
                self._taken_over = owner
                return

    def check_lease(self) -> None:
        """The watch of every wait while serving: an interrupt, a server gone, or the lease lost ends it."""
        self._check_interrupt()
        self.model.servers.check()
        if self._taken_over is not None:
            raise ServingConflictError("Another serving side took over this cluster; this one stops. "
                                       "Keep one serving side per cluster.")

    def __exit__(self, *exc):
        self._stopped.set()
        for step in (self.requests.close, lambda: self.model.lease.release(self.id)):
            try:  # clients waiting on this side learn at once that it stopped
                bounded(step, timeout=2.0, message="")
            except (tf.errors.OpError, TimeoutError, AttributeError):
                pass  # a server is gone: clients will notice that too
        self._heartbeat.join(2.0)
        if self._unread is not None:  # left running, or its outcome never read: did it take its lot?
            self.model.stock.unsure(self._unread)

    def run(self, num_requests: Optional[int], timeout: Optional[float], until_done: bool) -> Served:
        of_total = "" if num_requests is None else f"/{num_requests}"
        how_long = "" if timeout is None else f", waiting up to {timeout:.0f} s for each"
        how_many = "until interrupted (■ in Jupyter, Ctrl-C in a terminal)" if num_requests is None \
            else f"{_queries(num_requests)}"
        self.report(f"Serving {how_many}{how_long}. Clients may ask now (notebook 03).")
        number = 0
        with _interrupt_ends_serving(self._interrupted):
            try:
                while num_requests is None or number < num_requests:
                    try:
                        outcomes = self._next(timeout)
                    except ServerUnreachableError as error:
                        self._ride_out(error)
                        continue
                    if outcomes is CLIENT_DONE:
                        if until_done:
                            self.report(f"The client said it is done: stopped serving after {_queries(number)}.")
                            break
                        continue
                    for outcome in outcomes:
                        number += 1
                        self.report(f"Request {number}{of_total}: {outcome}")
                    self._check_interrupt()
            except _Interrupted:
                self.report(f"Stopped serving after {_queries(number)}: interrupted.")
                return Served(number, interrupted=True)
            if self.dropped:
                self.report(f"Dropped {self.dropped} requests that had no shares behind them: this series' "
                            "clients never send those.")
            try:
                self._wait_until_collected(timeout)
            except _Interrupted:
                pass  # asked to stop now: the clients still waiting are told that serving stopped
        return Served(number, interrupted=self._interrupted.is_set())

    def _check_interrupt(self) -> None:
        if self._interrupted.is_set():
            raise _Interrupted

    def _ride_out(self, error: ServerUnreachableError) -> None:
        """Go on serving if a server that went silent answers again within the grace; else raise ``error``.

        A query in flight during the outage may be lost (its client was told); the
        servers' state, the model's shares included, is intact once the host is back.
        """
        if not error.silent:
            raise error
        # The grace counts from when the host was first found silent, not from when that was
        # named: naming waits SILENT_AFTER s, and the outage's whole budget is this grace.
        deadline = error.since + OUTAGE_GRACE_SECONDS
        self.report(f"{error.name} is not answering (its host went silent); waiting up to "
                    f"{max(0.0, deadline - time.monotonic()):.0f} s more for it to come back...")
        while first_dead_server(self.model.servers.config) is not None:
            if time.monotonic() > deadline:
                raise error
            self._check_interrupt()
            time.sleep(0.2)
        self.model.stock.all_unsure()  # a computation cut by the outage may have taken its lot on some servers only
        self._call(links_ready, self.model.protocol)  # a link the outage broke fails once, then reconnects
        self.report(f"{error.name} answers again: serving goes on.")

    def _next(self, timeout: Optional[float]):
        """Take requests until some are answered or refused; say what happened to each (or CLIENT_DONE).

        A request of no images is a client's goodbye: server0's door puts one in when its client says it
        is done. A request whose two shares are not both in is dropped at once and not counted: a door
        puts a query's request in only once both are, so it comes from something else that reached the
        request queue, and waiting for its shares would hold up the complete requests queued behind it.
        Requests that wait together are answered together, in as few computations as their sizes allow.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.backlog:
                outcomes = self._take_backlog()
                if outcomes:
                    return outcomes
                continue
            if self._incoming is None:
                # A lot of material waits for the next query (dealing.py), and another is dealt while it comes.
                self._call(self.model.stock.top_up, self.bucket)
                self._unread = self.bucket
                self._incoming = self._listen()
                self.model.stock.deal_ahead(self.bucket)
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                keys, batches, answered = wait_for(self._incoming, wait, "", watches=[self.check_lease])
            except TimeoutError:
                raise TimeoutError(f"No private query arrived within {timeout:.0f} s. Run the client "
                                   "(notebook 03) while this one serves.") from None
            except tf.errors.OpError as error:
                self.model.stock.unsure(self._unread)
                self._unread = None
                if MISMATCH in error.message:  # the size gets new queues before its next query (dealing.Stock)
                    self.report("A query failed: the servers' material was out of step after an earlier "
                                "computation was cut short. Its client gets no answer and may ask again.")
                    continue
                raise self.model.servers.explain(error) from None
            finally:
                if self._incoming is not None and self._incoming.done():
                    self._incoming = None
            bucket, self._unread = self._unread, None
            if answered:
                self.model.stock.used(bucket)
                return self._answered(keys, batches)
            # Not answered on arrival: take it here, with every request queued behind it, in one call.
            self.backlog.extend(list(zip(keys, batches)) + self._call(take_waiting, self.requests))

    def _listen(self) -> BackgroundCall:
        """Wait for the next request, on the servers, which answer it at once if it is of the size answered
        last (as a client asking again mostly is); otherwise it comes here, to be taken below."""
        function = self.model._answer_function(self.bucket)
        lot, queues = self.model.lot_to_take(self.bucket)

        def listen():
            keys, batches, answered = function(self.requests.handle, tf.constant(True), *NO_QUERIES, lot, queues)
            return keys.numpy().tolist(), batches.numpy().tolist(), bool(answered)
        return BackgroundCall(listen, name="waiting for a request")

    def _take_backlog(self):
        """Answer the requests set aside, up to a goodbye: those of a wrong size are refused, those
        without both shares dropped, the others answered together, as many at a time as fit in a batch."""
        taken = []
        while self.backlog and self.backlog[0][1] != 0:
            taken.append(self.backlog.popleft())
        outcomes = [self._refuse([key], f"it announced a batch of {batch} images (1 to {MAX_BATCH_SIZE} are served)")
                    for key, batch in taken if not 1 <= batch <= MAX_BATCH_SIZE]
        taken = [(key, batch) for key, batch in taken if 1 <= batch <= MAX_BATCH_SIZE]
        complete = self._call(self.model.sort_out, [key for key, _ in taken], [batch for _, batch in taken])
        self.dropped += complete.count(False)
        group = []
        for key, batch in (request for request, whole in zip(taken, complete) if whole):
            if sum(size for _, size in group) + batch > MAX_BATCH_SIZE:
                outcomes += self._answer(group)
                group = []
            group.append((key, batch))
        if group:
            outcomes += self._answer(group)
        if not outcomes and self.backlog:  # a goodbye, with nothing before it to answer
            self.backlog.popleft()
            return CLIENT_DONE
        return outcomes

    def _answer(self, group):
        """Answer queries ``group`` [(key, batch)] in one computation; what happened to each."""
        keys, batches = [key for key, _ in group], [batch for _, batch in group]
        bucket = bucket_of(sum(batches))
        function = self.model._answer_function(bucket)
        self._call(self.model.stock.top_up, bucket)  # the query takes a lot dealt before (dealing.py)
        self._unread = bucket
        try:
            _, _, answered = self._call(function, self.requests.handle, tf.constant(False), tf.constant(keys, tf.int64),
                                        tf.constant(batches, tf.int64), *self.model.lot_to_take(bucket))
        except tf.errors.OpError as error:  # this computation's failure; the service goes on
            self.model.stock.unsure(bucket)
            self._unread = None
            return [self._refuse(keys, f"failed ({error.message.splitlines()[0][:200]})")]
        self._unread = None
        if bool(answered):
            self.model.stock.used(bucket)
        return self._answered(keys, batches)

    def _answered(self, keys, batches):
        self.answered.update(keys)
        self.bucket = bucket_of(sum(batches))
        others = len(keys) - 1
        together = f" (with {others} other {'query' if others == 1 else 'queries'})" if others else ""
        return [f"answered a private batch of {batch} {'image' if batch == 1 else 'images'}{together}"
                for batch in batches]

    def _refuse(self, keys, why: str) -> str:
        """Remove what the servers hold of these queries, and tell their clients that they were refused."""
        self._call(self.model.refuse, keys)
        return f"refused, {why}"

    def _call(self, function, *args):
        try:
            return wait_for(BackgroundCall(function, *args), None, "", watches=[self.check_lease])
        except tf.errors.OpError as error:
            raise self.model.servers.explain(error) from None

    def _wait_until_collected(self, timeout: Optional[float]) -> None:
        deadline = time.monotonic() + (timeout or 120.0)
        while self._call(self.model.uncollected):
            if time.monotonic() > deadline:
                self.report("Some results were not collected in time: their clients are gone.")
                return
            self._check_interrupt()
            time.sleep(0.05)


NO_QUERIES = (tf.zeros([0], tf.int64), tf.zeros([0], tf.int64))


def _here(server0: str, keys, batches, answered):
    """A computation's outcome, made on server0, handed to this process within the computation and in one
    message: read after it returns, each value would be fetched from server0 in a call of its own, three
    round trips of about 1.5 ms each before the serving side listens for the next query."""
    with tf.device(server0):
        packed = tf.concat([keys, batches, tf.cast(answered, tf.int64)[None]], 0)
    with tf.device(LOCAL_DEVICE):
        packed = tf.identity(packed)
        queries = (tf.size(packed) - 1) // 2
        return packed[:queries], packed[queries:2 * queries], tf.cast(packed[-1], tf.bool)


def _queries(number: int) -> str:
    return f"{number} query" if number == 1 else f"{number} queries"


def share_model(keras_model, protocol) -> SecureModel:
    """Secret-share ``keras_model``'s weights across the servers: the model owner's step.

    First proves a bound on every value the model can compute for inputs with pixels in
    [0, 1]; computes at a smaller scale a model slightly too large for the fixed-point
    encoding, and refuses (ValueRangeError) one that is far too large.
    """
    return SecureModel(protocol, *secret_network(keras_model, protocol), plaintext=keras_model)


def secret_network(keras_model, protocol):
    """``keras_model``'s weights secret-shared for the servers' computation (network.py).

    Returns it with the bound proven on its values and the divisor of its scale (value_range.fitting).
    """
    limit = float(VALUE_LIMIT)
    computed, divisor, peak = fitting(keras_model, limit)
    return SecretNetwork(protocol, computed, limit), peak, divisor
