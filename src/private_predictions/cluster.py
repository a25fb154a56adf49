"""Start and stop the three TF Encrypted servers on this machine, or join three elsewhere."""
import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Optional, Sequence

import psutil

from .commands import server as server_command
from .admission import DEFAULT_PER_MINUTE, revoke, write_card
from .config import SERVER_NAMES, ClusterConfig
from .paths import CARD_PATH, CLUSTER_CONFIG_PATH, shown
from .ports import describe_port_holder, free_ports, listens_on, port_is_open, who_listens_on
from .waiting import SLICE, wait_until
from .watch import first_dead_server


class ClusterError(RuntimeError):
    """A server could not be started, or is not answering."""


def _die_with_parent():
    # Runs in the child before exec: if the notebook kernel dies, even by SIGKILL,
    # the kernel sends the server SIGTERM, so no server outlives its owner.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


START_WITH_NOTEBOOK_02 = "Start them with notebook 02 (secure serving)."
START_ON_EACH_MACHINE = ("Start each on its machine with `python -m private_predictions.commands.server CONFIG NAME` "
                         "(docs: several machines), and check that no firewall blocks the ports.")


def wait_for_servers(config_path: Path = CLUSTER_CONFIG_PATH, timeout: float = 120.0,
                     how_to_start: str = START_WITH_NOTEBOOK_02, say=print) -> ClusterConfig:
    """Wait until ``config_path`` exists and every server it names accepts connections.

    If they are not there at once, say so right away, once, with how long this waits.
    """
    config_path = Path(config_path)
    deadline = time.monotonic() + timeout

    def config_if_ready() -> Optional[ClusterConfig]:
        if not config_path.exists():
            return None
        try:
            config = ClusterConfig.load(config_path)
        except ValueError:
            return None  # being written
        return config if first_dead_server(config) is None else None

    config = config_if_ready()
    if config is None:
        say(f"Waiting up to {timeout:.0f} s for the servers named in {shown(config_path)} "
            f"(written by notebook 02 when it starts them)...")
        wait_until(lambda: config_if_ready() is not None or time.monotonic() > deadline, timeout + 1, "")
        config = config_if_ready()
    if config is not None:
        return config
    if not config_path.exists():
        raise TimeoutError(f"No cluster configuration appeared at {config_path} within {timeout:.0f} s. "
                           f"Start the servers with notebook 02 (secure serving) first.")
    hosts = ", ".join(ClusterConfig.load(config_path).hosts.values())
    raise TimeoutError(f"The servers in {config_path} ({hosts}) are not answering after {timeout:.0f} s. "
                       f"{how_to_start}")


