"""Server side: secret-share a Keras model across the cluster and serve private queries."""
import gc
import json
import re
import signal
import threading
import time
import uuid
from collections import OrderedDict, deque
from contextlib import contextmanager
from typing import Callable, NamedTuple, Optional

import numpy as np

from tensorflow.python.ops import gen_data_flow_ops as queue_ops

from ._tf import tf, tfe
from .config import ClusterConfig
from .data import IMAGE_SHAPE
from .network import SecretNetwork
from .queues import (BATCH_BUCKETS, MAX_BATCH_SIZE, NOBODY, REQUEST_DTYPES, SERVING_SILENCE, ClientQueues,
                     PublishedCosts, ServingLease, bucket_of, request_queue, shares_waiting, someone_serves,
                     take_request, take_waiting)
from .traffic import crossings
from .value_range import fitting
from .waiting import WATCH_INTERVAL, BackgroundCall, bounded, wait_for
from .watch import ServerUnreachableError, ServerWatch, first_dead_server

# How long serving waits for a server whose host went silent to come back: short enough that
# the serving side still stops, naming it, within 15 s of the outage when it does not.
OUTAGE_GRACE_SECONDS = 10.0
QUICK_CALL_SECONDS = 10.0  # a call that returns at once unless a server is silent
REMEMBERED_CLIENTS = 1000
CLIENT_ID = re.compile(r"[0-9a-f]{32}")
RESTART_ADVICE = ("Serving cannot go on. If that server's process died, the servers' state, the "
                  "model's shares included, is lost: start the servers and share the model again "
                  "(notebook 02 from the top, or restart the three servers and the serve command). If "
                  "its machine only dropped off the network, serve again once it is back.")


# What _Session._next returns for a client's goodbye, instead of what happened to a query.
CLIENT_DONE = object()
PLAINTEXT_RUNS = 9  # the plaintext model's published time is the median of this many runs


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
        self._clients = OrderedDict()
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
        """The traced computation that answers a batch of this bucket, made once per bucket.

        Called with the request already taken, it answers it (False if the shares have not
        all arrived). Called to take the next request, it waits for one on the servers and,
        if it comes from the client given with a batch of this bucket and its shares are
        there, answers it there and then: a client asking again saves a round trip through
        this process and the launch of a computation. Either way it returns the request.
        """
        if bucket not in self._answer_functions:
            self._answer_functions[bucket] = tf.function(lambda *args: self._answer_on_servers(bucket, *args))
        return self._answer_functions[bucket]

    def _answer_on_servers(self, bucket, requests, take_next, given_client, given_batch, expected_client,
                           input0, input1, output0, output1):
        protocol = self.protocol
        with tf.device(protocol.server_0.device_name):
            client_id, batch = tf.cond(
                take_next, lambda: tuple(queue_ops.queue_dequeue_v2(requests, list(REQUEST_DTYPES))),
                lambda: (tf.identity(given_client), tf.identity(given_batch)))
            client_id.set_shape([])
            batch.set_shape([])
            smaller = max([0] + [size for size in BATCH_BUCKETS if size < bucket])
            ready = [tf.equal(client_id, expected_client), batch > smaller, batch <= bucket]
        for input_queue, server in ((input0, protocol.server_0), (input1, protocol.server_1)):
            # Looked at once the request is there (its client puts the shares in first), not when
            # this computation starts waiting: then they are not there yet.
            with tf.device(server.device_name), tf.control_dependencies([client_id, batch]):
                ready.append(queue_ops.queue_size_v2(input_queue) > 0)
        # Decided on server0, so that the computation starts without a round trip to this process.
        with tf.device(protocol.server_0.device_name):
            answered = tf.cond(tf.reduce_all(tf.stack(ready)),
                               lambda: self._compute(bucket, input0, input1, output0, output1, batch),
                               lambda: tf.constant(False))
        self._publish(bucket, tf.compat.v1.get_default_graph())
        return client_id, batch, answered

    def _publish(self, bucket: int, graph) -> None:
        """Publish for clients what a batch of ``bucket`` images costs: the plaintext model's time here, and
        the bytes the servers send each other (counted on ``graph``, the computation being built).

        Called while the bucket's computation is first built, so before it first answers: a client that
        has been answered can always read the costs of its batch size.
        """
        with tf.init_scope():  # runs now, on this process and server0, not as part of the computation
            self.costs[bucket] = {"plaintext_seconds": self._plaintext_seconds(bucket),
                                  "servers_bytes": sum(crossings(graph).values())}
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

    def _compute(self, bucket, input0, input1, output0, output1, batch):
        protocol = self.protocol
        factory = protocol.tensor_factory
        with tf.device(protocol.server_0.device_name):
            expected = tf.concat([[batch], tf.constant(IMAGE_SHAPE, tf.int64)], axis=0)
        shares = []
        for input_queue, server in ((input0, protocol.server_0), (input1, protocol.server_1)):
            with tf.device(server.device_name):
                share = queue_ops.queue_dequeue_v2(input_queue, [tf.int64])[0]
                # Anything on the network can write into these queues: a share that is not a
                # batch of images fails this request here, before any secure computation.
                check = tf.debugging.assert_equal(tf.shape(share, out_type=tf.int64), expected,
                                                  message="shares of the wrong shape")
                with tf.control_dependencies([check]):
                    # Zero rows are valid shares of zero images: both servers pad alike, each
                    # its own share, and the extra rows are dropped before answering.
                    padded = tf.pad(share, [[0, bucket - batch], [0, 0], [0, 0], [0, 0]])
                    shares.append(factory.tensor(tf.reshape(padded, (bucket,) + IMAGE_SHAPE)))
        x = tfe.protocol.pond.PondPrivateTensor(protocol, shares[0], shares[1], True)
        y0, y1 = self.network(x).unwrapped
        # Multiplying each share by a public whole number is exact and needs no message.
        with tf.device(protocol.server_0.device_name):
            answered0 = queue_ops.queue_enqueue_v2(output0, [y0.value[:batch] * self.divisor])
        with tf.device(protocol.server_1.device_name):
            answered1 = queue_ops.queue_enqueue_v2(output1, [y1.value[:batch] * self.divisor])
        with tf.device(protocol.server_0.device_name), tf.control_dependencies([answered0, answered1]):
            return tf.constant(True)

    def _queues_of(self, client_id: str) -> ClientQueues:
        if client_id in self._clients:
            self._clients.move_to_end(client_id)
        else:
            self._clients[client_id] = self._quick(ClientQueues, self.protocol, client_id)
            if len(self._clients) > REMEMBERED_CLIENTS:
                self._clients.popitem(last=False)
        return self._clients[client_id]

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
        gc.collect()


