"""What the doors and the serving side share on the servers: tables, queues, and who is serving.

A query is named by a *key*, a number both doors derive from the client's token, the id it drew and the
random nonce of the query (``query_key``). On server0 and on server1, three tables hold what is in
flight by key (``ServerTables``): the rows of each query's share (row key = key * MAX_BATCH_SIZE + row),
its batch size (the share is complete), and the rows of that server's share of the answer. Nothing in a
table waits in line: a share without its twin, or an answer nobody collects, is removed by key, exactly.

Three queues carry keys, never shares: server1's door says on server0 that its share of a query is in
(``arrivals``); server0's door then puts the query in the request queue of the side that serves
(``request_queue``, one per serving session); the serving side says on each server which queries it has
answered or refused (``answered``). A serving side, while it serves, holds the *serving lease*: two
variables on server0 naming it and the time (server0's clock) of its last heartbeat, which the doors read
to find the request queue and to notice within seconds when nobody serves any more.

Every call here that may wait (a dequeue) is a traced function, and is cancelled by closing its queue;
eager remote ops are not used for that, because one eager call that blocks on a server holds up every
later call from this process to that server.
"""
import hashlib
from typing import List, Tuple

from tensorflow.python.ops import gen_data_flow_ops, gen_lookup_ops, gen_resource_variable_ops

from ._tf import tf

PREFIX = "private-predictions"
CAPACITY = 256  # requests waiting for the serving side; a door that finds the queue full refuses
# Larger batches gain little speed (a few per cent from 32 to 128) and cost the servers memory
# (up to 1.7 GiB each at 128, measured): 64 keeps a benchmark's processes under 6 GB together.
MAX_BATCH_SIZE = 64
# Every batch is padded up to one of these sizes, so the network is traced into a graph at most
# four times (tracing SecureNN takes seconds), whatever sizes clients send.
BATCH_BUCKETS = (1, 8, 32, MAX_BATCH_SIZE)
PIXELS, CLASSES = 28 * 28, 10  # a row of a share, a row of an answer
KEY_BITS = 56  # a query's key; its rows' keys (key * 64 + row) stay below 2^62
# What the answered queue says instead of a batch size when a query got no answer:
REFUSED = -1  # the serving side found no complete shares, or a malformed query
NO_PARTNER = -2  # server0's door never got the query's other share: server1's share was removed


def bucket_of(batch: int) -> int:
    """The size a batch of ``batch`` images is padded to, and computed at."""
    return next(size for size in BATCH_BUCKETS if size >= batch)


