"""A door: the TLS service beside server0 or server1 through which clients reach the served model.

Clients never join the servers' TensorFlow runtime (it listens on loopback or a private
address only). A client sends each door one share of its batch; the door checks the
token and the request, puts the share where the serving side computes on it (the
client's queues on its own server, queues.py), and returns its own server's share of the
answer. Nothing else passes through: server0's door never sees server1's share, nor the
other way round, and neither can run anything on the servers.

A query is put to the serving side only once both shares are in: server1's door says so
in a queue on server0 (``arrival_queue``), and server0's door waits for that before it
puts in its share and the request. A client that sends one share only costs the doors a
few seconds of one thread at server0's door (a share sent to server1's door alone waits
there until its client gives up); the serving side never sees its request.

A client that says it is done (``Done``, server0's door only) puts a request of no images
and no shares in the serving side's queue: notebook 02's serving ends there, a class's
goes on (serving.py).

A call with a token that is not admitted (or revoked) is refused before gRPC reads its
body or gives it a thread (``_Handlers``): a stranger holds up nothing. The door runs in
its server's own process and reaches it through a TensorFlow session on the in-process
server (server1's door also writes its note to server0, over the servers' runtime). Each
client's queues are named by a hash of its token and of the id it chose, so no client
can address another's. After a failed query the door closes that client's answer queue
and forgets it: a late answer fails there instead of waiting for a reader, and the client
draws a new id.
"""
import hashlib
import json
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
from tensorflow.python.ops import gen_data_flow_ops as queue_ops

from ._tf import tf
from .admission import AdmissionError, Gate, admissions_path, certificate_path, digest
from .certificates import fingerprint, make_certificate
from .client import ASK, COSTS, DONE, HELLO, NOT_PUBLISHED, NOT_SERVING, WORD
from .config import ClusterConfig
from .protocol import tfe_config
from .data import IMAGE_SHAPE, NUM_CLASSES
from .queues import (MAX_BATCH_SIZE, NOBODY, SERVING_SILENCE, PublishedCosts, ServingLease, arrival_queue,
                     bucket_of, input_queues, output_queue, request_queue)

PARTNER_SECONDS = 10.0  # how long server0's door waits for server1's to say the other share is in
LONGEST_WAIT = 600.0  # for an answer, whatever the client's deadline
WATCH_SECONDS = 0.25  # how often the door looks whether a wait must end (client gone, serving stopped)
REMEMBERED = 512  # clients whose queues a door keeps; the oldest idle ones are deleted beyond that
AT_ONCE_PER_TOKEN = 2  # queries of one token in flight at once: one token never fills the door
CLIENT_ID = re.compile(r"[0-9a-f]{32}")
REQUEST_BYTES = MAX_BATCH_SIZE * int(np.prod(IMAGE_SHAPE)) * WORD.itemsize
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", REQUEST_BYTES + 4096),  # larger: refused by gRPC, unread
    ("grpc.max_send_message_length", MAX_BATCH_SIZE * NUM_CLASSES * WORD.itemsize + 4096),
    # Clients ping every 2 s while they wait (client.CHANNEL_OPTIONS), to notice a silent door.
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 10000), ("grpc.keepalive_timeout_ms", 5000),  # and drops silent clients
]


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


# A session's first run also places its graph on the servers: on a loaded machine (2 cores, a
# class asking at once) that alone can take seconds, so it gets longer than the later ones.
FIRST_RUN_MS = 30000
_warm = weakref.WeakSet()  # sessions that have run once


def _run(session, fetches, milliseconds: int, feed=None):
    limit = milliseconds if session in _warm else max(milliseconds, FIRST_RUN_MS)
    found = session.run(fetches, feed, options=tf.compat.v1.RunOptions(timeout_in_ms=int(limit)))
    _warm.add(session)
    return found


class _ClientGraph:
    """The few operations a door runs for one client: its queues on this server (and the arrival note)."""

    def __init__(self, target: str, servers, index: int, queue_id: str):
        self.graph = tf.Graph()
        devices = [servers.server_0.device_name, servers.server_1.device_name]
        own = devices[index]
        with self.graph.as_default():
            self.share = tf.compat.v1.placeholder(tf.int64, (None,) + IMAGE_SHAPE)
            self.batch = tf.compat.v1.placeholder(tf.int64, ())
            inputs = input_queues(servers, queue_id)
            arrived = arrival_queue(devices[0], queue_id).handle
            outputs = output_queue(own, index, queue_id).handle
            with tf.device(own):
                put = queue_ops.queue_enqueue_v2(inputs[index].handle, [self.share])
                self.take_answer = queue_ops.queue_dequeue_v2(outputs, [tf.int64])[0]
                self.close = queue_ops.queue_close_v2(outputs, cancel_pending_enqueues=True)
            with tf.device(devices[0]):
                if index == 1:
                    with tf.control_dependencies([put]):  # the note goes after the share
                        put = queue_ops.queue_enqueue_v2(arrived, [self.batch])
                else:
                    self.take_arrival = queue_ops.queue_dequeue_v2(arrived, [tf.int64])[0]
                    self.close_arrival = queue_ops.queue_close_v2(arrived, cancel_pending_enqueues=True)
            self.put = put
        self.session = tf.compat.v1.Session(target, graph=self.graph)
        self.busy = False


