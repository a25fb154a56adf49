"""The queues through which clients and the serving side exchange secret shares.

Each client owns a pair of queues on server0 and server1 (its input shares and its
output shares), named by a random client id. A shared request queue on server0 only
says whose input to take next. A client enqueues its two input shares first and its
id last, so when the serving side sees an id, both shares are already waiting, and
the result goes back through that client's own queues: no client can receive
another's prediction, however many query at once.
"""
import time

from ._tf import tf
from tf_encrypted.queue.fifo import TFFIFOQueue

REQUEST_QUEUE = "private-predictions/requests"
CAPACITY = 64


def _queue(device: str, shared_name: str, dtype=tf.int64) -> TFFIFOQueue:
    # No fixed shape: one queue carries batches of any size.
    with tf.device(device):
        return TFFIFOQueue(capacity=CAPACITY, dtypes=[dtype], shared_name=shared_name)


def request_queue(protocol) -> TFFIFOQueue:
    return _queue(protocol.server_0.device_name, REQUEST_QUEUE, dtype=tf.string)


class ClientQueues:
    """One client's queues: input and output shares, on server0 and server1."""

    def __init__(self, protocol, client_id: str):
        self.client_id = client_id
        devices = (protocol.server_0.device_name, protocol.server_1.device_name)
        prefix = f"private-predictions/{client_id}"
        self.inputs = [_queue(d, f"{prefix}/in-{i}") for i, d in enumerate(devices)]
        self.outputs = [_queue(d, f"{prefix}/out-{i}") for i, d in enumerate(devices)]


def wait_until(condition, timeout: float, message: str) -> None:
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
        pause = min(pause * 2, 0.02)


def has_items(queue) -> bool:
    return int(queue.size()) > 0
