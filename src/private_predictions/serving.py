"""Server side: secret-share a Keras model across the cluster and serve private queries."""
import gc
import threading
from typing import Callable, Dict, Optional

from ._tf import tf, tfe
from tf_encrypted.tensor.fixed import FixedpointConfig

from .cluster import ServerWatch
from .config import ClusterConfig
from .queues import (HEARTBEAT_INTERVAL, ClientQueues, has_items, heartbeat_queue,
                     request_queue, wait_until)

MAX_BATCH_SIZE = 128
# Every batch is padded up to one of these sizes, so the network is traced into a graph
# at most four times (tracing SecureNN takes seconds), whatever sizes clients send.
BATCH_BUCKETS = (1, 8, 32, MAX_BATCH_SIZE)
INPUT_GRACE_SECONDS = 5.0
RESTART_ADVICE = ("Serving cannot go on: the servers' state, the model's shares included, is lost. "
                  "Start the servers and share the model again (notebook 02 from the top, or "
                  "restart the three players and the serve command).")
# Numbers are encoded as round(x * 3^10) in 64-bit integers: 9 times finer than tf-encrypted's
# default 3^8, which left logit errors of 0.05. The price is a smaller integer part, |x| <
# 3^5 = 243; the largest value inside this network on 30,000 MNIST images is 33. (Base 3
# because interactive truncation divides by the scaling factor modulo 2^64; the 20-bit
# gap keeps the truncation mask statistically hiding.)
FIXED_POINT = FixedpointConfig(
    scaling_base=3, nbits=64, precision_integral=5, precision_fractional=10,
    matmul_threshold=256, truncation_gap=20, use_noninteractive_truncation=False,
)


def connect(config: ClusterConfig):
    """Point TF Encrypted at the cluster's three servers and return SecureNN over them."""
    tfe.set_config(config.tfe_config())
    config.connect_this_process()
    protocol = tfe.protocol.SecureNN(fixedpoint_config=FIXED_POINT)
    tfe.set_protocol(protocol)
    return protocol