class _Session:
    """One run of :meth:`SecureModel.serve`: its lease, its request queue, its requests set aside."""

    def __init__(self, model: SecureModel, report: Callable[[str], None]):
        self.model, self.report = model, report
        self.id = uuid.uuid4().hex
        self.dropped = 0  # requests with no shares behind them
        self.backlog = deque()  # requests taken from the queue together, handled one by one
        self._incoming: Optional[BackgroundCall] = None
        # (client id, bucket) of the client answered last: its next request is answered on arrival.
        self.expected = self._listening_for = None
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
                        outcome = self._next(timeout)
                    except ServerUnreachableError as error:
                        self._ride_out(error)
                        continue
                    if outcome is CLIENT_DONE:
                        if until_done:
                            self.report(f"The client said it is done: stopped serving after {_queries(number)}.")
                            break
                        continue
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
        self.report(f"{error.name} is not answering (its host went silent); waiting up to "
                    f"{OUTAGE_GRACE_SECONDS:.0f} s for it to come back...")
        deadline = time.monotonic() + OUTAGE_GRACE_SECONDS
        while first_dead_server(self.model.servers.config) is not None:
            if time.monotonic() > deadline:
                raise error
            self._check_interrupt()
            time.sleep(0.2)
        self.report(f"{error.name} answers again: serving goes on.")

    def _next(self, timeout: Optional[float]) -> str:
        """Take requests until one is answered or refused; say what happened to it (or CLIENT_DONE).

        A request of no images with no shares behind it is a client's goodbye: server0's door
        puts one in when its client says it is done. Any other request with no shares behind
        it is dropped at once and not counted: this series' clients put both shares in before
        their request, so it comes from something else that reached the request queue, and
        waiting for its shares would hold up the complete requests queued behind it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self.backlog:
                client_id, batch, filled = self.backlog.popleft()
                if batch == 0 and not filled:  # no images and no shares: a client's goodbye (door.py)
                    return CLIENT_DONE
                outcome = self._take(client_id, batch) if filled else None
                if outcome is not None:
                    return outcome
                self.dropped += 1
            if self._incoming is None:
                self._incoming = self._listen()
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                client_id, batch, answered = wait_for(self._incoming, wait, "", watches=[self.check_lease])
            except TimeoutError:
                raise TimeoutError(f"No private query arrived within {timeout:.0f} s. Run the client "
                                   "(notebook 03) while this one serves.") from None
            except tf.errors.OpError as error:
                return self._expected_failed(error)
            finally:
                if self._incoming is not None and self._incoming.done():
                    self._incoming = None
            if answered:
                return self._answered(client_id, batch)
            # Not the client expected: take it here, with every request queued behind it, in one call,
            # and look at all their input queues in another: a computation costs ten times more, and
            # a flood of requests with nothing behind them would hold up the real ones queued behind.
            taken = [(client_id, batch)] + self._call(take_waiting, self.requests)
            filled = self._call(shares_waiting, self.model.protocol, [taken_id for taken_id, _ in taken])
            self.backlog.extend((*request, full) for request, full in zip(taken, filled))

    def _listen(self) -> BackgroundCall:
        """Wait for the next request: on the servers, which answer it at once if the client answered
        last asks again (as clients mostly do); otherwise it comes here, to be taken below."""
        self._listening_for = self.expected
        if self.expected is None:
            return BackgroundCall(lambda: (*take_request(self.requests), False), name="waiting for a request")
        client_id, bucket = self.expected
        queues = self.model._queues_of(client_id)

        def listen():
            asker, batch, answered = self._run_answer(bucket, True, "", 0, queues)
            return asker.numpy().decode(errors="replace"), int(batch), bool(answered)
        return BackgroundCall(listen, name="waiting for a request")

    def _run_answer(self, bucket: int, take_next: bool, given_client: str, given_batch: int, queues: ClientQueues):
        """The bucket's computation, expecting a request from the client of ``queues``."""
        return self.model._answer_function(bucket)(
            self.requests.handle, tf.constant(take_next), tf.constant(given_client),
            tf.constant(given_batch, tf.int64), tf.constant(queues.client_id),
            *(queue.handle for queue in queues.inputs + queues.outputs))

    def _expected_failed(self, error: tf.errors.OpError) -> str:
        """The expected client's request failed on the servers (or a server is gone: raise that)."""
        if self._listening_for is None:  # only the request queue was involved
            raise self.model.servers.explain(error) from None
        self.model.servers.check()
        client_id, self.expected = self._listening_for[0], None
        try:
            self._refuse(client_id)
        except tf.errors.OpError:
            pass  # its output queues are closed: the client gave up on this query (a server went silent?)
        if isinstance(error, tf.errors.InvalidArgumentError):
            return f"refused, its shares are not a batch of the images of shape {IMAGE_SHAPE} it announced"
        return f"failed ({error.message.splitlines()[0][:200]})"

    def _answered(self, client_id: str, batch: int) -> str:
        self.answered.add(client_id)
        self.expected = (client_id, bucket_of(batch))
        images = "image" if batch == 1 else "images"
        return f"answered a private batch of {batch} {images}"

    def _take(self, client_id: str, batch: int) -> Optional[str]:
        """What happened to this request, or None if it had no shares behind it (dropped)."""
        try:
            problem = self._problem_with(client_id, batch)
            if problem:
                return f"refused, {problem}"
            return self._answer(client_id, batch)
        except tf.errors.OpError as error:  # e.g. queues of that name made by someone else, unlike ours
            return f"refused ({error.message.splitlines()[0][:200]})"

    def _problem_with(self, client_id: str, batch: int) -> Optional[str]:
        if not CLIENT_ID.fullmatch(client_id):
            return "its client id is not one this series makes"
        if not 1 <= batch <= MAX_BATCH_SIZE:
            self._refuse(client_id)
            return f"it announced a batch of {batch} images (1 to {MAX_BATCH_SIZE} are served)"
        return None

    def _drop_inputs(self, client_id: str) -> None:
        self._call(self.model._queues_of(client_id).discard_inputs)

    def _refuse(self, client_id: str) -> None:
        """Tell the waiting client that its request was refused (it raises, instead of waiting)."""
        self._drop_inputs(client_id)
        self._call(self.model._queues_of(client_id).reject)

    def _call(self, function, *args):
        try:
            return wait_for(BackgroundCall(function, *args), None, "", watches=[self.check_lease])
        except tf.errors.OpError as error:
            raise self.model.servers.explain(error) from None

    def _answer(self, client_id: str, batch: int) -> Optional[str]:
        bucket = bucket_of(batch)
        queues = self.model._queues_of(client_id)
        try:
            if not self._call(self._run_answer, bucket, False, client_id, batch, queues)[2]:
                return None  # no shares behind it: dropped
        except tf.errors.InvalidArgumentError:
            self._refuse(client_id)
            return f"refused, its shares are not a batch of {batch} images of shape {IMAGE_SHAPE}"
        except tf.errors.OpError as error:  # one request's failure; the service goes on
            self._refuse(client_id)
            return f"failed ({error.message.splitlines()[0][:200]})"
        return self._answered(client_id, batch)

    def _wait_until_collected(self, timeout: Optional[float]) -> None:
        deadline = time.monotonic() + (timeout or 120.0)
        clients = [self.model._queues_of(client_id) for client_id in self.answered]
        while any(self._call(lambda c=c: c.outputs[0].size() + c.outputs[1].size()) for c in clients):
            if time.monotonic() > deadline:
                self.report("Some results were not collected in time: their clients are gone.")
                return
            self._check_interrupt()
            time.sleep(0.05)


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
    encoding = protocol.fixedpoint_config
    limit = float(encoding.scaling_base ** encoding.precision_integral)
    computed, divisor, peak = fitting(keras_model, limit)
    return SecretNetwork(protocol, computed, limit), peak, divisor
