"""A door: the TLS service beside server0 or server1 through which clients reach the served model.

Clients never join the servers' TensorFlow runtime (it listens on loopback or a private address only).
A client sends each door one share of its batch; the door checks the token and the request, stages the
share in its own server's tables (queues.py), and returns its own server's share of the answer. Nothing
else passes through: server0's door never sees server1's share, nor the other way round, and neither
can run anything on the servers. Every query is named by a key both doors derive from the client's
token, the id it drew and the query's random nonce, so no client can reach another's query.

server0's door decides whether a query is taken, and is the only one that counts its images: server1's
door stages its share and says so on server0 (the arrivals queue); server0's door waits up to
PARTNER_SECONDS for that note, stages its own share and puts the request in the queue of the side that
serves. If the note never comes, server0's door refuses; if server0's door refused a query, or never got
it, the share server1's door staged is removed as soon as its note arrives, or PARTNER_SECONDS after,
and server1's door tells its client. So a query is taken at both doors or at neither, and a share never
stays on a server without its twin. What the servers hold of a query taken and then abandoned is
removed when the serving side answers it (its answer, by the doors) or stops (its shares, by server0's
door).

No call holds a thread while it waits. The door runs on grpc.aio: a call that waits for its partner's
note or for its answer is a coroutine waiting for a future, which one thread per door resolves from the
servers' notices (the answered queue, and on server0 the arrivals), taking all the notices there, and the
answers of the queries they say were answered, in one call. The door's TensorFlow calls that
return at once (staging a share, reading the lease) run on a small pool of threads. A watch ends the
waits that must end: serving stopped, a server fell silent (named to the client), or the call's time ran
out; a client that leaves cancels its coroutine.

A call with a token that is not admitted (or revoked) is refused before gRPC reads its body
(``_Handlers``): a stranger holds up nobody.
"""
import asyncio
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional

import grpc
import numpy as np
from tensorflow.python.ops import gen_data_flow_ops as queue_ops

from ._tf import tf
from .admission import AdmissionError, Gate, admissions_path, certificate_path, digest
from .certificates import fingerprint, make_certificate
from .client import ASK, COSTS, DONE, HELLO, NOT_PUBLISHED, NOT_SERVING, SERVER_SILENT, WORD
from .config import ClusterConfig
from .data import IMAGE_SHAPE
from .protocol import tfe_config
from .queues import (CLASSES, MAX_BATCH_SIZE, NO_PARTNER, NOBODY, PIXELS, REFUSED, REQUEST_DTYPES, SERVING_SILENCE,
                     PublishedCosts, ServerTables, ServingLease, all_waiting, arrivals_queue, bucket_of, query_key,
                     request_queue)
from .watch import ServerWatch

PARTNER_SECONDS = 10.0  # how long server0's door waits for server1's to say the other share is in
LONGEST_WAIT = 600.0  # for an answer, whatever the client's deadline
WATCH_SECONDS = 0.25  # how often the door looks whether a wait must end (serving stopped, a server silent)
PROBE_SECONDS = 1.0  # how often it looks whether every server still answers
AT_ONCE_PER_TOKEN = 2  # queries of one token in flight at once, at each door
QUICK_THREADS = 8  # for TensorFlow calls that return at once; none waits for a client
# The limit of such a call. Generous: on a busy machine (a class asking at once, two cores) a small step can
# wait seconds behind the servers' computations, and a step waited for is better than a query failed.
RUN_MS = 30000
CLIENT_ID = re.compile(r"[0-9a-f]{32}")
NONCE = re.compile(r"[0-9a-f]{16}")
REQUEST_BYTES = MAX_BATCH_SIZE * int(np.prod(IMAGE_SHAPE)) * WORD.itemsize
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", REQUEST_BYTES + 4096),  # larger: refused by gRPC, unread
    ("grpc.max_send_message_length", MAX_BATCH_SIZE * CLASSES * WORD.itemsize + 4096),
    # Clients ping every 2 s while they wait (client.CHANNEL_OPTIONS), to notice a silent door.
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 10000), ("grpc.keepalive_timeout_ms", 5000),  # and drops silent clients
]


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _serving_stopped(what: str = "the serving side stopped before answering") -> _Refusal:
    return _Refusal(grpc.StatusCode.FAILED_PRECONDITION, NOT_SERVING + f"{what}. Ask again once it serves.")



