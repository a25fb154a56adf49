import selectors
import subprocess
import sys
import time

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


@pytest.fixture(scope="session")
def serving(cluster):
    """The trained model, shared and served forever by a separate process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "private_predictions.serve", str(cluster.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for_line(process, "serving", timeout=120)
        yield process
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="session")
def client(serving, cluster):
    return PrivateClient.connect(cluster.config_path, timeout=30)
