"""The queues through which clients and the serving side exchange secret shares.

Each client owns a pair of queues on server0 and server1 (its input shares and its
output shares), named by a random client id. A shared request queue on server0 only
says whose input to take next. A client enqueues its two input shares first and its
id last, so when the serving side sees an id, both shares are already waiting, and
the result goes back through that client's own queues: no client can receive
another's prediction, however many query at once.
"""
import time

from tensorflow.python.ops import gen_data_flow_ops

from ._tf import tf

REQUEST_QUEUE = "private-predictions/requests"
HEARTBEAT_QUEUE = "private-predictions/heartbeat"
HEARTBEAT_INTERVAL = 0.5
CAPACITY = 64
# Each poll is one round trip to a server (about 1 ms here); a longer pause would
# add up to its length to every query's latency.
MAX_POLL_PAUSE = 0.002


class SharedQueue:
    """A FIFO queue that lives on one server, shared by name between processes.

    tf.queue.FIFOQueue (and tf-encrypted's copy of it) deletes the queue on the server
    as soon as the Python object holding it is collected, even when other processes
    still use it by name: one client that exits would delete the request queue for
    everybody. This handle never deletes the queue; only :meth:`delete` does.
    """

    def __init__(self, device: str, shared_name: str, dtype=tf.int64):
        self.device, self.shared_name, self.dtype = device, shared_name, dtype
        with tf.device(device):
            # No fixed shape: one queue carries batches of any size.
            self.handle = gen_data_flow_ops.fifo_queue_v2(
                component_types=[dtype], capacity=CAPACITY, shared_name=shared_name)

    def enqueue(self, value) -> None:
        with tf.device(self.device):
            gen_data_flow_ops.queue_enqueue_v2(self.handle, [value])

    def dequeue(self):
        """Take the oldest item; blocks while the queue is empty, so check :meth:`size` first."""
        with tf.device(self.device):
            return gen_data_flow_ops.queue_dequeue_v2(self.handle, [self.dtype])[0]

    def size(self) -> int:
        with tf.device(self.device):
            return int(gen_data_flow_ops.queue_size_v2(self.handle))

    def delete(self) -> None:
        with tf.device(self.device):
            tf.raw_ops.DestroyResourceOp(resource=self.handle, ignore_lookup_error=True)


def request_queue(protocol) -> SharedQueue:
    return SharedQueue(protocol.server_0.device_name, REQUEST_QUEUE, dtype=tf.string)


def heartbeat_queue(protocol) -> SharedQueue:
    """Its size flips between 1 and 2 every HEARTBEAT_INTERVAL while ``SecureModel.serve`` runs.

    A queue's size can be read without taking anything out, so every client can watch
    the same heartbeat and notice within seconds when the serving side is gone.
    """
    return SharedQueue(protocol.server_0.device_name, HEARTBEAT_QUEUE)


class ClientQueues:
    """One client's queues: input and output shares, on server0 and server1."""

    def __init__(self, protocol, client_id: str):
        self.client_id = client_id
        devices = (protocol.server_0.device_name, protocol.server_1.device_name)
        prefix = f"private-predictions/{client_id}"
        self.inputs = [SharedQueue(d, f"{prefix}/in-{i}") for i, d in enumerate(devices)]
        self.outputs = [SharedQueue(d, f"{prefix}/out-{i}") for i, d in enumerate(devices)]


def wait_until(condition, timeout: float, message: str, max_pause: float = MAX_POLL_PAUSE) -> None:
    """Poll ``condition`` with a growing pause; raise TimeoutError(message) after ``timeout`` s.

    Queue ops cannot time out in eager TensorFlow, so every wait here polls sizes
    instead of blocking in a dequeue that might never return.
    """
    deadline = time.monotonic() + timeout
    pause = 1e-4
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        time.sleep(pause)
        pause = min(pause * 2, max_pause)


def has_items(queue: SharedQueue) -> bool:
    return queue.size() > 0