class Door:
    """server0's or server1's door (``index`` 0 or 1), in the process of that server."""

    def __init__(self, config: ClusterConfig, config_path, server: str, target: str):
        self.index = int(server[-1])
        # server0 and server1 as the queues' functions name them (protocol.server_0, ...): the players.
        players = tfe_config(config)
        self.servers = SimpleNamespace(server_0=players.get_player("server0"), server_1=players.get_player("server1"))
        self.server0 = self.servers.server_0.device_name
        self.target = target
        self.gate = Gate(admissions_path(Path(config_path).parent))
        self._lock = threading.Lock()
        self._clients = OrderedDict()
        self._in_flight = {}  # token digest -> queries now
        self._requests = {}  # serving session -> (session, placeholders, enqueue); the current one only
        self._lease_session, self._lease = self._lease_graph()
        self._waits = {}  # a wait on the servers -> (context, owner, deadline, queue to close to end it)
        self._waits_lock = threading.Lock()
        self._ended = {}  # a wait -> why the watch ended it
        threading.Thread(target=self._watch, name=f"{server}-door watch", daemon=True).start()
        key, self.certificate = make_certificate(server)
        host, port = config.door_address(server)
        self.grpc = grpc.server(ThreadPoolExecutor(max_workers=64, thread_name_prefix=f"{server}-door"),
                                options=SERVER_OPTIONS, maximum_concurrent_rpcs=256)
        methods = {ASK: grpc.unary_unary_rpc_method_handler(self._ask),
                   HELLO: grpc.unary_unary_rpc_method_handler(self._hello)}
        if self.index == 0:  # the request queue, where a goodbye goes, and the published costs are on server0
            methods[DONE] = grpc.unary_unary_rpc_method_handler(self._done)
            methods[COSTS] = grpc.unary_unary_rpc_method_handler(self._costs)
        self.grpc.add_generic_rpc_handlers([_Handlers(self.gate, methods)])
        if self.grpc.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(key, self.certificate)])) == 0:
            raise OSError(f"{server}'s door cannot listen on {host}:{port}: is that port taken, or not an "
                          "address of this machine?")
        path = certificate_path(Path(config_path).parent, server)
        path.write_bytes(self.certificate)
        self.fingerprint = fingerprint(self.certificate)

    def start(self) -> "Door":
        self.grpc.start()
        return self

    # -- the servers' side -------------------------------------------------------------------------

    def _lease_graph(self):
        """A session that reads, on server0, who serves (the lease) and what the serving side published."""
        graph = tf.Graph()
        with graph.as_default(), tf.device(self.server0):
            lease = ServingLease(self.server0)._current()
            self._published = PublishedCosts(self.server0).current()
        return tf.compat.v1.Session(self.target, graph=graph), lease

    def _serving(self) -> str:
        """The serving side's session, or refuse: nobody serves the model now."""
        owner, age = _run(self._lease_session, self._lease, 5000)
        owner = owner.decode()
        if owner == NOBODY or age > SERVING_SILENCE:
            raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           NOT_SERVING + "nobody serves the model now. The model owner must serve it (the serve "
                           "cell of notebook 02, or the teach command); then ask again.")
        return owner

    def _put_request(self, owner: str, queue_id: str, batch: int) -> None:
        """Put a request in the request queue of the serving side ``owner``; refuse if it has stopped.

        ``batch`` 0 (and no shares) is a client's goodbye.
        """
        with self._lock:
            if owner not in self._requests:
                graph = tf.Graph()
                with graph.as_default():
                    client_id = tf.compat.v1.placeholder(tf.string, ())
                    size = tf.compat.v1.placeholder(tf.int64, ())
                    with tf.device(self.server0):
                        put = queue_ops.queue_enqueue_v2(request_queue(self.servers, owner).handle, [client_id, size])
                for old in self._requests.values():
                    old[0].close()
                self._requests = {owner: (tf.compat.v1.Session(self.target, graph=graph), client_id, size, put)}
            session, client_id, size, put = self._requests[owner]
        try:
            _run(session, put, 5000, {client_id: queue_id, size: batch})
        except tf.errors.OpError:
            raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           NOT_SERVING + "the serving side stopped. Ask again once it serves.") from None

    def _client(self, queue_id: str) -> _ClientGraph:
        with self._lock:
            client = self._clients.get(queue_id)
            if client is None:
                client = self._clients[queue_id] = _ClientGraph(self.target, self.servers, self.index, queue_id)
                idle = [key for key, old in self._clients.items() if not old.busy]
                for old_id in idle[:max(0, len(self._clients) - REMEMBERED)]:
                    # Only the session goes: the queues stay on the server, where the serving side may
                    # still look at them (an empty queue costs next to nothing).
                    self._clients.pop(old_id).session.close()
            self._clients.move_to_end(queue_id)
            if client.busy:
                raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                               "this client's previous query is still waiting for its answer: one at a time")
            client.busy = True
            return client

    def _forget(self, queue_id: str, client: _ClientGraph) -> None:
        """After a failed query: close this client's answer queue here (a late answer fails instead of
        piling up), and forget it. Its client draws a new id for its next query."""
        try:
            _run(client.session, client.close, 2000)
        except tf.errors.OpError:
            pass
        with self._lock:
            if self._clients.get(queue_id) is client:
                del self._clients[queue_id]
        client.session.close()

    # -- the clients' side -------------------------------------------------------------------------

    def _check(self, context, count_images: bool, cost: int = 0):
        """(token digest, queue id, batch) of a well-formed, admitted request; else refuse.

        Counted against the token's limit: the batch's images (``count_images``), or else ``cost``.
        """
        metadata = dict(context.invocation_metadata())
        token, client_id, batch = metadata.get("token", ""), metadata.get("client", ""), metadata.get("batch", "")
        if not batch.isdigit() or not (count_images is False or 1 <= int(batch) <= MAX_BATCH_SIZE):
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the batch size must be 1 to {MAX_BATCH_SIZE}")
        if not CLIENT_ID.fullmatch(client_id):
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the client id must be 32 hexadecimal digits")
        try:
            self.gate.admit(token, int(batch) if count_images else cost)
        except AdmissionError as error:
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None
        key = digest(token)
        queue_id = hashlib.sha256(f"{key}:{client_id}".encode()).hexdigest()[:32]
        return key, queue_id, int(batch)

    def _hello(self, request: bytes, context) -> bytes:
        try:
            self._check(context, count_images=False)
        except _Refusal as refusal:
            context.abort(refusal.code, str(refusal))
        return b""

    def _costs(self, request: bytes, context) -> bytes:
        """What the serving side published about the batch size the client announced (its padded size):
        the plaintext model's time on the model owner's machine and the bytes the servers send each other."""
        try:
            _, _, batch = self._check(context, count_images=False, cost=1)
            if not 1 <= batch <= MAX_BATCH_SIZE:
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the batch size must be 1 to {MAX_BATCH_SIZE}")
            bucket = bucket_of(batch)
            published = json.loads(_run(self._lease_session, self._published, 5000).decode()).get(str(bucket))
            if published is None:
                raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION, NOT_PUBLISHED + f"nothing is published about "
                               f"batches of {batch} yet: the servers measure a batch size when they first answer "
                               "one. Ask a query of that size first.")
        except _Refusal as refusal:
            context.abort(refusal.code, str(refusal))
        except tf.errors.OpError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the servers could not be read; ask again in a moment")
        return json.dumps(dict(published, batch=bucket)).encode()

    def _done(self, request: bytes, context) -> bytes:
        """A client's goodbye: a request of no images and no shares, which the serving side reads as
        "this client is done" (serving.py). Notebook 02's serving stops then; a class's goes on."""
        try:
            # A goodbye costs the serving side a request to take: counted as one image, so that a
            # token's goodbyes are bounded by its limit like its queries.
            _, queue_id, _ = self._check(context, count_images=False, cost=1)
            self._put_request(self._serving(), queue_id, 0)
        except _Refusal as refusal:
            context.abort(refusal.code, str(refusal))
        except tf.errors.OpError:  # the serving side's lease could not be read
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_SERVING + "the serving side stopped.")
        return b""

    def _ask(self, request: bytes, context) -> bytes:
        client = key = None
        stored = False  # whether this door put anything on the servers for this query
        try:
            # Nobody serving: refused before anything is counted, made or stored.
            owner = self._serving()
            key, queue_id, batch = self._check(context, count_images=True)
            if len(request) != batch * int(np.prod(IMAGE_SHAPE)) * WORD.itemsize:
                key = None
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the share is not a batch of {batch} images of shape {IMAGE_SHAPE} in 64-bit words")
            with self._lock:
                if self._in_flight.get(key, 0) >= AT_ONCE_PER_TOKEN:
                    key = None
                    raise _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"this token has {AT_ONCE_PER_TOKEN} queries waiting already; wait for them")
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
            share = np.frombuffer(request, dtype=WORD).reshape((batch,) + IMAGE_SHAPE)
            client = self._client(queue_id)
            if self.index == 0:
                announced = self._wait(client, client.take_arrival, context, owner, PARTNER_SECONDS,
                                       "server1's door did not receive the other share within "
                                       f"{PARTNER_SECONDS:.0f} s; send one share to each door", client.close_arrival)
                if int(announced) != batch:
                    stored = True  # server1's share is in: this client's queues are spoilt
                    raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"server1's door was sent a batch of {int(announced)} images, this one {batch}")
                stored = True
                _run(client.session, client.put, 5000, {client.share: share})
                self._put_request(owner, queue_id, batch)
            else:
                stored = True
                _run(client.session, client.put, 5000, {client.share: share, client.batch: batch})
            answer = self._wait(client, client.take_answer, context, owner, LONGEST_WAIT, "no answer in time")
            if answer.ndim != 2:  # an empty vector: the serving side refused the request
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the serving side refused it: the two shares are not a batch of {batch} images")
            stored = False
            return answer.astype(WORD).tobytes()
        except _Refusal as refusal:
            context.abort(refusal.code, str(refusal))
        except tf.errors.OpError as error:
            # TensorFlow's own words name the servers' internal addresses: they go to this server's
            # log, for its operator, not to the client.
            print(f"door: a query failed on the servers: {type(error).__name__}: "
                  f"{error.message.splitlines()[0][:300]}", file=sys.stderr, flush=True)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the servers could not take this query (one of them may "
                          "have stopped); ask again in a moment")
        finally:
            if client is not None:
                client.busy = False
                if stored:
                    self._forget(queue_id, client)
            if key is not None:
                with self._lock:
                    self._in_flight[key] -= 1

    def _wait(self, client: _ClientGraph, fetch, context, owner: str, seconds: float, late: str, close=None):
        """Run ``fetch``, a dequeue, until it returns; refuse if the client left, serving stopped, or
        ``seconds`` passed.

        The dequeue waits without a time limit: a step stopped by its deadline can have taken an element
        already, and lose it (seen: a query in a few hundred left unanswered). To end the wait, the
        watch closes the queue it waits on (``close``), which ends a dequeue only while the queue is
        empty: nothing is ever lost. Whether the watch ended this wait is settled under ``_waits_lock``
        when it ends, so the watch never closes the queues of a wait that has already returned: the
        same client's next query waits on them (seen: a class's query failed now and then).
        """
        token = object()
        with self._waits_lock:
            self._waits[token] = (context, owner, time.monotonic() + seconds, client, close or client.close, late)
        failure = found = None
        try:
            found = client.session.run(fetch)
        except tf.errors.OpError as error:
            failure = error
        finally:
            with self._waits_lock:
                self._waits.pop(token, None)
                ended = self._ended.pop(token, None)
        if ended is not None:  # its queue is closed now: this client's next query must use new ones
            raise ended
        if failure is not None:
            raise failure
        return found

    def _watch(self) -> None:
        """End the waits that must end, four times a second, for as long as the server runs."""
        while True:
            time.sleep(WATCH_SECONDS)
            if self._waits:
                self._end_waits()

    def _end_waits(self) -> None:
        try:
            owner_now = self._serving()
        except _Refusal:
            owner_now = None  # nobody serves
        except tf.errors.OpError:
            return  # server0 unreachable: the serving side, and then the lease, tell
        with self._waits_lock:
            waiting = list(self._waits.items())
        for token, (context, owner, deadline, client, close, late) in waiting:
            if not context.is_active():
                why = _Refusal(grpc.StatusCode.CANCELLED, "the client left")
            elif owner_now != owner:
                why = _Refusal(grpc.StatusCode.FAILED_PRECONDITION, NOT_SERVING + "the serving side stopped "
                               "before answering. Ask again once it serves.")
            elif time.monotonic() > deadline:
                why = _Refusal(grpc.StatusCode.FAILED_PRECONDITION, late)
            else:
                continue
            with self._waits_lock:
                if token not in self._waits:
                    continue  # it returned meanwhile (its client may be waiting on these queues again)
                self._ended[token] = why
            try:
                _run(client.session, close, 2000)
            except Exception:  # noqa: BLE001  (an OpError, or a session its query closed already)
                pass


class _Handlers(grpc.GenericRpcHandler):
    """Find the method of a call, unless its token was never admitted or was revoked.

    gRPC asks this before it gives the call a thread or reads its body: a call it gets no
    method for is refused there and then (as UNIMPLEMENTED, which the client reads as "not
    admitted"), so that strangers, however many and however slow, hold up nobody.
    """

    def __init__(self, gate: Gate, methods):
        self.gate, self.methods = gate, methods

    def service(self, handler_call_details):
        token = dict(handler_call_details.invocation_metadata).get("token", "")
        if not self.gate.knows(token):
            return None
        return self.methods.get(handler_call_details.method)
