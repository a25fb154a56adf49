"""Start, watch and stop the three TF Encrypted servers on this machine."""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from .config import SERVER_NAMES, ClusterConfig
from .paths import CLUSTER_CONFIG_PATH
from ._tf import tf
from .queues import wait_until


class ClusterError(RuntimeError):
    """A server could not be started, or is not answering."""


class ServerUnreachableError(ConnectionError):
    """A server stopped answering: what it held (shares, queues) is lost."""


class ServerWatch:
    """Notices a dead server within ``interval`` s, for loops that otherwise only talk to some.

    A query or a wait for requests touches server0 and server1 only: without this, a
    dead server2 would go unnoticed until the next computation. A check costs a few
    ms (one connection per server), so it runs at most every ``interval`` s.
    """

    def __init__(self, config: ClusterConfig, advice: str, interval: float = 0.5):
        self.config, self.advice, self.interval = config, advice, interval
        self._last_check = time.monotonic()

    def check(self) -> None:
        """Raise ServerUnreachableError naming the first server whose port is closed."""
        self._last_check = time.monotonic()
        dead = first_dead_server(self.config)
        if dead is not None:
            raise self._error(dead)

    def _error(self, name: str) -> ServerUnreachableError:
        return ServerUnreachableError(f"{name} ({self.config.hosts[name]}) is not answering. {self.advice}")

    @contextmanager
    def explaining_failures(self):
        """Turn a TF error that a dead server caused into a ServerUnreachableError naming it."""
        try:
            yield
        except tf.errors.OpError:
            dead = first_dead_server(self.config)
            if dead is None:
                raise
            # The gRPC details of the failed call say nothing the name does not.
            raise self._error(dead) from None

    def check_if_due(self) -> bool:
        """Check if the last check is ``interval`` s old; return whether it checked."""
        if time.monotonic() - self._last_check <= self.interval:
            return False
        self.check()
        return True


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