def query_key(token_digest: str, client_id: str, nonce: str) -> int:
    """The key of one query: the same at both doors, and no client can make another token's key."""
    return int(hashlib.sha256(f"{token_digest}:{client_id}:{nonce}".encode()).hexdigest()[:KEY_BITS // 4], 16)


def row_keys(keys, batches):
    """The rows' keys of queries ``keys`` of ``batches`` images each, in order (a graph op)."""
    starts = tf.repeat(keys * MAX_BATCH_SIZE, batches)
    firsts = tf.repeat(tf.cumsum(batches, exclusive=True), batches)
    return starts + tf.range(tf.reduce_sum(batches), dtype=tf.int64) - firsts


def all_rows(keys):
    """Every row key a query of ``keys`` may have used, whatever its batch (a graph op)."""
    return tf.reshape(keys[:, None] * MAX_BATCH_SIZE + tf.range(MAX_BATCH_SIZE, dtype=tf.int64)[None, :], [-1])


class ServerTables:
    """One server's tables (server0's or server1's), as handles: made where their device is."""

    def __init__(self, device: str, index: int):
        self.device, self.index = device, index
        with tf.device(device):
            name = f"{PREFIX}/server{index}"
            self.shares = gen_lookup_ops.mutable_hash_table_of_tensors_v2(
                key_dtype=tf.int64, value_dtype=tf.int64, value_shape=[PIXELS], shared_name=f"{name}/shares")
            self.batches = gen_lookup_ops.mutable_hash_table_v2(
                key_dtype=tf.int64, value_dtype=tf.int64, shared_name=f"{name}/batches")
            self.answers = gen_lookup_ops.mutable_hash_table_of_tensors_v2(
                key_dtype=tf.int64, value_dtype=tf.int64, value_shape=[CLASSES], shared_name=f"{name}/answers")
            self.answered = gen_data_flow_ops.fifo_queue_v2(
                component_types=[tf.int64, tf.int64], shapes=[[], []], capacity=-1, shared_name=f"{name}/answered")

    def handles(self):
        return self.shares, self.batches, self.answers, self.answered

    # Graph ops on these tables (each made on the table's own device by the caller's tf.device scope).

    def put_shares(self, keys, batches, rows):
        """Stage queries' shares (their rows one after another): the rows first, then the batch sizes, which say
        the shares are complete."""
        inserted = gen_lookup_ops.lookup_table_insert_v2(self.shares, row_keys(keys, batches), rows)
        with tf.control_dependencies([inserted]):
            return gen_lookup_ops.lookup_table_insert_v2(self.batches, keys, batches)

    def forget(self, keys):
        """Remove everything of queries ``keys`` from this server: shares, batch sizes, answers."""
        return tf.group(gen_lookup_ops.lookup_table_remove_v2(self.shares, all_rows(keys)),
                        gen_lookup_ops.lookup_table_remove_v2(self.batches, keys),
                        gen_lookup_ops.lookup_table_remove_v2(self.answers, all_rows(keys)))

    def take_answers(self, keys, batches):
        """This server's shares of the answers of queries ``keys`` (of ``batches`` images each), their rows in
        order, removed from its table."""
        keys = row_keys(keys, batches)
        rows = gen_lookup_ops.lookup_table_find_v2(self.answers, keys, tf.zeros([CLASSES], tf.int64))
        rows.set_shape([None, CLASSES])
        with tf.control_dependencies([rows]):
            removed = gen_lookup_ops.lookup_table_remove_v2(self.answers, keys)
        with tf.control_dependencies([removed]):
            return tf.identity(rows)

    def notices(self):
        """What this server's door was told (keys, outcomes), with the answers of the queries answered (their rows
        in order, removed from the table): waits for one notice, then takes all the others there. One call, not a
        second one for the answers: a query's answer is on its way to the client one call sooner."""
        keys, outcomes = all_waiting(self.answered)
        return keys, outcomes, self.take_answers(keys, tf.maximum(outcomes, 0))  # no rows for a refusal

    def say(self, keys, outcomes):
        """Tell this server's door which queries were answered (their batch size) or not (REFUSED, ...)."""
        return gen_data_flow_ops.queue_enqueue_many_v2(self.answered, [keys, outcomes])

    def present(self, keys):
        """The batch size staged for each of ``keys`` on this server, or -1."""
        found = gen_lookup_ops.lookup_table_find_v2(self.batches, keys, tf.constant(-1, tf.int64))
        found.set_shape(keys.shape)  # what the table's op does not say
        return found


def server_tables(protocol) -> List[ServerTables]:
    return [ServerTables(server.device_name, index)
            for index, server in enumerate((protocol.server_0, protocol.server_1))]


def all_waiting(queue):
    """Two vectors, the pairs in ``queue`` (of two int64 scalars): waits for one pair, then takes every pair there
    without waiting. For a queue only one caller dequeues from: then what the size says is there, is. A class's
    notices come in dozens at once, and one call for all of them costs what one call for each would cost once."""
    dtypes = [tf.int64, tf.int64]
    first = gen_data_flow_ops.queue_dequeue_v2(queue, dtypes)
    with tf.control_dependencies(first):
        rest = _dequeue_waiting(queue, dtypes)
    return [tf.concat([one[None], more], 0) for one, more in zip(first, rest)]


def _dequeue_waiting(queue, dtypes, most=None):
    """What waits in ``queue`` now (at most ``most``), without waiting for more: for a queue that only one
    caller dequeues from, so that what its size says is there, is (a graph op)."""
    waiting = gen_data_flow_ops.queue_size_v2(queue)
    if most is not None:
        waiting = tf.minimum(waiting, most)
    return gen_data_flow_ops.queue_dequeue_many_v2(queue, waiting, list(dtypes))


def arrivals_queue(device0: str):
    """On server0: server1's door says here (key, batch) once its share of a query is in (door.py)."""
    with tf.device(device0):
        return gen_data_flow_ops.fifo_queue_v2(component_types=[tf.int64, tf.int64], shapes=[[], []],
                                               capacity=-1, shared_name=f"{PREFIX}/arrivals")


REQUEST_DTYPES = (tf.int64, tf.int64)  # a query's key, its batch size (0: the client's goodbye)


class SharedQueue:
    """A FIFO queue that lives on one server, shared by name between processes.

    tf.queue.FIFOQueue deletes the queue on the server as soon as the Python object
    holding it is collected, even when other processes still use it by name: one client
    that exits would delete a queue for everybody. This handle never deletes the queue.
    """

    def __init__(self, device: str, shared_name: str, dtypes=REQUEST_DTYPES, capacity: int = CAPACITY):
        self.device, self.shared_name = device, shared_name
        with tf.device(device):
            self.handle = gen_data_flow_ops.fifo_queue_v2(
                component_types=list(dtypes), shapes=[[]] * len(dtypes), capacity=capacity,
                shared_name=shared_name)

    def size(self) -> int:
        return int(_size(self.handle))

    def close(self) -> None:
        """Close the queue: a dequeue waiting on it fails at once, and so does every later enqueue."""
        _close(self.handle)


# Traced once per process, for any queue: the handles are arguments, and each op runs on the server
# that holds the queue it is given. Each returns a value, so that an error (a closed queue, a lost
# server) is raised by the call itself.
@tf.function
def _size(handle):
    return gen_data_flow_ops.queue_size_v2(handle)


@tf.function
def _close(handle):
    gen_data_flow_ops.queue_close_v2(handle, cancel_pending_enqueues=True)
    return gen_data_flow_ops.queue_size_v2(handle)


def request_queue(protocol, session: str) -> SharedQueue:
    """The request queue of serving session ``session``, on server0: (key, batch) of each query."""
    return SharedQueue(protocol.server_0.device_name, f"{PREFIX}/requests/{session}")


@tf.function
def _take_waiting(handle):
    # Only the serving side dequeues requests, so none of these waits.
    return tuple(_dequeue_waiting(handle, REQUEST_DTYPES, CAPACITY))


def take_waiting(requests: SharedQueue) -> List[Tuple[int, int]]:
    """Every request waiting in the queue now, in order, without waiting for more: one call for many."""
    keys, batches = _take_waiting(requests.handle)
    return list(zip(keys.numpy().tolist(), batches.numpy().tolist()))


NOBODY = ""
# A serving side whose lease was not renewed for this long is gone.
SERVING_SILENCE = 5.0


def someone_serves(owner: str, age: float) -> bool:
    """Whether a lease read as (owner, age) names a serving side that is still there."""
    return owner != NOBODY and age <= SERVING_SILENCE


class ServingLease:
    """Who serves this cluster, and how long ago it last said so, kept on server0.

    Ages are measured on server0's clock only, so machines with different clocks agree.
    """

    def __init__(self, device: str):
        """``device``: server0's, e.g. ``protocol.server_0.device_name``."""
        with tf.device(device):
            self._owner = gen_resource_variable_ops.var_handle_op(
                dtype=tf.string, shape=[], shared_name=f"{PREFIX}/serving/owner")
            self._beat = gen_resource_variable_ops.var_handle_op(
                dtype=tf.float64, shape=[], shared_name=f"{PREFIX}/serving/beat")
        self._read = tf.function(self._read_on_server)
        self._claim = tf.function(self._claim_on_server)
        self._renew = tf.function(self._renew_on_server)
        self._device = device

    def _current(self):
        initialized = gen_resource_variable_ops.var_is_initialized_op(self._owner)
        owner = tf.cond(initialized, lambda: gen_resource_variable_ops.read_variable_op(self._owner, tf.string),
                        lambda: tf.constant(NOBODY))
        beat = tf.cond(initialized, lambda: gen_resource_variable_ops.read_variable_op(self._beat, tf.float64),
                       lambda: tf.constant(0.0, tf.float64))
        return owner, tf.timestamp() - beat

    def _read_on_server(self):
        with tf.device(self._device):
            return self._current()

    def _write(self, owner, beat):
        return tf.group(gen_resource_variable_ops.assign_variable_op(self._owner, owner),
                        gen_resource_variable_ops.assign_variable_op(self._beat, beat))

    def _claim_on_server(self, me, stale_after):
        with tf.device(self._device):
            owner, age = self._current()
            take = tf.reduce_any([tf.equal(owner, NOBODY), age > stale_after, tf.equal(owner, me)])
            written = tf.cond(take, lambda: self._write(me, tf.timestamp()), tf.no_op)
            with tf.control_dependencies([written]):
                return tf.identity(owner), tf.identity(age)

    def _renew_on_server(self, me, release):
        """Beat if the lease is still ``me``'s (or give it up); return the owner found."""
        with tf.device(self._device):
            owner, _ = self._current()
            new_owner = tf.where(release, tf.constant(NOBODY), me)
            written = tf.cond(tf.equal(owner, me), lambda: self._write(new_owner, tf.timestamp()), tf.no_op)
            with tf.control_dependencies([written]):
                return tf.identity(owner)

    def read(self) -> Tuple[str, float]:
        """(session of the serving side, or "" if none; seconds since its last beat)."""
        owner, age = self._read()
        return owner.numpy().decode(), float(age)

    def claim(self, me: str, stale_after: float) -> Tuple[str, float]:
        """Take the lease unless a serving side beat within ``stale_after`` s; return what was there."""
        owner, age = self._claim(tf.constant(me), tf.constant(stale_after, tf.float64))
        return owner.numpy().decode(), float(age)

    def renew(self, me: str) -> str:
        return self._renew(tf.constant(me), tf.constant(False)).numpy().decode()

    def release(self, me: str) -> None:
        self._renew(tf.constant(me), tf.constant(True))


class PublishedCosts:
    """What the serving side publishes for clients, on server0: for each batch size it has built its
    computation for, the plaintext model's time on the model owner's machine and the bytes the servers
    send each other (a JSON text). server0's door hands it to admitted clients."""

    def __init__(self, device: str):
        with tf.device(device):
            self._text = gen_resource_variable_ops.var_handle_op(
                dtype=tf.string, shape=[], shared_name=f"{PREFIX}/serving/costs")
        self._device = device
        self._write = tf.function(self._write_on_server)

    def _write_on_server(self, text):
        with tf.device(self._device):
            written = gen_resource_variable_ops.assign_variable_op(self._text, text)
            with tf.control_dependencies([written]):
                return tf.constant(True)

    def current(self):
        """The text as a graph op (for the door's session): "{}" until something is published."""
        initialized = gen_resource_variable_ops.var_is_initialized_op(self._text)
        return tf.cond(initialized, lambda: gen_resource_variable_ops.read_variable_op(self._text, tf.string),
                       lambda: tf.constant("{}"))

    def write(self, text: str) -> None:
        self._write(tf.constant(text))
