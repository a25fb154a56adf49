import selectors
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from private_predictions import LocalCluster, PrivateClient
from private_predictions.cluster import find_free_base_port


def wait_for_line(process, expected: str, timeout: float) -> str:
    """Read the process's output until a line starts with ``expected``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    seen = []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                line = process.stdout.readline()
                if not line:
                    break
                if line.startswith(expected):
                    return line
                seen.append(line)
    raise AssertionError(f"no line {expected!r} within {timeout} s; output was:\n{''.join(seen)}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    config_path = tmp_path_factory.mktemp("cluster") / "cluster.json"
    with LocalCluster.start(base_port=find_free_base_port(), config_path=config_path) as running:
        yield running


def start_serving(config_path) -> subprocess.Popen:
    """Share the trained model on the cluster and serve it forever, from a process of its own."""
    process = subprocess.Popen(
        [sys.executable, "-m", "private_predictions.serve", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_line(process, "serving", timeout=120)
    except BaseException:
        process.kill()
        raise
    return process


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