class SecureModel:
    """A Keras model whose weights exist only as secret shares on the servers."""

    def __init__(self, protocol, private_model):
        self.protocol = protocol
        self.private_model = private_model
        self._clients: Dict[str, ClientQueues] = {}
        self._requests = request_queue(protocol)
        self.servers = ServerWatch(ClusterConfig(dict(tfe.get_config().hostmap)), RESTART_ADVICE)
        self._predict_on_shares = tf.function(self._predict_on_shares_eagerly)
        self._stopped = threading.Event()
        self._serving = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_queue(protocol),),
                                           name="serving heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self, queue) -> None:
        # A thread of its own, so the heartbeat goes on while a long batch is computed.
        while not self._stopped.wait(HEARTBEAT_INTERVAL):
            if not self._serving.is_set():
                continue  # a client waiting now is told that nothing serves it
            try:
                if queue.size() >= 2:
                    queue.dequeue()
                else:
                    queue.enqueue(tf.constant(0, tf.int64))
            except tf.errors.OpError:
                return  # the servers are gone

    def _predict_on_shares_eagerly(self, share0, share1):
        protocol = self.protocol
        factory = protocol.tensor_factory
        with tf.device(protocol.server_0.device_name):
            x0 = factory.tensor(tf.identity(share0))
        with tf.device(protocol.server_1.device_name):
            x1 = factory.tensor(tf.identity(share1))
        x = tfe.protocol.pond.PondPrivateTensor(protocol, x0, x1, True)
        y0, y1 = self.private_model(x).unwrapped
        return y0.value, y1.value

    def weight_shares(self, layer: int = 0):
        """What server0 and server1 hold of one layer's kernel, as fixed-point integers.

        For teaching only: fetching both shares to one place is exactly what the
        protocol never does with a client's data.
        """
        share0, share1 = self.private_model.layers[layer].weights[0].unwrapped
        return share0.read_value().value.numpy(), share1.read_value().value.numpy()

    def _queues_of(self, client_id: str) -> ClientQueues:
        if client_id not in self._clients:
            self._clients[client_id] = ClientQueues(self.protocol, client_id)
        return self._clients[client_id]

    def serve_one(self, timeout: float = 120.0) -> int:
        """Wait for one request, answer it on the shares, and return its batch size.

        Raises ServerUnreachableError, naming the server, as soon as one is gone.
        """
        with self.servers.explaining_failures():
            return self._serve_one(timeout)

    def _request_waiting(self) -> bool:
        # Waiting touches server0 only: a dead server1 or server2 must not go unnoticed.
        self.servers.check_if_due()
        return has_items(self._requests)

    def _serve_one(self, timeout: float) -> int:
        wait_until(self._request_waiting, timeout,
                   f"No private query arrived within {timeout:.0f} s. Run the client "
                   "(notebooks/03_private_prediction.ipynb) while this one serves.")
        client_id = self._requests.dequeue().numpy().decode()
        queues = self._queues_of(client_id)
        # A client's enqueues reach server0 and server1 independently (TF sends remote
        # ops without waiting), so its id can arrive before its share on server1; and a
        # client killed mid-send never completes it. Wait briefly, then give up on it.
        try:
            wait_until(lambda: all(has_items(q) for q in queues.inputs), INPUT_GRACE_SECONDS,
                       "incomplete request")
        except TimeoutError:
            self._drop_incomplete(queues)
            return 0
        share0, share1 = (queue.dequeue() for queue in queues.inputs)
        batch = int(share0.shape[0])
        bucket = next(size for size in BATCH_BUCKETS if size >= batch)
        # Zero rows are valid shares of zero images: both servers pad their share alike,
        # each on its own device, and the extra rows are dropped before answering.
        padding = [[0, bucket - batch], [0, 0], [0, 0], [0, 0]]
        with tf.device(self.protocol.server_0.device_name):
            share0 = tf.pad(share0, padding)
        with tf.device(self.protocol.server_1.device_name):
            share1 = tf.pad(share1, padding)
        out0, out1 = self._predict_on_shares(share0, share1)
        with tf.device(self.protocol.server_0.device_name):
            queues.outputs[0].enqueue(out0[:batch])
        with tf.device(self.protocol.server_1.device_name):
            queues.outputs[1].enqueue(out1[:batch])
        return batch

    @staticmethod
    def _drop_incomplete(queues: ClientQueues) -> None:
        for queue in queues.inputs:
            if has_items(queue):
                queue.dequeue()

    def serve(self, num_requests: Optional[int], timeout: float = 120.0,
              report: Optional[Callable[[str], None]] = print) -> None:
        """Answer ``num_requests`` private queries, waiting at most ``timeout`` s for each.

        ``num_requests=None`` serves until interrupted, however long the quiet spells.
        Returns once every client has collected its results, so the servers can be
        stopped right after without cutting off a client. The heartbeat that clients
        watch beats only while this runs.
        """
        report = report or (lambda line: None)
        of_total = "" if num_requests is None else f"/{num_requests}"
        self._serving.set()
        try:
            number = 0
            while num_requests is None or number < num_requests:
                try:
                    batch = self.serve_one(timeout)
                except TimeoutError:
                    if num_requests is None:
                        continue
                    raise
                number += 1
                if batch == 0:
                    report(f"Request {number}{of_total}: dropped, its client vanished while sending it")
                else:
                    images = "image" if batch == 1 else "images"
                    report(f"Request {number}{of_total}: answered a private batch of {batch} {images}")
            try:
                with self.servers.explaining_failures():
                    wait_until(self._all_results_collected, timeout, "")
            except TimeoutError:
                report(f"Some results were not collected within {timeout:.0f} s: their clients are gone.")
        finally:
            self._serving.clear()

    def close(self) -> None:
        """Delete the weight shares from the servers; the model cannot serve afterwards.

        Call it before stopping the servers: otherwise Python deletes the shares only
        when it exits, after the servers are gone, and complains on the way out.
        """
        self._stopped.set()
        self._heartbeat.join()
        self.private_model = None
        self._predict_on_shares = None
        gc.collect()

    def _all_results_collected(self) -> bool:
        return not any(has_items(q) for c in self._clients.values() for q in c.outputs)


def share_model(keras_model, protocol) -> SecureModel:
    """Secret-share ``keras_model``'s weights across the servers: the model owner's step."""
    config = keras_model.get_config()
    # tfe.keras builds its layers for a concrete batch size, then accepts any; it
    # skips Keras's InputLayer and reads the shape from the first real layer.
    layers = [layer for layer in config["layers"] if layer["class_name"] != "InputLayer"]
    layers[0]["config"]["batch_input_shape"] = (1,) + tuple(keras_model.input_shape[1:])
    private_model = tfe.keras.models.Sequential.from_config(config)
    private_model.set_weights(keras_model.get_weights())
    return SecureModel(protocol, private_model)
