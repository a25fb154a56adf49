"""A client inside the servers' runtime: the serving side's own test client, and the benchmark's yardstick.

tf-encrypted's own ``QueueClient.receive_output`` asks the servers to reveal the
result, which puts the plaintext prediction on the servers. This client fetches the
two output shares instead and adds them up on its own device only.
"""
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ._tf import tf
from .cluster import wait_for_servers
from .client import RequestRefusedError, ServingStoppedError, softmax, validate_images
from .config import ClusterConfig
from .data import IMAGE_SHAPE
from .paths import CLUSTER_CONFIG_PATH
from .protocol import LOCAL_DEVICE, connect
from .queues import (MAX_BATCH_SIZE, NOBODY, SERVING_SILENCE, ClientQueues, ServingLease, request_queue,
                     someone_serves)
from .waiting import BackgroundCall, bounded, wait_for
from .watch import ServerWatch

QUICK_CALL_SECONDS = 10.0
RECONNECT_ADVICE = ("This query cannot finish. Once the servers run again (notebook 02), connect "
                    "again with RuntimeClient.connect(): connecting works in the same kernel.")
SERVE_AGAIN = ("Serve again (the serve cell of notebook 02, or the serve command), "
               "then send the query again; after running notebook 02 from the top, call "
               "RuntimeClient.connect() first.")


class RuntimeClient:
    """A client inside the servers' TensorFlow runtime: for the serving side's tests and the benchmark.

    It can reach the runtime only from where the runtime listens (loopback, or the servers'
    private network): learners and classes use the doors (client.py) instead.
    """

    def __init__(self, protocol, config: ClusterConfig, say=print):
        self.protocol = protocol
        self.config = config
        self.say = say
        self.servers = ServerWatch(config, RECONNECT_ADVICE)
        self.lease = self._quick(ServingLease, protocol.server_0.device_name)
        self.queues: Optional[ClientQueues] = None  # made when first needed, fresh after a failure
        self._session, self._requests = NOBODY, None

    @classmethod
    def connect(cls, config_path: Path = CLUSTER_CONFIG_PATH, timeout: float = 120.0, say=print):
        """Connect to the servers named in ``config_path``, waiting up to ``timeout`` s for them."""
        config = wait_for_servers(config_path, timeout, say=say)
        return cls(connect(config), config, say)

    def __repr__(self):
        return "RuntimeClient(" + ", ".join(f"{n}={a}" for n, a in self.config.hosts.items()) + ")"

    def _quick(self, function, *args):
        return bounded(function, *args, timeout=QUICK_CALL_SECONDS, watches=[self.servers.check],
                       message=f"The servers did not answer within {QUICK_CALL_SECONDS:.0f} s. {RECONNECT_ADVICE}")

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

    def _serving_side(self, deadline: float) -> None:
        """Find the request queue of the side that serves now, waiting for one until ``deadline``."""
        owner, age = self._quick(self.lease.read)
        if someone_serves(owner, age):
            if owner != self._session or self._requests is None:
                self._requests = self._quick(request_queue, self.protocol, owner)
                self._session = owner
            return
        if self._session != NOBODY:
            # It served this client before: no one waits two minutes to learn that it stopped.
            self._session, self._requests = NOBODY, None
            raise ServingStoppedError(f"The serving side stopped after its last answer. {SERVE_AGAIN}")
        self.say(f"Waiting up to {max(0, deadline - time.monotonic()):.0f} s for the model to be served "
                 "(the serve cell of notebook 02)...")
        while True:
            time.sleep(0.1)
            if someone_serves(*self._quick(self.lease.read)):
                return self._serving_side(deadline)
            if time.monotonic() > deadline:
                raise TimeoutError("No answer from the served model: nothing served the servers in time. "
                                   "Is notebook 02 serving requests (its serve cell)?")

    def check_serving(self) -> None:
        """Raise ServingStoppedError if the side this client asked no longer serves."""
        owner, age = self._quick(self.lease.read)
        if owner != self._session or age > SERVING_SILENCE:
            self._requests = None  # the next query looks for the side that serves then
            what = ("The serving side stopped" if owner in (NOBODY, self._session)
                    else "Another serving side replaced the one this client asked")
            raise ServingStoppedError(f"{what} before answering. {SERVE_AGAIN}")

    def predict_logits(self, images: np.ndarray, timeout: float = 120.0) -> np.ndarray:
        """Private logits for a batch of images of shape (n, 28, 28, 1) with values in [0, 1]."""
        share0, share1 = self.share(validate_images(images, IMAGE_SHAPE, MAX_BATCH_SIZE))
        deadline = time.monotonic() + timeout
        try:
            output0, output1 = self._ask(share0, share1, deadline, timeout)
        except tf.errors.OpError as error:
            self._abandon_queues()
            raise self.servers.explain(error) from None
        except BaseException:
            self._abandon_queues()
            raise
        # .numpy() copies each share to this device; they are added up only here.
        output0, output1 = output0.numpy(), output1.numpy()
        if output0.ndim == 1:
            raise RequestRefusedError("The serving side refused this request: the shares it found in "
                                      "this client's queues were not a batch of images.")
        return self.reconstruct(output0, output1)

    def _ask(self, share0, share1, deadline: float, timeout: float):
        """Send the shares and the request to the side that serves now; wait for the answer's shares.

        The serving side found before is asked again without looking it up; if it has
        stopped, its request queue is closed and the call fails at once: then look again.
        """
        if self._requests is None:
            self._serving_side(deadline)
        try:
            return self._ask_once(share0, share1, deadline, timeout)
        except tf.errors.OpError:
            self.servers.check()
            self._abandon_queues()  # the shares may be in them, with no request behind them
        session = self._session
        self._serving_side(deadline)  # raises ServingStoppedError if nothing serves now
        if self._session == session:
            raise ServingStoppedError(f"The serving side stopped before taking the query. {SERVE_AGAIN}")
        return self._ask_once(share0, share1, deadline, timeout)

    def _ask_once(self, share0, share1, deadline: float, timeout: float):
        if self.queues is None:
            self.queues = self._quick(ClientQueues, self.protocol)
        call = BackgroundCall(self.queues.ask, self._requests, share0, share1, name="waiting for an answer")
        return wait_for(call, max(0.0, deadline - time.monotonic()),
                        f"No answer from the served model within {timeout:.0f} s. Is "
                        "notebook 02 serving requests (its serve cell)?",
                        watches=[self.servers.check, self.check_serving])

    def _abandon_queues(self) -> None:
        """Leave this client's queues after a failed query, without a call that could fail anew.

        Their late answer must never be taken for the next query's, so the next query uses
        fresh queues. Closing them ends a dequeue still waiting there, if the server is up.
        The serving side may have changed too (it stopped, or another one took over).
        """
        queues, self.queues = self.queues, None
        self._requests = None  # and the next query asks the lease who serves now
        if queues is not None:
            try:
                bounded(queues.close_outputs, timeout=1.0, message="")
            except Exception:  # noqa: BLE001  (the query's own error is the one to show)
                pass

    def close(self) -> None:
        """Delete this client's queues from the servers (if they are still up)."""
        if self.queues is not None:
            for queue in self.queues.all():
                try:
                    bounded(queue.delete, timeout=1.0, message="")
                except Exception:  # noqa: BLE001
                    pass

    def predict(self, images: np.ndarray, timeout: float = 120.0) -> np.ndarray:
        """Private class probabilities: the softmax is applied here, on the client."""
        return softmax(self.predict_logits(images, timeout))
