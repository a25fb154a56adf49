import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc loads: see private_predictions/client.py

import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from tensorflow.python.ops import gen_data_flow_ops

from private_predictions import LocalCluster, RuntimeClient
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
        deployment.client = RuntimeClient.connect(deployment.cluster.config_path, timeout=30)
        deployment.card = deployment.cluster.admit("tests", tmp_path / "card.json", per_minute=None)
        yield deployment
    finally:
        if deployment.serving is not None:
            deployment.serving.stop()
        deployment.cluster.stop()


@pytest.fixture
def client(serving, cluster):
    # Connecting again for every test costs milliseconds, and keeps this process's
    # connection right even after a test has connected it to a cluster of its own.
    return RuntimeClient.connect(cluster.config_path, timeout=30)


def send_by_hand(client, share0=None, share1=None, announced: int = 1, client_id=None):
    """What anything on the network can do: put shares and a request of its own making into the queues.

    A share that is None is not sent. Returns the queues of the client named ``client_id``
    (by default one made up).
    """
    from private_predictions._tf import tf
    from private_predictions.queues import ClientQueues

    queues = ClientQueues(client.protocol, client_id)
    for queue, share in zip(queues.inputs, (share0, share1)):
        if share is not None:
            _enqueue(queue.handle, tf.constant(np.asarray(share, np.int64)))
    _enqueue_request(client._requests.handle, tf.constant(queues.client_id), tf.constant(announced, tf.int64))
    return queues


def _enqueue(queue, value):
    from private_predictions._tf import tf
    return tf.function(lambda q, v: (gen_data_flow_ops.queue_enqueue_v2(q, [v]),
                                     gen_data_flow_ops.queue_size_v2(q))[-1])(queue, value)


def _enqueue_request(requests, client_id, batch):
    from private_predictions._tf import tf
    return tf.function(lambda q, c, b: (gen_data_flow_ops.queue_enqueue_v2(q, [c, b]),
                                        gen_data_flow_ops.queue_size_v2(q))[-1])(requests, client_id, batch)


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