class _Servers:
    """The door's TensorFlow graph: every operation it runs on the servers, with one session to run them.

    Sessions are thread-safe: the door's pool runs several calls at once, and its dispatchers wait in
    theirs (a dequeue) for as long as the server runs.
    """

    def __init__(self, target: str, players, index: int):
        self.index = index
        devices = [players.server_0.device_name, players.server_1.device_name]
        self.server0 = devices[0]
        self.graph = graph = tf.Graph()
        with graph.as_default():
            tables = [ServerTables(device, i) for i, device in enumerate(devices)]
            own = tables[index]
            self.key = tf.compat.v1.placeholder(tf.int64, ())
            self.keys = tf.compat.v1.placeholder(tf.int64, (None,))
            self.batches = tf.compat.v1.placeholder(tf.int64, (None,))
            with tf.device(own.device):
                self.notices = own.notices()
            with tf.device(devices[0]):
                self.lease = ServingLease(devices[0])._current()
                self.published = PublishedCosts(devices[0]).current()
                arrivals = arrivals_queue(devices[0])
            if index == 1:
                self.rows = tf.compat.v1.placeholder(tf.int64, (None, PIXELS))
                with tf.device(own.device):
                    staged = own.put_shares(self.keys, self.batches, self.rows)
                with tf.device(devices[0]), tf.control_dependencies([staged]):  # the notes after the shares
                    self.stage = queue_ops.queue_enqueue_many_v2(arrivals, [self.keys, self.batches])
            else:  # server0's door stages its shares with their requests (request())
                with tf.device(devices[0]):
                    self.arrivals = all_waiting(arrivals)
                # Forget a query on both servers; tell server1's door there is no partner (rollback).
                forgotten = [tables[0].forget(self.key[None])]
                with tf.device(devices[1]):
                    forgotten.append(tables[1].forget(self.key[None]))
                    with tf.control_dependencies(forgotten):
                        self.no_partner = tables[1].say(self.key[None], tf.constant([NO_PARTNER], tf.int64))
                self.forget_both = tf.group(*forgotten)
        self.session = tf.compat.v1.Session(target, graph=graph)
        self._requests: Dict[str, tuple] = {}  # serving session -> (session, its ops), the current one only
        self._requests_lock = threading.Lock()
        self.target, self.players = target, players

    def run(self, fetches, feed=None):
        return self.session.run(fetches, feed, options=tf.compat.v1.RunOptions(timeout_in_ms=RUN_MS))

    def wait(self, fetch):
        """A dequeue that waits as long as it takes: for a dispatcher's thread only."""
        return self.session.run(fetch)

    def request(self, owner: str, keys, batches, rows=None) -> None:
        """Put the requests (keys, batches) in the queue of serving side ``owner``; with ``rows``, server0's
        shares of them (one after another) are staged first, in the same call. A batch of 0: a goodbye."""
        with self._requests_lock:
            if owner not in self._requests:
                graph = tf.Graph()
                with graph.as_default():
                    keys_, batches_ = (tf.compat.v1.placeholder(tf.int64, (None,)) for _ in range(2))
                    rows_ = tf.compat.v1.placeholder(tf.int64, (None, PIXELS))
                    with tf.device(self.server0):
                        queue = request_queue(self.players, owner).handle
                        put = queue_ops.queue_enqueue_many_v2(queue, [keys_, batches_])
                        with tf.control_dependencies([ServerTables(self.server0, 0).put_shares(keys_, batches_, rows_)]):
                            staged = queue_ops.queue_enqueue_many_v2(queue, [keys_, batches_])
                for old in self._requests.values():
                    old[0].close()
                self._requests = {owner: (tf.compat.v1.Session(self.target, graph=graph), keys_, batches_, rows_,
                                          put, staged)}
            session, keys_, batches_, rows_, put, staged = self._requests[owner]
        feed = {keys_: keys, batches_: batches}
        if rows is not None:
            feed[rows_] = rows
        session.run(put if rows is None else staged, feed, options=tf.compat.v1.RunOptions(timeout_in_ms=RUN_MS))


