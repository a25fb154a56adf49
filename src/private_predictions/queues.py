"""What the clients and the serving side share on the servers: queues, and who is serving.

Each client owns four queues, named by a random client id: its two input shares (one
on server0, one on server1) and the two shares of its answer. A serving side, while it
serves, owns a request queue on server0 of its own, which says whose input to take
next, and holds the *serving lease*: two variables on server0 naming it and the time
(server0's clock) of its last heartbeat. Clients read the lease to find the request
queue, and to notice within seconds when nobody serves any more.

A client puts its two shares in its queues and its request in the request queue in one
call, the request after both shares; the answer comes back through the client's own
queues, so no client can receive another's prediction, however many ask at once.

Every call here that may wait (a dequeue) is a traced function, and is cancelled by
closing its queue; eager remote ops are not used for that, because one eager call
that blocks on a server holds up every later call from this process to that server.
"""
import uuid
from typing import List, Tuple

from tensorflow.python.ops import gen_data_flow_ops, gen_resource_variable_ops

from ._tf import tf

PREFIX = "private-predictions"
CAPACITY = 64
# Larger batches gain little speed (a few per cent from 32 to 128) and cost the servers memory
# (up to 1.7 GiB each at 128, measured): 64 keeps a benchmark's processes under 6 GB together.
MAX_BATCH_SIZE = 64
# Every batch is padded up to one of these sizes, so the network is traced into a graph at most
# four times (tracing SecureNN takes seconds), whatever sizes clients send.
BATCH_BUCKETS = (1, 8, 32, MAX_BATCH_SIZE)
REQUEST_DTYPES = (tf.string, tf.int64)  # client id, batch size


def bucket_of(batch: int) -> int:
    """The size a batch of ``batch`` images is padded to, and computed at."""
    return next(size for size in BATCH_BUCKETS if size >= batch)


class SharedQueue:
    """A FIFO queue that lives on one server, shared by name between processes.

    tf.queue.FIFOQueue deletes the queue on the server as soon as the Python object
    holding it is collected, even when other processes still use it by name: one client
    that exits would delete a queue for everybody. This handle never deletes the queue;
    only :meth:`delete` does.
    """

    def __init__(self, device: str, shared_name: str, dtypes=(tf.int64,), capacity: int = CAPACITY):
        self.device, self.shared_name = device, shared_name
        with tf.device(device):
            # No fixed shape: one queue carries batches of any size.
            self.handle = gen_data_flow_ops.fifo_queue_v2(
                component_types=list(dtypes), capacity=capacity, shared_name=shared_name)

    def size(self) -> int:
        return int(_size(self.handle))

    def close(self) -> None:
        """Close the queue: a dequeue waiting on it fails at once, and so does every later enqueue."""
        _close(self.handle)

    def delete(self) -> None:
        with tf.device(self.device):
            tf.raw_ops.DestroyResourceOp(resource=self.handle, ignore_lookup_error=True)


# Traced once per process, for any queues: the handles are arguments, and each op runs
# on the server that holds the queue it is given. Each returns a value, so that an
# error (a closed queue, a lost server) is raised by the call itself.
@tf.function
def _size(handle):
    return gen_data_flow_ops.queue_size_v2(handle)


@tf.function
def _close(handle):
    gen_data_flow_ops.queue_close_v2(handle, cancel_pending_enqueues=True)
    return gen_data_flow_ops.queue_size_v2(handle)


def _dequeue_both(handle0, handle1):
    return (gen_data_flow_ops.queue_dequeue_v2(handle0, [tf.int64])[0],
            gen_data_flow_ops.queue_dequeue_v2(handle1, [tf.int64])[0])


_dequeue_pair = tf.function(_dequeue_both)


@tf.function
def _discard(handle):
    gen_data_flow_ops.queue_dequeue_v2(handle, [tf.int64])
    return gen_data_flow_ops.queue_size_v2(handle)


@tf.function
def _reject(output0, output1):
    # An empty vector where a batch of logits belongs: "refused", for the waiting client.
    refused = tf.zeros([0], tf.int64)
    return (gen_data_flow_ops.queue_enqueue_v2(output0, [refused]),
            gen_data_flow_ops.queue_enqueue_v2(output1, [refused]),
            gen_data_flow_ops.queue_size_v2(output0))[-1]


@tf.function
def _dequeue_request(handle):
    return tuple(gen_data_flow_ops.queue_dequeue_v2(handle, list(REQUEST_DTYPES)))


@tf.function
def _ask(input0, input1, output0, output1, requests, share0, share1, client_id, batch):
    enqueued = [gen_data_flow_ops.queue_enqueue_v2(input0, [share0]),
                gen_data_flow_ops.queue_enqueue_v2(input1, [share1])]
    # The request goes last: when the serving side reads it, both shares are waiting.
    with tf.control_dependencies(enqueued):
        requested = gen_data_flow_ops.queue_enqueue_v2(requests, [client_id, batch])
    # Sending and waiting for the answer in one call saves a round trip per query.
    with tf.control_dependencies([requested]):
        return _dequeue_both(output0, output1)


def _devices(protocol):
    return protocol.server_0.device_name, protocol.server_1.device_name


def _prefix(client_id: str) -> str:
    return f"{PREFIX}/clients/{client_id}"


