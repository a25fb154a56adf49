import selectors
import socket
import subprocess
import sys
import time

import pytest

from private_predictions import LocalCluster, PrivateClient


def free_base_port(count: int = 3) -> int:
    """A port p such that p .. p+count-1 are free right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("", 0))
            base = probe.getsockname()[1]
        if base + count < 65536 and all(_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free ports")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
            return True
        except OSError:
            return False


def wait_for_line(process, expected: str, timeout: float) -> None:
    """Read the process's output until a line equals ``expected``; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    seen = []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                line = process.stdout.readline()
                if not line:
                    break
                if line.strip() == expected:
                    return
                seen.append(line)
    raise AssertionError(f"no line {expected!r} within {timeout} s; output was:\n{''.join(seen)}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    config_path = tmp_path_factory.mktemp("cluster") / "cluster.json"
    with LocalCluster.start(base_port=free_base_port(), config_path=config_path) as running:
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