class _Together:
    """Calls of one kind that come while one runs wait, then run as one: the shares of a class's queries that
    arrive together are staged in a few TensorFlow calls, not one each, and the lease is read once for them. A
    call that comes while none runs runs at once, so a lone query waits for nothing; one that comes while
    one runs waits for the next, which starts after it came."""

    def __init__(self, door: "Door", run):
        # run(items) makes the call for all of them and returns each item's result, or the exception that item
        # failed with (one failure need not fail the others: server0's door makes one call per serving side).
        self.door, self.run = door, run
        self._waiting = []  # (item, future)
        self._running = False

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if not self._running:
            self._running = True
            asyncio.ensure_future(self._run_waiting())
        return await future

    async def _run_waiting(self) -> None:
        try:
            while self._waiting:
                # A caller that left (a client gone, its call cancelled) is left out: its query is rolled back.
                group, self._waiting = [(item, future) for item, future in self._waiting if not future.done()], []
                if not group:
                    continue
                try:
                    results = await self.door._quick(self.run, [item for item, _ in group])
                except Exception as error:  # noqa: BLE001  (each caller gets it)
                    results = [error] * len(group)
                for result, (_, future) in zip(results, group):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        # Without its traceback, whose frames hold the group's shares until the collector runs.
                        future.set_exception(result.with_traceback(None))
                    else:
                        future.set_result(result)
                del group, results  # the shares in it are staged: nothing here holds them
        finally:
            self._running = False


class _Wait:
    """A call waiting for its answer: the future the dispatcher resolves, and why it may have to end."""

    def __init__(self, future: asyncio.Future, owner: str, deadline: float):
        self.future, self.owner, self.deadline = future, owner, deadline


