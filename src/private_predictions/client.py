"""Client side: secret-share images on this device, query the served model, rebuild results here.

tf-encrypted's own ``QueueClient.receive_output`` asks the servers to reveal the
result, which puts the plaintext prediction on the servers. This client fetches the
two output shares instead and adds them up on its own device only.
"""
import time
import uuid
from pathlib import Path

import numpy as np

from ._tf import tf
from .cluster import ServerWatch, wait_for_servers
from .config import ClusterConfig
from .data import IMAGE_SHAPE
from .paths import CLUSTER_CONFIG_PATH
from .queues import ClientQueues, has_items, heartbeat_queue, request_queue, wait_until
from .serving import MAX_BATCH_SIZE, connect

LOCAL_DEVICE = "/job:localhost/replica:0/task:0/device:CPU:0"
SERVING_SILENCE = 5.0
RECONNECT_ADVICE = ("This query cannot finish. Once the servers run again (notebook 02), connect "
                    "again with PrivateClient.connect(): connecting works in the same kernel.")


class ServingStoppedError(RuntimeError):
    """The serving side stopped while this client waited for an answer."""


class InvalidImageError(ValueError):
    """The images cannot be sent: the message says what is wrong with them."""


def validate_images(images) -> np.ndarray:
    """Check a batch before anything leaves this device; return it as float64."""
    if not isinstance(images, np.ndarray):
        raise InvalidImageError(
            f"images must be a NumPy array, got {type(images).__name__}. "
            "Stack them first, e.g. np.stack(list_of_images)."
        )
    if images.dtype.kind not in "fiu":
        raise InvalidImageError(f"images must hold numbers, got dtype {images.dtype}")
    if images.ndim != 1 + len(IMAGE_SHAPE) or images.shape[1:] != IMAGE_SHAPE:
        raise InvalidImageError(
            f"images must have shape (batch, {', '.join(map(str, IMAGE_SHAPE))}), got {images.shape}. "
            "For one image x of shape (28, 28) use x.reshape(1, 28, 28, 1)."
        )
    if images.shape[0] == 0:
        raise InvalidImageError("the batch is empty: send at least one image")
    if images.shape[0] > MAX_BATCH_SIZE:
        raise InvalidImageError(
            f"a batch of {images.shape[0]} images is larger than the {MAX_BATCH_SIZE} "
            "the servers accept; split it into smaller batches"
        )
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise InvalidImageError("images contain NaN or infinite values")
    if images.min() < 0 or images.max() > 1:
        raise InvalidImageError(
            f"pixel values must lie in [0, 1], got [{images.min()}, {images.max()}]; "
            "divide 0-255 images by 255"
        )
    return images.astype(np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class PrivateClient:
    """Ask the served model for predictions without showing it the images."""

    def __init__(self, protocol, config: ClusterConfig):
        self.protocol = protocol
        self.config = config
        self.queues = ClientQueues(protocol, uuid.uuid4().hex)
        self.requests = request_queue(protocol)
        self.heartbeat = heartbeat_queue(protocol)
        self._beat_size, self._beat_seen, self._beat_changed_at = None, False, 0.0
        self.servers = ServerWatch(config, RECONNECT_ADVICE)

    @classmethod
    def connect(cls, config_path: Path = CLUSTER_CONFIG_PATH, timeout: float = 120.0):
        """Connect to the servers named in ``config_path``, waiting up to ``timeout`` s for them."""
        config = wait_for_servers(config_path, timeout)
        return cls(connect(config), config)

    def __repr__(self):
        return "PrivateClient(" + ", ".join(f"{n}={a}" for n, a in self.config.hosts.items()) + ")"

    @property
    def scaling_factor(self) -> int:
        return self.protocol.fixedpoint_config.scaling_factor

    def share(self, images: np.ndarray):
        """Split fixed-point encoded images into two random-looking shares, on this device.

        share0 is uniformly random; share1 = encoded - share0 (mod 2^64). Either one
        alone says nothing about the images.
        """
        encoded = np.round(images * self.scaling_factor).astype(np.int64)
        with tf.device(LOCAL_DEVICE):
            share0 = self.protocol.tensor_factory.sample_uniform(encoded.shape).value
            share1 = tf.constant(encoded) - share0
        return share0, share1

    def reconstruct(self, share0: np.ndarray, share1: np.ndarray) -> np.ndarray:
        """Add two shares (mod 2^64) and decode the fixed-point result."""
        return (share0 + share1) / self.scaling_factor

    def send(self, images: np.ndarray) -> None:
        share0, share1 = self.share(validate_images(images))
        with self.servers.explaining_failures():
            self.queues.inputs[0].enqueue(share0)
            self.queues.inputs[1].enqueue(share1)
            # The id goes last: when the serving side reads it, both shares are waiting.
            self.requests.enqueue(tf.constant(self.queues.client_id))

    def check_serving(self) -> None:
        """Raise ServingStoppedError if a heartbeat seen before has not moved for SERVING_SILENCE s."""
        size, now = self.heartbeat.size(), time.monotonic()
        if self._beat_size is not None and size != self._beat_size:
            # Armed only by a change: a queue left over from a dead serving side never changes.
            self._beat_seen, self._beat_changed_at = True, now
        self._beat_size = size
        if self._beat_seen and now - self._beat_changed_at > SERVING_SILENCE:
            raise ServingStoppedError(
                f"The serving side stopped: no heartbeat for {SERVING_SILENCE:.0f} s. Serve again (the "
                "serve cell of notebooks/02_secure_serving.ipynb, or the serve command), then send the "
                "query again; after running notebook 02 from the top, call PrivateClient.connect() first.")

    def _answer_ready(self) -> bool:
        # A dead serving process would otherwise go unnoticed here, like a dead server2.
        if self.servers.check_if_due():
            self.check_serving()
        return all(has_items(q) for q in self.queues.outputs)

    def receive(self, timeout: float = 120.0) -> np.ndarray:
        self._beat_changed_at = time.monotonic()
        with self.servers.explaining_failures():
            wait_until(self._answer_ready, timeout,
                       f"No answer from the served model within {timeout:.0f} s. Is "
                       "notebooks/02_secure_serving.ipynb serving requests?")
            # .numpy() copies each share to this device; they are added up only here.
            share0, share1 = (q.dequeue().numpy() for q in self.queues.outputs)
        return self.reconstruct(share0, share1)

    def predict_logits(self, images: np.ndarray, timeout: float = 120.0) -> np.ndarray:
        """Private logits for a batch of images of shape (n, 28, 28, 1) with values in [0, 1]."""
        self.send(images)
        try:
            return self.receive(timeout)
        except Exception:
            # The unanswered request may still be answered later; a fresh set of queues
            # makes sure that late answer can never be taken for the next query's.
            self.queues = ClientQueues(self.protocol, uuid.uuid4().hex)
            raise

    def close(self) -> None:
        """Delete this client's queues from the servers (if they are still up)."""
        for queue in self.queues.inputs + self.queues.outputs:
            try:
                queue.delete()
            except tf.errors.OpError:
                pass

    def predict(self, images: np.ndarray, timeout: float = 120.0) -> np.ndarray:
        """Private class probabilities: the softmax is applied here, on the client."""
        return softmax(self.predict_logits(images, timeout))
