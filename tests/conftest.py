import subprocess
from types import SimpleNamespace

import pytest

from private_predictions import LocalCluster, PrivateClient
from private_predictions.cluster import find_free_base_port
from private_predictions.serve import start_serving_process


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    config_path = tmp_path_factory.mktemp("cluster") / "cluster.json"
    with LocalCluster.start(base_port=find_free_base_port(), config_path=config_path) as running:
        yield running


def start_serving(config_path) -> subprocess.Popen:
    """Share the trained model on the cluster and serve it forever, from a process of its own."""
    return start_serving_process(config_path)[0]


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(10)


@pytest.fixture(scope="session")
def serving(cluster):
    process = start_serving(cluster.config_path)
    yield process
    stop(process)


@pytest.fixture
def own_deployment(tmp_path):
    """Servers, a serving process and a client of the test's own, for tests that break them."""
    with LocalCluster.start(base_port=find_free_base_port(), config_path=tmp_path / "c.json") as cluster:
        deployment = SimpleNamespace(cluster=cluster, serving=start_serving(cluster.config_path))
        try:
            deployment.client = PrivateClient.connect(cluster.config_path, timeout=30)
            yield deployment
        finally:
            stop(deployment.serving)


@pytest.fixture(scope="session")
def client(serving, cluster):
    return PrivateClient.connect(cluster.config_path, timeout=30)