class Door:
    """server0's or server1's door (``index`` 0 or 1), in the process of that server."""

    def __init__(self, config: ClusterConfig, config_path, server: str, target: str):
        self.index = int(server[-1])
        self.name, self.config = server, config
        self.watch = ServerWatch(config, "")
        self.gate = Gate(admissions_path(Path(config_path).parent))
        # server0 and server1 as the queues' functions name them (protocol.server_0, ...): the players.
        players = tfe_config(config)
        players = SimpleNamespace(server_0=players.get_player("server0"), server_1=players.get_player("server1"))
        self.servers = _Servers(target, players, self.index)
        self.pool = ThreadPoolExecutor(QUICK_THREADS, thread_name_prefix=f"{server}-door")
        self._stage = _Together(self, self._stage_now)
        self._serving_lease = _Together(self, lambda waiting: [self._serving_now()] * len(waiting))
        self.key, self.certificate = make_certificate(server)
        self.address = config.door_address(server)
        path = certificate_path(Path(config_path).parent, server)
        path.write_bytes(self.certificate)
        self.fingerprint = fingerprint(self.certificate)
        # Touched only on the door's event loop:
        self._waits: Dict[int, _Wait] = {}  # query key -> a call waiting for its answer
        self._busy = set()  # (token digest, client id) with a query in flight here: one at a time
        self._in_flight: Dict[str, int] = {}  # token digest -> queries in flight here
        self._notes: Dict[int, tuple] = {}  # server0: (batch, arrival time) of notes no call has claimed yet
        self._note_waits: Dict[int, asyncio.Future] = {}  # server0: calls waiting for their partner's note
        self._refused: Dict[int, float] = {}  # server0: keys refused or given up before they were taken
        self._taken: Dict[int, str] = {}  # server0: keys taken, not yet answered -> the serving side
        self._owner = None  # the serving side, as the watch last read it (None: not read yet)
        self._silent: Optional[str] = None  # why a server is not answering, as the watch last probed
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def start(self) -> "Door":
        """Serve on an event loop of its own; raise OSError if the door's address cannot be taken."""
        started, failure = threading.Event(), []

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._open())
            except BaseException as error:  # noqa: BLE001  (handed to the starting thread)
                failure.append(error)
                started.set()
                return
            started.set()
            self.loop.run_forever()

        threading.Thread(target=run, name=f"{self.name}-door loop", daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]
        for name, fetch, handle in ((f"{self.name}-door answers", self.servers.notices, self._answered),) + (
                ((f"{self.name}-door arrivals", self.servers.arrivals, self._arrived),) if self.index == 0 else ()):
            threading.Thread(target=self._dispatch, args=(fetch, handle), name=name, daemon=True).start()
        return self

    async def _open(self):
        self.grpc = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=1024)
        methods = {ASK: grpc.unary_unary_rpc_method_handler(self._ask),
                   HELLO: grpc.unary_unary_rpc_method_handler(self._hello)}
        if self.index == 0:  # the request queue, where a goodbye goes, and the published costs are on server0
            methods[DONE] = grpc.unary_unary_rpc_method_handler(self._done)
            methods[COSTS] = grpc.unary_unary_rpc_method_handler(self._costs)
        self.grpc.add_generic_rpc_handlers([_Handlers(self.gate, methods)])
        host, port = self.address
        if self.grpc.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(self.key, self.certificate)])) == 0:
            raise OSError(f"{self.name}'s door cannot listen on {host}:{port}: is that port taken, or not an "
                          "address of this machine?")
        await self.grpc.start()
        asyncio.ensure_future(self._watch())

    # -- the servers' side -------------------------------------------------------------------------

    async def _quick(self, function, *args):
        """A TensorFlow call that returns at once, on the door's pool: the event loop never waits on it."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def _dispatch(self, fetch, handle) -> None:
        """A thread that takes the server's notices, all those there at once, and hands them to the event loop."""
        while True:
            try:
                taken = self.servers.wait(fetch)
            except tf.errors.OpError:  # the server is going away
                return
            self.loop.call_soon_threadsafe(handle, *taken)

    def _stage_now(self, queries) -> list:
        """Stage these queries' shares [(owner, key, batch, rows)] in one call: at server1's door with its notes to
        server0's door; at server0's door with their requests, in one call for each serving side. Returns each
        query's outcome: None, or the error of its call (a serving side that stopped fails its own queries only)."""
        def apart(some):  # keys, batch sizes, and the rows one after another (a lone query's as they came)
            _, keys, batches, rows = zip(*some)
            return list(keys), list(batches), rows[0] if len(rows) == 1 else np.concatenate(rows)

        if self.index == 1:
            keys, batches, rows = apart(queries)
            self.servers.run(self.servers.stage,
                             {self.servers.keys: keys, self.servers.batches: batches, self.servers.rows: rows})
            return [None] * len(queries)
        outcomes = {}
        for owner in dict.fromkeys(owner for owner, *_ in queries):
            try:
                self.servers.request(owner, *apart([query for query in queries if query[0] == owner]))
                outcomes[owner] = None
            except tf.errors.OpError as error:
                outcomes[owner] = error
        return [outcomes[owner] for owner, *_ in queries]

    def _answered(self, keys, outcomes, rows) -> None:
        """The serving side answered queries ``keys`` (``outcomes``: their batch sizes), or did not (REFUSED, ...).
        ``rows``: the answered queries' answers, in order, taken from the server with the notices (a class's come
        together). Each waiting call gets its own rows; those of a call gone are dropped: nothing stays."""
        first = 0
        for key, outcome in zip(keys.tolist(), outcomes.tolist()):
            self._taken.pop(key, None)
            wait = self._waits.pop(key, None)
            own = rows[first:first + max(outcome, 0)]
            first += max(outcome, 0)
            if wait is not None and not wait.future.done():
                wait.future.set_result((outcome, own if outcome > 0 else None))

    def _arrived(self, keys, batches) -> None:
        """server1's door staged its shares of queries ``keys`` (server0's door only)."""
        for key, batch in zip(keys.tolist(), batches.tolist()):
            self._arrived_one(key, batch)

    def _arrived_one(self, key: int, batch: int) -> None:
        waiting = self._note_waits.pop(key, None)
        if key in self._refused:
            asyncio.ensure_future(self._roll_back(key))
        elif waiting is not None and not waiting.done():
            waiting.set_result(batch)
        else:
            self._notes[key] = (batch, time.monotonic())

    async def _roll_back(self, key: int) -> None:
        """Remove a query's staged shares from both servers, and tell server1's door (server0's door only)."""
        self._refused.pop(key, None)
        try:
            await self._quick(self.servers.run, self.servers.no_partner, {self.servers.key: key})
        except tf.errors.OpError:
            pass  # a server is gone, and what it held with it

    async def _forget(self, key: int) -> None:
        """Remove what both servers hold of a query taken but never answered (server0's door only)."""
        try:
            await self._quick(self.servers.run, self.servers.forget_both, {self.servers.key: key})
        except tf.errors.OpError:
            pass

    def _serving_now(self):
        owner, age = self.servers.run(self.servers.lease)
        owner = owner.decode()
        return owner if owner != NOBODY and age <= SERVING_SILENCE else None

    async def _serving(self) -> str:
        """The serving side's session, or refuse: nobody serves the model now."""
        try:
            owner = await self._serving_lease(None)
        except tf.errors.OpError:
            owner = None
        if owner is None:
            raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           NOT_SERVING + "nobody serves the model now. The model owner must serve it (the last "
                           "cell of notebook 02, or the teach command); then ask again.")
        if self._silent:
            raise _Refusal(grpc.StatusCode.UNAVAILABLE, SERVER_SILENT + self._silent)
        return owner

    def _probe(self) -> Optional[str]:
        """Why a server is not answering, naming it, or None."""
        name = self.watch.first_gone()
        if name is None:
            return None
        how = "its host went silent" if self.watch.silent(name) else "it stopped"
        return (f"{name} ({self.config.hosts[name]}) is not answering ({how}): this query cannot finish. Ask "
                "again once it is back (the model owner may have to serve the model again).")

    async def _watch(self) -> None:
        """End the waits that must end, four times a second, for as long as the server runs."""
        next_probe = 0.0
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                owner = await self._serving_lease(None)
            except tf.errors.OpError:
                owner = self._owner  # server0 unreachable: the probe names it
            if time.monotonic() >= next_probe:
                self._silent = await self._quick(self._probe)
                next_probe = time.monotonic() + PROBE_SECONDS
            if owner != self._owner and self._waits:  # why serving stopped: a server gone says more
                self._silent = await self._quick(self._probe)
            self._owner, now = owner, time.monotonic()
            for key, wait in list(self._waits.items()):
                if wait.future.done():
                    continue
                if self._silent:
                    wait.future.set_exception(_Refusal(grpc.StatusCode.UNAVAILABLE, SERVER_SILENT + self._silent))
                elif wait.owner and owner != wait.owner:
                    wait.future.set_exception(_serving_stopped())
                elif now > wait.deadline:
                    wait.future.set_exception(_Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time"))
            if self.index == 0:
                self._tidy(owner, now)

    def _tidy(self, owner, now: float) -> None:
        """server0's door: roll back notes nobody claimed, forget the queries of a serving side gone."""
        for key, (_, arrived) in list(self._notes.items()):
            if now - arrived > PARTNER_SECONDS:
                del self._notes[key]
                asyncio.ensure_future(self._roll_back(key))
        for key, since in list(self._refused.items()):
            if now - since > 2 * PARTNER_SECONDS:  # its note never came: nothing to roll back
                del self._refused[key]
        for key, taken_by in list(self._taken.items()):
            if taken_by != owner and not self._silent:  # that side no longer serves: it will not answer
                del self._taken[key]
                asyncio.ensure_future(self._forget(key))

    # -- the clients' side -------------------------------------------------------------------------

    def _check(self, context, kind: str):
        """(token digest, client id, key, batch) of a well-formed, admitted call; else refuse."""
        token, parsed = self._parse(context, kind)
        self._admit(token, kind, parsed[3])
        return parsed

    def _admit(self, token: str, kind: str, batch: int) -> None:
        """Count the call against the token's limit, or refuse it: a query's images at server0's door only
        (server1's door counts none, its queries being bounded by AT_ONCE_PER_TOKEN and PARTNER_SECONDS);
        a greeting (HELLO) at each door, a goodbye or a question about costs at server0's, as one image."""
        cost = (batch if self.index == 0 else 0) if kind == "ask" else 1
        try:
            self.gate.admit(token, cost)
        except AdmissionError as error:
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None

    def _parse(self, context, kind: str):
        """The token and (token digest, client id, key, batch) of a well-formed call; else refuse."""
        metadata = dict(context.invocation_metadata())
        token, client_id = metadata.get("token", ""), metadata.get("client", "")
        nonce, batch = metadata.get("query", ""), metadata.get("batch", "")
        if not batch.isdigit() or (kind == "ask" and not 1 <= int(batch) <= MAX_BATCH_SIZE):
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the batch size must be 1 to {MAX_BATCH_SIZE}")
        if not CLIENT_ID.fullmatch(client_id):
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the client id must be 32 hexadecimal digits")
        if kind in ("ask", "done") and not NONCE.fullmatch(nonce):
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the query's nonce must be 16 hexadecimal digits")
        token_digest = digest(token)
        return token, (token_digest, client_id, query_key(token_digest, client_id, nonce), int(batch))

    async def _hello(self, request: bytes, context) -> bytes:
        try:
            self._check(context, "hello")
        except _Refusal as refusal:
            await context.abort(refusal.code, str(refusal))
        return b""

    async def _costs(self, request: bytes, context) -> bytes:
        """What the serving side published about the batch size the client announced (its padded size):
        the plaintext model's time on the model owner's machine and the bytes the servers send each other."""
        try:
            _, _, _, batch = self._check(context, "costs")
            if not 1 <= batch <= MAX_BATCH_SIZE:
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the batch size must be 1 to {MAX_BATCH_SIZE}")
            bucket = bucket_of(batch)
            text = await self._quick(self.servers.run, self.servers.published)
            published = json.loads(text.decode()).get(str(bucket))
            if published is None:
                raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION, NOT_PUBLISHED + f"nothing is published about "
                               f"batches of {batch} yet: the servers measure a batch size when they first answer "
                               "one. Ask a query of that size first.")
        except _Refusal as refusal:
            await context.abort(refusal.code, str(refusal))
        except tf.errors.OpError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the servers could not be read; ask again in a moment")
        return json.dumps(dict(published, batch=bucket)).encode()

    async def _done(self, request: bytes, context) -> bytes:
        """A client's goodbye: a request of no images, which the serving side reads as "this client is
        done" (serving.py). A serving side for one client (``serve(until_done=True)``) stops there; a
        class's goes on."""
        try:
            _, _, key, _ = self._check(context, "done")
            owner = await self._serving()
            await self._quick(self.servers.request, owner, [key], [0])
        except _Refusal as refusal:
            await context.abort(refusal.code, str(refusal))
        except tf.errors.OpError:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_SERVING + "the serving side stopped.")
        return b""

    async def _ask(self, request: bytes, context) -> bytes:
        entered = key = None
        noted = taken = False  # server0's door: server1's share is staged; the query went to the serving side
        try:
            owner = await self._serving()  # nobody serving: refused before anything is counted or stored
            token, (token_digest, client_id, key, batch) = self._parse(context, "ask")
            self._admit(token, "ask", batch)  # refused here, server1's share of it goes too (finally)
            if len(request) != batch * int(np.prod(IMAGE_SHAPE)) * WORD.itemsize:
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the share is not a batch of {batch} images of shape {IMAGE_SHAPE} in 64-bit words")
            entered = self._enter(token_digest, client_id)
            rows = np.frombuffer(request, dtype=WORD).reshape(batch, PIXELS)
            # Once staged, the share is not needed here: nothing this call leaves (a refusal's traceback,
            # kept until the garbage collector finds its cycle) may hold it.
            del request
            if self.index == 0:
                partner = await self._partner(key)
                noted = True
                if partner != batch:
                    raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"server1's door was sent a batch of {partner} images, this one {batch}")
                answer = self._wait_for(key, owner)
                try:
                    await self._stage((owner, key, batch, rows))  # and the request, in the same call
                except tf.errors.CancelledError:  # the request queue is closed
                    raise _serving_stopped("the serving side stopped") from None
                finally:
                    del rows
                taken = True
                self._taken[key] = owner
            else:
                answer = self._wait_for(key, owner)
                try:
                    await self._stage((owner, key, batch, rows))
                finally:
                    del rows
            outcome, found = await answer
            if outcome == NO_PARTNER:
                raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"server0's door did not receive the other "
                               f"share within {PARTNER_SECONDS:.0f} s; send one share to each door")
            if outcome != batch:
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the serving side refused it: the two shares are not a batch of {batch} images")
            return found.astype(WORD).tobytes()
        except _Refusal as refusal:
            why = refusal.code, str(refusal)
        except tf.errors.OpError as error:
            # TensorFlow's own words name the servers' internal addresses: they go to this server's
            # log, for its operator, not to the client.
            print(f"door: a query failed on the servers: {type(error).__name__}: "
                  f"{error.message.splitlines()[0][:300]}", file=sys.stderr, flush=True)
            why = (grpc.StatusCode.UNAVAILABLE, "the servers could not take this query (one of them may have "
                   "stopped); ask again in a moment")
        finally:
            if key is not None:
                self._waits.pop(key, None)
                self._note_waits.pop(key, None)
                if self.index == 0 and noted and not taken:  # both shares may be staged, with no request
                    asyncio.ensure_future(self._roll_back(key))
                elif self.index == 0 and not taken:
                    self._give_up(key)
            if entered is not None:
                self._leave(*entered)
        # Refused outside the except blocks: the abort's exception then keeps no refusal, and with it no
        # frame of this call (its traceback's), alive.
        await context.abort(*why)

    def _enter(self, token_digest: str, client_id: str):
        """Count a query in flight; refuse the token's third at once, or a client's second query."""
        if self._in_flight.get(token_digest, 0) >= AT_ONCE_PER_TOKEN:
            raise _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this token has {AT_ONCE_PER_TOKEN} queries waiting already; wait for them")
        if (token_digest, client_id) in self._busy:
            raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           "this client's previous query is still waiting for its answer: one at a time")
        self._in_flight[token_digest] = self._in_flight.get(token_digest, 0) + 1
        self._busy.add((token_digest, client_id))
        return token_digest, client_id

    def _leave(self, token_digest: str, client_id: str) -> None:
        self._in_flight[token_digest] -= 1
        if not self._in_flight[token_digest]:
            del self._in_flight[token_digest]
        self._busy.discard((token_digest, client_id))

    def _wait_for(self, key: int, owner: str) -> asyncio.Future:
        """Register this call for query ``key``'s answer, before the query can be answered."""
        future = asyncio.get_running_loop().create_future()
        self._waits[key] = _Wait(future, owner, time.monotonic() + LONGEST_WAIT)
        return future

    async def _partner(self, key: int) -> int:
        """server0's door: the batch size server1's door staged for query ``key``, once its note is in."""
        if key in self._notes:
            return self._notes.pop(key)[0]
        future = asyncio.get_running_loop().create_future()
        self._note_waits[key] = future
        try:
            return await asyncio.wait_for(future, PARTNER_SECONDS)
        except asyncio.TimeoutError:
            raise _Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           f"server1's door did not receive the other share within {PARTNER_SECONDS:.0f} s; "
                           "send one share to each door") from None

    def _give_up(self, key: int) -> None:
        """server0's door did not take query ``key``: server1's share of it goes, now or when its note comes."""
        if key in self._notes:
            del self._notes[key]
            asyncio.ensure_future(self._roll_back(key))
        else:
            self._refused[key] = time.monotonic()


class _Handlers(grpc.GenericRpcHandler):
    """Find the method of a call, unless its token was never admitted or was revoked.

    gRPC asks this before it reads the call's body: a call it gets no method for is refused there and
    then (as UNIMPLEMENTED, which the client reads as "not admitted"), so that strangers, however many
    and however slow, hold up nobody.
    """

    def __init__(self, gate: Gate, methods):
        self.gate, self.methods = gate, methods

    def service(self, handler_call_details):
        token = dict(handler_call_details.invocation_metadata).get("token", "")
        if not self.gate.knows(token):
            return None
        return self.methods.get(handler_call_details.method)