def input_queues(protocol, client_id: str):
    """The queues where ``client_id`` puts its two input shares, one on server0 and one on server1."""
    return [SharedQueue(d, f"{_prefix(client_id)}/in-{i}") for i, d in enumerate(_devices(protocol))]


def output_queue(device: str, index: int, client_id: str) -> SharedQueue:
    """Where server ``index`` (on ``device``) puts its share of ``client_id``'s answer.

    Without a limit: answers nobody collects (a client that gave up) must never make the serving
    side wait, which would hold up every other client. They are few: each was a query that a
    door admitted and counted against its client's limit.
    """
    return SharedQueue(device, f"{_prefix(client_id)}/out-{index}", capacity=-1)


def arrival_queue(device0: str, client_id: str) -> SharedQueue:
    """On server0: server1's door says here that its share of ``client_id``'s query is in (door.py)."""
    return SharedQueue(device0, f"{_prefix(client_id)}/arrived")


class ClientQueues:
    """One client's queues: input and output shares, on server0 and server1."""

    def __init__(self, protocol, client_id: str = None):
        self.client_id = client_id or uuid.uuid4().hex
        self.inputs = input_queues(protocol, self.client_id)
        self.outputs = [output_queue(d, i, self.client_id) for i, d in enumerate(_devices(protocol))]

    def ask(self, requests: SharedQueue, share0, share1):
        """Send the shares and the request; return the two shares of the answer once both are there.

        Fails at once if ``requests`` is closed (its serving side stopped); cancel the wait
        for the answer with :meth:`close_outputs`.
        """
        batch = tf.constant(int(share0.shape[0]), tf.int64)
        return _ask(*(queue.handle for queue in self.inputs + self.outputs), requests.handle,
                    share0, share1, tf.constant(self.client_id), batch)

    def receive(self):
        """The two shares of the answer; waits until both are there (cancel with :meth:`close_outputs`)."""
        return _dequeue_pair(self.outputs[0].handle, self.outputs[1].handle)

    def discard_inputs(self) -> None:
        """Throw away the input shares waiting here (a request that is dropped or refused)."""
        for queue in self.inputs:
            if queue.size() > 0:
                _discard(queue.handle)

    def reject(self) -> None:
        _reject(self.outputs[0].handle, self.outputs[1].handle)

    def close_outputs(self) -> None:
        for queue in self.outputs:
            queue.close()

    def all(self):
        return self.inputs + self.outputs


def request_queue(protocol, session: str) -> SharedQueue:
    return SharedQueue(protocol.server_0.device_name, f"{PREFIX}/requests/{session}", REQUEST_DTYPES)


@tf.function
def _take_waiting(handle):
    # Only the serving side dequeues requests, so each of these finds one there: none waits.
    waiting = tf.minimum(gen_data_flow_ops.queue_size_v2(handle), CAPACITY)
    taken = [tf.TensorArray(dtype, size=waiting, element_shape=[]) for dtype in REQUEST_DTYPES]
    def take_one(index, client_ids, batches):
        client_id, batch = gen_data_flow_ops.queue_dequeue_v2(handle, list(REQUEST_DTYPES))
        return index + 1, client_ids.write(index, client_id), batches.write(index, batch)
    _, client_ids, batches = tf.while_loop(lambda index, *_: index < waiting, take_one, [0, *taken])
    return client_ids.stack(), batches.stack()


def take_waiting(requests: SharedQueue) -> List[Tuple[str, int]]:
    """Every request waiting in the queue now (up to its capacity), in order, without waiting for more.

    One call for many requests: a queue filled by something else is emptied in a few milliseconds.
    """
    client_ids, batches = _take_waiting(requests.handle)
    return [(client_id.decode(errors="replace"), int(batch))
            for client_id, batch in zip(client_ids.numpy(), batches.numpy())]


LOOKED_AT_TOGETHER = 16  # clients whose input queues one call looks at (traced once for this many)


@tf.function
def _both_filled(handles0, handles1):
    return tf.stack([tf.logical_and(gen_data_flow_ops.queue_size_v2(handle0) > 0,
                                    gen_data_flow_ops.queue_size_v2(handle1) > 0)
                     for handle0, handle1 in zip(handles0, handles1)])


def shares_waiting(protocol, client_ids: List[str]) -> List[bool]:
    """For each client, whether both its input queues hold a share: a quick look at many clients at once.

    Far cheaper than a secure computation, so that requests with nothing behind them, however
    many, cost the serving side little.
    """
    found = []
    for start in range(0, len(client_ids), LOOKED_AT_TOGETHER):
        chunk = client_ids[start:start + LOOKED_AT_TOGETHER]
        queues = [input_queues(protocol, client_id) for client_id in chunk]
        queues += [queues[0]] * (LOOKED_AT_TOGETHER - len(queues))  # always as many: one trace
        filled = _both_filled([q[0].handle for q in queues], [q[1].handle for q in queues])
        found += [bool(both) for both in filled.numpy()[:len(chunk)]]
    return found


def take_request(requests: SharedQueue) -> Tuple[str, int]:
    """The next request: (client id, batch size). Waits while there is none; cancel by closing the queue."""
    client_id, batch = _dequeue_request(requests.handle)
    return client_id.numpy().decode(errors="replace"), int(batch)


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