def first_dead_server(config: ClusterConfig) -> Optional[str]:
    """The first server in ``config`` that does not accept connections, or None if all do."""
    for name in SERVER_NAMES:
        if not port_is_open(*config.address(name)):
            return name
    return None


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
    """The process listening on ``port``, or None if this user cannot tell."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return psutil.Process(connection.pid) if connection.pid else None
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return None


def describe_port_holder(port: int, holder: Optional[psutil.Process]) -> str:
    if holder is None:
        return f"port {port} is in use by a process this user cannot see"
    return f"port {port} is in use by process {holder.pid} ({' '.join(holder.cmdline())[:120]})"


START_WITH_NOTEBOOK_02 = "Start them with notebooks/02_secure_serving.ipynb."
START_ON_EACH_MACHINE = ("Start each on its machine with `python -m private_predictions.player CONFIG NAME` "
                         "(README: Running the servers on several machines), and check that no firewall "
                         "blocks the ports.")


def wait_for_servers(config_path: Path = CLUSTER_CONFIG_PATH, timeout: float = 120.0,
                     how_to_start: str = START_WITH_NOTEBOOK_02) -> ClusterConfig:
    """Wait until ``config_path`` exists and every server it names accepts connections."""
    config_path = Path(config_path)
    # Servers take seconds to start: checking ten times a second leaves the CPU to them.
    wait_until(config_path.exists, timeout,
               f"No cluster configuration appeared at {config_path} within {timeout:.0f} s. "
               "Start the servers with notebooks/02_secure_serving.ipynb first.", max_pause=0.1)
    config = ClusterConfig.load(config_path)

    wait_until(lambda: first_dead_server(config) is None, timeout,
               f"The servers in {config_path} ({', '.join(config.hosts.values())}) are not "
               f"answering after {timeout:.0f} s. {how_to_start}",
               max_pause=0.1)
    return config


LOCAL_HOSTS = ("localhost", "127.0.0.1")
PLAYER_MODULE = "private_predictions.player"
STARTED_BY = "--started-by"


def player_command(config_path: Path, name: str, started_by: Optional[int] = None) -> List[str]:
    command = [sys.executable, "-m", PLAYER_MODULE, str(config_path), name]
    return command if started_by is None else command + [STARTED_BY, str(started_by)]


def start_player(config_path: Path, name: str, log, launcher: Sequence[str] = (),
                 started_by: Optional[int] = None) -> subprocess.Popen:
    """Start one server process: ``launcher`` + ``python -m private_predictions.player CONFIG NAME``.

    ``launcher`` runs it elsewhere, e.g. ``ip netns exec NAMESPACE`` in the several-hosts test;
    ``started_by`` (LocalCluster's process id) lets a later start recognise it if it is abandoned.
    """
    return subprocess.Popen(
        [*launcher, *player_command(config_path, name, started_by)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )


def _starter_of_our_server(holder: psutil.Process, config_path: Path, name: str) -> Optional[int]:
    """If ``holder`` is ``name`` of a LocalCluster on ``config_path`` run by this user, who started it."""
    try:
        command, cwd, user = holder.cmdline(), Path(holder.cwd()), holder.username()
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return None
    if user != psutil.Process().username() or len(command) != 7 or command[1:3] != ["-m", PLAYER_MODULE]:
        return None
    if (cwd / command[3]).resolve() != config_path.resolve() or command[4:6] != [name, STARTED_BY]:
        return None
    return int(command[6]) if command[6].isdigit() else None


def _still_running(starter: int, holder: psutil.Process) -> bool:
    """Whether the process that started ``holder`` lives (a newer one may have its id)."""
    try:
        return psutil.Process(starter).create_time() <= holder.create_time()
    except psutil.NoSuchProcess:
        return False


def _terminate(process: psutil.Process, timeout: float = 10.0) -> None:
    process.terminate()
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(timeout)


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

    def _clear_ports(self) -> None:
        """Stop servers of ours that nobody can use any more; refuse to touch anything else.

        Ours and abandoned: a server that a LocalCluster started for this same
        configuration file, either from this process (the start cell run again) or from
        one that has exited (whatever kept the server alive, nothing can serve through it:
        the model's shares lived in the process that is gone). Such a server is replaced
        rather than reused: its queues may still hold requests and answers from that
        earlier run, and it would not die with this process.
        """
        for name in SERVER_NAMES:
            host, port = self.config.address(name)
            if not port_is_open(host, port):
                continue
            holder = who_listens_on(port)
            starter = holder and _starter_of_our_server(holder, self.config_path, name)
            if starter and (starter == os.getpid() or not _still_running(starter, holder)):
                print(f"Stopping {name} (process {holder.pid}), left over from an earlier start.")
                _terminate(holder)
            elif starter:
                raise ClusterError(
                    f"Cannot start {name}: port {port} is held by {name} of a cluster that process "
                    f"{starter} ({' '.join(psutil.Process(starter).cmdline())[:120]}) started and still "
                    "runs. Stop it there (cluster.stop(), or restart that notebook's kernel), or start "
                    "this cluster on other ports with LocalCluster.start(base_port=...)."
                )
            else:
                raise ClusterError(
                    f"Cannot start {name}: {describe_port_holder(port, holder)}. Stop that process, "
                    "or start the cluster on other ports with LocalCluster.start(base_port=...)."
                )

    def _refuse_to_overwrite_remote_config(self) -> None:
        # stop() deletes the file it wrote: a hand-written list of other machines must survive.
        if not self.config_path.exists():
            return
        try:
            elsewhere = [a for a in ClusterConfig.load(self.config_path).hosts.values()
                         if a.rsplit(":", 1)[0] not in LOCAL_HOSTS]
        except ValueError:
            return  # not a cluster file of ours, e.g. left half-written: replace it
        if elsewhere:
            raise ClusterError(
                f"{self.config_path} names servers on other machines ({', '.join(elsewhere)}). To use "
                "them, call RemoteCluster.join(); to start servers here, move that file away first.")

    def _launch(self, timeout: float) -> None:
        self._refuse_to_overwrite_remote_config()
        self._clear_ports()
        self.config.save(self.config_path)
        log_dir = Path(tempfile.mkdtemp(prefix="private-predictions-"))
        for name in SERVER_NAMES:
            self._logs[name] = log_dir / f"{name}.log"
            with open(self._logs[name], "wb") as log:
                self.processes[name] = start_player(self.config_path, name, log, started_by=os.getpid())
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


class RemoteCluster:
    """Three servers that run on other machines, each started there with the player command.

    Offers what notebook 02 uses of :class:`LocalCluster`, for a model owner whose servers
    are elsewhere; it starts and stops nothing.
    """

    def __init__(self, config: ClusterConfig, config_path: Path):
        self.config, self.config_path = config, Path(config_path)

    @classmethod
    def join(cls, config_path: Path = CLUSTER_CONFIG_PATH, timeout: float = 60.0) -> "RemoteCluster":
        """Wait up to ``timeout`` s until every server named in ``config_path`` accepts connections."""
        if not Path(config_path).exists():
            raise FileNotFoundError(f"No cluster configuration at {config_path}: write one naming the three "
                                    "servers (README: Running the servers on several machines).")
        return cls(wait_for_servers(config_path, timeout, START_ON_EACH_MACHINE), config_path)

    def alive(self) -> Dict[str, bool]:
        return {name: port_is_open(*self.config.address(name)) for name in SERVER_NAMES}

    def stop(self) -> None:
        """Nothing to stop from here: the servers belong to their machines (stop them there)."""

    def __repr__(self):
        return "RemoteCluster(" + ", ".join(f"{n}={a}" for n, a in self.config.hosts.items()) + ")"
