"""Start, watch and stop the three TF Encrypted servers on this machine."""
import ctypes
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import psutil

from .config import SERVER_NAMES, ClusterConfig
from .paths import CLUSTER_CONFIG_PATH
from .queues import wait_until


class ClusterError(RuntimeError):
    """A server could not be started, or is not answering."""


def _die_with_parent():
    # Runs in the child before exec: if the notebook kernel dies, even by SIGKILL,
    # the kernel sends the server SIGTERM, so no server outlives its owner.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_free_base_port(count: int = 3) -> int:
    """A port p such that p .. p+count-1 are all free right now (for tests and benchmarks)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("", 0))
            base = probe.getsockname()[1]
        if base + count < 65536 and all(_port_is_free(base + i) for i in range(count)):
            return base
    raise ClusterError(f"found no {count} consecutive free ports")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
            return True
        except OSError:
            return False


def who_listens_on(port: int) -> Optional[psutil.Process]:
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return psutil.Process(connection.pid) if connection.pid else None
    return None


def describe_port_holder(port: int) -> str:
    try:
        holder = who_listens_on(port)
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        holder = None
    if holder is None:
        return f"port {port} is in use by a process this user cannot see"
    return f"port {port} is in use by process {holder.pid} ({' '.join(holder.cmdline())[:120]})"


def wait_for_servers(config_path: Path = CLUSTER_CONFIG_PATH, timeout: float = 120.0) -> ClusterConfig:
    """Wait until the serving side has written its configuration and all servers listen."""
    config_path = Path(config_path)
    # Servers take seconds to start: checking ten times a second leaves the CPU to them.
    wait_until(config_path.exists, timeout,
               f"No cluster configuration appeared at {config_path} within {timeout:.0f} s. "
               "Start the servers with notebooks/02_secure_serving.ipynb first.", max_pause=0.1)
    config = ClusterConfig.load(config_path)

    def all_listening():
        return all(port_is_open(*config.address(name)) for name in SERVER_NAMES)

    wait_until(all_listening, timeout,
               f"The servers in {config_path} ({', '.join(config.hosts.values())}) are not "
               f"answering after {timeout:.0f} s. Start them with notebooks/02_secure_serving.ipynb.",
               max_pause=0.1)
    return config


def start_player(config_path: Path, name: str, log, launcher: Sequence[str] = ()) -> subprocess.Popen:
    """Start one server process, ``launcher`` + ``python -m private_predictions.player CONFIG NAME``.

    ``launcher`` runs it elsewhere, e.g. ``ip netns exec NAMESPACE`` in the several-hosts test.
    """
    return subprocess.Popen(
        [*launcher, sys.executable, "-m", "private_predictions.player", str(config_path), name],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )


class LocalCluster:
    """The three servers of a TF Encrypted cluster, as child processes of this one.

    Use it as a context manager, or call :meth:`stop` when done.
    """

    def __init__(self, config: ClusterConfig, config_path: Path = CLUSTER_CONFIG_PATH):
        self.config = config
        self.config_path = Path(config_path)
        self.processes: Dict[str, subprocess.Popen] = {}
        self._logs: Dict[str, Path] = {}

    @classmethod
    def start(
        cls,
        base_port: int = 4440,
        config_path: Path = CLUSTER_CONFIG_PATH,
        timeout: float = 60.0,
    ) -> "LocalCluster":
        """Start server0, server1 and server2 on ``localhost:base_port..base_port+2``."""
        cluster = cls(ClusterConfig.local(base_port), config_path)
        cluster._launch(timeout)
        return cluster

    def _launch(self, timeout: float) -> None:
        for name in SERVER_NAMES:
            host, port = self.config.address(name)
            if port_is_open(host, port):
                raise ClusterError(
                    f"Cannot start {name}: {describe_port_holder(port)}. Stop that process, "
                    "or start the cluster on other ports with LocalCluster.start(base_port=...)."
                )
        self.config.save(self.config_path)
        log_dir = Path(tempfile.mkdtemp(prefix="private-predictions-"))
        for name in SERVER_NAMES:
            self._logs[name] = log_dir / f"{name}.log"
            with open(self._logs[name], "wb") as log:
                self.processes[name] = start_player(self.config_path, name, log)
        try:
            self.wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _log_tail(self, name: str, lines: int = 8) -> str:
        try:
            return "\n".join(self._logs[name].read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(SERVER_NAMES)
        while waiting:
            for name in list(waiting):
                process = self.processes[name]
                if process.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with code {process.returncode} while starting:\n"
                        f"{self._log_tail(name)}"
                    )
                if port_is_open(*self.config.address(name)):
                    waiting.remove(name)
            if waiting and time.monotonic() > deadline:
                raise ClusterError(f"{', '.join(waiting)} did not start listening within {timeout:.0f} s")
            if waiting:
                time.sleep(0.1)

    @property
    def pids(self) -> Dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def alive(self) -> Dict[str, bool]:
        return {name: process.poll() is None for name, process in self.processes.items()}

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every server this cluster started, and wait until each has exited."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for name, process in self.processes.items():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self.config_path.exists():
            self.config_path.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        state = ", ".join(
            f"{name}={self.config.hosts[name]} (pid {p.pid}, {'running' if p.poll() is None else 'stopped'})"
            for name, p in self.processes.items()
        )
        return f"LocalCluster({state})"