def start_server(config_path: Path, name: str, log, launcher: Sequence[str] = (),
                 started_by: Optional[int] = None, cluster_file: Optional[Path] = None) -> subprocess.Popen:
    """Start one server process: ``launcher`` + ``python -m private_predictions.commands.server CONFIG NAME``.

    ``launcher`` runs it elsewhere, e.g. ``ip netns exec NAMESPACE`` in the several-hosts test;
    ``started_by`` and ``cluster_file`` let a later LocalCluster recognise it if it is abandoned.
    """
    return subprocess.Popen(
        [*launcher, *server_command.command(config_path, name, started_by=started_by, cluster_file=cluster_file)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )


def _starter_of_our_server(holder: psutil.Process, cluster_file: Path, name: str) -> Optional[int]:
    """If ``holder`` is ``name`` of a LocalCluster for ``cluster_file`` run by this user, who started it."""
    try:
        arguments, user = holder.cmdline(), holder.username()
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return None
    told = server_command.parse_command(arguments)
    if user != psutil.Process().username() or told is None or told.started_by is None:
        return None
    if told.name != name or told.cluster_file is None or Path(told.cluster_file) != cluster_file.resolve():
        return None
    return told.started_by


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


LOCK_DIR = Path(tempfile.gettempdir()) / "private-predictions-locks"
FOLDER_NAME = re.compile(r"private-predictions-(\d+)-\w+")  # the pid of the process that started its servers


def new_servers_folder() -> Path:
    """A new folder for the servers' logs, their cluster file and the admissions, in the temporary folder.

    ``stop`` deletes it; a process killed before it could (SIGKILL, the out-of-memory killer)
    leaves it. Its name holds the starter's pid, so the next start deletes such leftovers.
    """
    remove_abandoned_folders(Path(tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"private-predictions-{os.getpid()}-"))


def remove_abandoned_folders(parent: Path) -> None:
    """Delete this user's servers' folders in ``parent`` whose starting process has exited.

    Their servers exited with it (they die with their parent), and their tokens admit nobody.
    """
    for folder in parent.glob("private-predictions-*-*"):
        found = FOLDER_NAME.fullmatch(folder.name)
        try:
            mine = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if found and mine and not psutil.pid_exists(int(found[1])):
            shutil.rmtree(folder, ignore_errors=True)


def _lock(key: str, deadline: float, what: str) -> int:
    """Take this machine's lock named ``key`` (a file lock, shared by all users), waiting until ``deadline``.

    Starts that race for the same ports or the same cluster file take turns: the
    second then sees the first one's servers and is told whose they are.
    """
    LOCK_DIR.mkdir(mode=0o777, exist_ok=True)
    try:
        os.chmod(LOCK_DIR, 0o1777)  # every user may lock, as in /tmp
    except PermissionError:
        pass
    path = LOCK_DIR / f"{key}.lock"
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder before us deletes the file before letting go (_unlock): locked, but deleted
            # or replaced since we opened it, it no longer guards anything. Open it again.
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(descriptor)
                raise ClusterError(f"{what} is being started by another process and did not become free in "
                                   "time; try again in a minute.") from None
            time.sleep(SLICE / 2)
        os.close(descriptor)


def _unlock(key: str, descriptor: int) -> None:
    """Let go of a lock, deleting its file first, so that no file is left behind in the lock folder."""
    try:
        os.unlink(LOCK_DIR / f"{key}.lock")
    except FileNotFoundError:
        pass
    os.close(descriptor)


class LocalCluster:
    """The three servers of a TF Encrypted cluster, as child processes of this one.

    Use it as a context manager, or call :meth:`stop` when done.
    """

    def __init__(self, config: ClusterConfig, config_path: Path = CLUSTER_CONFIG_PATH):
        self.config = config
        self.config_path = Path(config_path)
        self.processes: Dict[str, subprocess.Popen] = {}
        self._logs: Dict[str, Path] = {}
        self._log_dir: Optional[Path] = None  # the servers' logs, their copy of the cluster file, admissions
        self._cards = []  # written by admit, deleted by stop

    @classmethod
    def start(cls, base_port: Optional[int] = None, config_path: Path = CLUSTER_CONFIG_PATH,
              timeout: float = 60.0, door_host: str = "127.0.0.1") -> "LocalCluster":
        """Start server0, server1 and server2 on this machine and write ``config_path`` naming them.

        The servers' runtime listens on loopback only; clients reach server0 and server1
        through their doors (door.py), at ``door_host``: loopback too, unless a teacher's
        class must reach them (then an address of this machine on the class's network).
        Without ``base_port`` the five ports are chosen among those free, so two checkouts
        on one machine never meet; with it, exactly ``base_port`` to ``base_port + 4``
        (the servers', then the doors'). Returns only once each port is held by the server
        this call started; otherwise stops what it started and raises ClusterError naming
        the port and who holds it.
        """
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            ports = free_ports(5) if base_port is None else [base_port + i for i in range(5)]
            cluster = cls(ClusterConfig.local(ports[:3], ports[3:], door_host), config_path)
            try:
                cluster._launch(deadline)
                return cluster
            except _PortTaken:
                if base_port is not None or attempt == 2:
                    raise
                # Another program took a port we had just found free: choose again.
        raise AssertionError("unreachable")

    def _locks(self, deadline: float) -> ExitStack:
        stack = ExitStack()
        try:
            keys = [hashlib.sha256(str(self.config_path.resolve()).encode()).hexdigest()[:16]]
            keys += [f"port-{self.config.address(name)[1]}" for name in SERVER_NAMES]
            keys += [f"port-{self.config.door_address(name)[1]}" for name in self.config.doors]
            for key in sorted(keys):  # one order for all, so two starts never hold one lock each
                descriptor = _lock(key, deadline, f"The cluster of {self.config_path}" if len(key) == 16
                                   else f"Port {key[5:]}")
                stack.callback(_unlock, key, descriptor)
        except BaseException:
            stack.close()
            raise
        return stack

    def _refuse_to_replace_a_running_cluster(self) -> None:
        """The cluster file names local servers that another live process started: leave them alone."""
        if not self.config_path.exists():
            return
        try:
            current = ClusterConfig.load(self.config_path)
        except ValueError:
            return  # not a cluster file of ours, e.g. left half-written: replace it
        elsewhere = [a for a in current.hosts.values() if a.rsplit(":", 1)[0] not in LOCAL_HOSTS]
        if elsewhere:
            # stop() deletes the file it wrote: a hand-written list of other machines must survive.
            raise ClusterError(
                f"{self.config_path} names servers on other machines ({', '.join(elsewhere)}). To use "
                "them, call RemoteCluster.join(); to start servers here, move that file away first.")
        if current != self.config:
            try:
                LocalCluster(current, self.config_path)._clear_ports()
            except _PortTaken:
                pass  # the file is stale: what holds those ports now is not a cluster of its

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
                    "this cluster with another config_path.")
            else:
                raise _PortTaken(
                    f"Cannot start {name}: {describe_port_holder(port, holder)}. Stop that process, "
                    "or start the cluster on other ports (LocalCluster.start() without base_port "
                    "chooses free ones).")

    def _launch(self, deadline: float) -> None:
        with self._locks(deadline):
            self._refuse_to_replace_a_running_cluster()
            self._clear_ports()
            log_dir = self._log_dir = new_servers_folder()
            # The servers read a copy of their own: a start racing for the same cluster file
            # can then neither change their ports nor see a file naming servers not yet proven.
            own_copy = log_dir / "cluster.json"
            self.config.save(own_copy)
            try:
                for name in SERVER_NAMES:
                    self._logs[name] = log_dir / f"{name}.log"
                    with open(self._logs[name], "wb") as log:
                        self.processes[name] = start_server(own_copy, name, log, started_by=os.getpid(),
                                                            cluster_file=self.config_path.resolve())
                self._wait_until_ours(deadline)
                self.config.save(self.config_path)
            except BaseException:
                self.stop()
                raise

    def _log_tail(self, name: str, lines: int = 8) -> str:
        try:
            return "\n".join(self._logs[name].read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_until_ours(self, deadline: float) -> None:
        """Wait until each port is held by the very server process started for it."""
        waiting = list(SERVER_NAMES)
        while waiting:
            for name in list(waiting):
                process, port = self.processes[name], self.config.address(name)[1]
                if process.poll() is not None:
                    holder = who_listens_on(port)
                    if holder is not None:
                        raise _PortTaken(f"Cannot start {name}: {describe_port_holder(port, holder)}. "
                                         "Stop that process, or start the cluster on other ports "
                                         "(LocalCluster.start() without base_port chooses free ones).")
                    raise ClusterError(f"{name} exited with code {process.returncode} while starting:\n"
                                       f"{self._log_tail(name)}")
                doors = [self.config.door_address(name)[1]] if name in self.config.doors else []
                if all(listens_on(process.pid, p) for p in [port] + doors):
                    waiting.remove(name)
            if waiting and time.monotonic() > deadline:
                raise ClusterError(f"{', '.join(waiting)} did not start listening in time")
            if waiting:
                time.sleep(SLICE)

    def admit(self, name: str, card_path: Path = CARD_PATH, per_minute: Optional[int] = DEFAULT_PER_MINUTE) -> Path:
        """Admit a client called ``name``: make its token, and write its card to ``card_path``.

        The card holds the doors' addresses and certificates, the token and the encoding; it is
        all a client needs. Admitting ``name`` again revokes its earlier token. ``stop`` deletes
        the cards written here: they open nothing once the servers are gone.
        """
        write_card(self.config, self._log_dir, name, card_path, per_minute)
        self._cards.append(Path(card_path))
        return Path(card_path)

    @property
    def folder(self) -> Optional[Path]:
        """The servers' own folder: their copy of the cluster file, the doors' certificates, the admissions."""
        return self._log_dir

    def revoke(self, name: str) -> int:
        """Revoke ``name``'s token: its next query is refused at the doors."""
        return revoke(self._log_dir, name)

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
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._log_dir is not None:  # nothing of this cluster stays in the temporary folder
            shutil.rmtree(self._log_dir, ignore_errors=True)
        for card in self._cards:
            card.unlink(missing_ok=True)
        try:
            if ClusterConfig.load(self.config_path) == self.config:  # not another start's file
                self.config_path.unlink()
        except (OSError, ValueError):
            pass

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


class _PortTaken(ClusterError):
    """Something that is not a server of ours holds a port."""


LOCAL_HOSTS = ("localhost", "127.0.0.1")


class RemoteCluster:
    """Three servers that run on other machines, each started there with the server command.

    Offers what notebook 02 uses of :class:`LocalCluster`, for a model owner whose servers
    are elsewhere; it starts and stops nothing.
    """

    def __init__(self, config: ClusterConfig, config_path: Path):
        self.config, self.config_path = config, Path(config_path)

    @classmethod
    def join(cls, config_path: Path = CLUSTER_CONFIG_PATH, timeout: float = 60.0, say=print) -> "RemoteCluster":
        """Wait up to ``timeout`` s until every server named in ``config_path`` accepts connections."""
        if not Path(config_path).exists():
            raise FileNotFoundError(f"No cluster configuration at {config_path}: write one naming the three "
                                    "servers (docs: several machines).")
        return cls(wait_for_servers(config_path, timeout, START_ON_EACH_MACHINE, say), config_path)

    def alive(self) -> Dict[str, bool]:
        return {name: port_is_open(*self.config.address(name)) for name in SERVER_NAMES}

    def admit(self, name: str, card_path: Path = CARD_PATH, per_minute: Optional[int] = DEFAULT_PER_MINUTE) -> Path:
        """Admit ``name`` and write its card, from the door certificates beside the cluster file.

        The doors run on other machines: copy the admissions file written here (beside the cluster
        file) to server0's and server1's, beside theirs.
        """
        write_card(self.config, self.config_path.parent, name, card_path, per_minute)
        return Path(card_path)

    def stop(self) -> None:
        """Nothing to stop from here: the servers belong to their machines (stop them there)."""

    def __repr__(self):
        return "RemoteCluster(" + ", ".join(f"{n}={a}" for n, a in self.config.hosts.items()) + ")"
