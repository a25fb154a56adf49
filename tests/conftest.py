import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc loads: see private_predictions/client.py

import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from tensorflow.python.ops import gen_data_flow_ops

from private_predictions import LocalCluster
from private_predictions.client import Card, PrivateClient
from private_predictions.ports import find_free_base_port
from private_predictions.tooling import start_serving_process


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    config_path = tmp_path_factory.mktemp("cluster") / "cluster.json"
    with LocalCluster.start(base_port=find_free_base_port(), config_path=config_path) as running:
        running.card = running.admit("tests", config_path.parent / "card.json", per_minute=None)
        yield running


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(10)


@pytest.fixture(scope="session")
def serving(cluster):
    """The trained model, shared on the cluster and served by a process of its own."""
    serving = start_serving_process(cluster.config_path)
    yield serving
    serving.stop()


@pytest.fixture
def own_deployment(tmp_path):
    """Servers, a serving process and a client of the test's own, for tests that break them.

    A test may replace ``cluster`` and ``serving``; whatever they are at the end is stopped.
    """
    deployment = SimpleNamespace(serving=None)
    deployment.cluster = LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "c.json")
    try:
        deployment.serving = start_serving_process(deployment.cluster.config_path)
        deployment.card = deployment.cluster.admit("tests", tmp_path / "card.json", per_minute=None)
        deployment.client = PrivateClient(Card.load(deployment.card))
        yield deployment
    finally:
        if deployment.serving is not None:
            deployment.serving.stop()
        deployment.cluster.stop()


@pytest.fixture
def client(serving, cluster):
    """A client of the session's served model, through the doors, as notebook 03's."""
    return PrivateClient(Card.load(cluster.card))


class Hand:
    """What a program that reaches the servers' runtime can do by hand (on one machine: every program of
    it, over loopback): stage shares and put requests of its own making where the doors put theirs.

    Each of its computations is traced once, here: a function traced anew for every call registers a new
    function on the servers each time, which they keep, and a test that measures a server's memory would
    measure that instead of what it means to.
    """

    def __init__(self, config_path):
        from private_predictions._tf import tf
        from private_predictions.config import ClusterConfig
        from private_predictions.protocol import connect
        from private_predictions.queues import ServingLease, server_tables

        self.protocol = connect(ClusterConfig.load(config_path))
        self.tables = server_tables(self.protocol)
        self.lease = ServingLease(self.protocol.server_0.device_name)
        self._stage = [tf.function(lambda key, batch, rows, table=table: _staged(table, key, batch, rows))
                       for table in self.tables]
        self._present = [tf.function(lambda keys, table=table: _on(table, lambda: table.present(keys)))
                         for table in self.tables]
        self._enqueue = tf.function(lambda q, k, b: (gen_data_flow_ops.queue_enqueue_v2(q, [k, b]),
                                                     gen_data_flow_ops.queue_size_v2(q))[-1])
        self._enqueue_many = tf.function(lambda q, k, b: (gen_data_flow_ops.queue_enqueue_many_v2(q, [k, b]),
                                                          gen_data_flow_ops.queue_size_v2(q))[-1])

    def requests(self):
        """The request queue of the side that serves now."""
        from private_predictions.queues import request_queue
        return request_queue(self.protocol, self.lease.read()[0])

    def stage(self, key: int, share0=None, share1=None) -> None:
        """Put image rows in server0's and server1's tables under ``key`` (a share that is None is not put)."""
        for stage, share in zip(self._stage, (share0, share1)):
            if share is not None:
                rows = np.asarray(share, np.int64)
                stage(tf_constant(key), tf_constant(len(rows)), tf_constant(rows.reshape(len(rows), -1)))

    def request(self, key: int, batch: int) -> None:
        self._enqueue(self.requests().handle, tf_constant(key), tf_constant(batch))

    def requests_at_once(self, keys, batches) -> None:
        """Put several requests in the queue in one step, as if their clients had asked at the same moment."""
        self._enqueue_many(self.requests().handle, tf_constant(keys), tf_constant(batches))

    def staged(self, key: int):
        """What each server holds under ``key``: its batch size there, or -1."""
        return [int(present(tf_constant([key])).numpy()[0]) for present in self._present]


def tf_constant(value):
    from private_predictions._tf import tf
    return tf.constant(value, tf.int64)


def shared(protocol, values, scaled=False):
    """Shares of whole numbers, made inside the traced function that calls this: server0 gets random words,
    server1 the differences."""
    from tf_encrypted.protocol.pond.pond import PondPrivateTensor

    from private_predictions._tf import tf
    share0 = np.random.default_rng().integers(-2**63, 2**63, size=values.shape, dtype=np.int64)
    with np.errstate(over="ignore"):
        share1 = values.astype(np.int64) - share0
    tensors = []
    for share, server in ((share0, protocol.server_0), (share1, protocol.server_1)):
        with tf.device(server.device_name):
            tensors.append(protocol.tensor_factory.tensor(tf.constant(share)))
    return PondPrivateTensor(protocol, tensors[0], tensors[1], scaled)


def _staged(table, key, batch, rows):
    from private_predictions._tf import tf
    with tf.device(table.device):
        with tf.control_dependencies([table.put_shares(key[None], batch[None], rows)]):
            return tf.constant(True)


def _on(table, make):
    from private_predictions._tf import tf
    with tf.device(table.device):
        return make()


HOSTS = ("server0", "server1", "server2", "owner", "client")
PORT = 4440  # the same on every host, as on real machines


@pytest.fixture
def network():
    """Five hosts of our own (network namespaces on one virtual switch); skipped where they cannot be made."""
    from netns import NamespacesUnavailable, VirtualNetwork

    try:
        network = VirtualNetwork.create(HOSTS)
    except NamespacesUnavailable as reason:
        pytest.skip(f"no network namespaces here: {reason}")
    yield network
    network.remove()


@pytest.fixture
def servers_on_hosts(network, tmp_path):
    """The three servers, each on its host; yields the cluster file naming them."""
    from private_predictions.cluster import start_server
    from private_predictions.config import DOOR_SERVERS, SERVER_NAMES, ClusterConfig

    config_path = tmp_path / "cluster.json"
    ClusterConfig({name: f"{network.addresses[name]}:{PORT}" for name in SERVER_NAMES},
                  {name: f"{network.addresses[name]}:{PORT + 1}" for name in DOOR_SERVERS}).save(config_path)
    processes = []
    with open(tmp_path / "servers.log", "wb") as log:
        try:
            for name in SERVER_NAMES:
                processes.append(start_server(config_path, name, log, launcher=network.launcher(name)))
            yield config_path
        finally:
            for process in processes:
                stop(process)
