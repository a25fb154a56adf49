"""Keep TensorFlow's servers listening only where the cluster file says.

TensorFlow 2.9 starts a gRPC server in every process that joins a cluster (the three
servers, the model owner's, each client's), and that server always listens on all of the
machine's network interfaces, without authentication: anyone on the same Wi-Fi who
reaches the port can run any TensorFlow operation there, such as reading files. No
option of TensorFlow's changes that.

So the series' processes carry a small ``bind()`` of their own (``bind.c``, built by
``make setup``), preloaded into every Python of the environment from
its first instruction (``boot.py``). Before a process starts a TensorFlow server, it says
where that server may listen (:func:`listen_only`); the preloaded ``bind()`` then puts
the server on that address alone: loopback for servers on one machine. If the guard is
not in effect, :func:`listen_only` refuses, and no server is started.

This module imports nothing heavy: it also runs before TensorFlow is imported.
"""
import ctypes
import os
import socket
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("bind.c")
# Built by `make setup` beside its source, never committed: it is machine code for this machine.
LIBRARY = Path(__file__).with_name("build") / "libprivate_predictions_listen_guard.so"
VERSION = 1


class ListenGuardError(RuntimeError):
    """A TensorFlow server would listen on every network interface: refused."""


def preload_environment(environment=None) -> dict:
    """``environment`` (default: this process's) with the guard added to ``LD_PRELOAD``.

    The dynamic loader splits ``LD_PRELOAD`` at spaces and colons, so a path that has
    either is given by name, with its folder in ``LD_LIBRARY_PATH``.
    """
    environment = dict(os.environ if environment is None else environment)
    if is_preloaded(environment):
        return environment
    entry = str(LIBRARY)
    if " " in entry or ":" in entry:
        entry = LIBRARY.name
        folders = environment.get("LD_LIBRARY_PATH", "")
        environment["LD_LIBRARY_PATH"] = str(LIBRARY.parent) + (":" + folders if folders else "")
    preload = environment.get("LD_PRELOAD", "")
    environment["LD_PRELOAD"] = entry + (" " + preload if preload else "")
    return environment


def is_preloaded(environment=None) -> bool:
    """Whether ``environment`` (default: this process's) preloads the guard."""
    environment = os.environ if environment is None else environment
    entries = environment.get("LD_PRELOAD", "").replace(":", " ").split()
    return str(LIBRARY) in entries or LIBRARY.name in entries


def in_effect() -> bool:
    """Whether the ``bind()`` that this process's libraries call is the guard's."""
    if not LIBRARY.exists() or not _loaded_here():
        return False
    guard = ctypes.CDLL(str(LIBRARY))  # the copy already loaded: dlopen returns it
    everyone = ctypes.CDLL(None)  # what a library's call to bind() finds first
    return (guard.listen_guard_version() == VERSION
            and ctypes.cast(everyone.bind, ctypes.c_void_p).value == ctypes.cast(guard.bind, ctypes.c_void_p).value)


def _loaded_here() -> bool:
    try:
        return str(LIBRARY.resolve()) in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def numeric_address(host: str) -> str:
    """``host`` as the numeric address its server listens on (IPv4 first: "localhost" is 127.0.0.1)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)[0][4][0]
        except socket.gaierror:
            continue
    raise ListenGuardError(f"cannot resolve {host!r} to an address of this machine")


def listen_only(port: int, host: str, what: str) -> str:
    """Let the TensorFlow server on ``port`` listen on ``host`` alone; return the numeric address.

    Call it before the server starts. Raises ListenGuardError, naming ``what`` is starting,
    if the guard is not in effect (the server would listen on every interface) or if
    ``host`` is not an address of this machine.
    """
    address = numeric_address(host)
    if not in_effect():
        raise ListenGuardError(_not_in_effect(what, host, port))
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            raise ListenGuardError(
                f"{what} is to listen on {host}:{port}, but {address} is not an address of this machine. "
                "Run it on the machine that has that address, or correct the cluster file.") from None
    if ctypes.CDLL(str(LIBRARY)).listen_guard_only(port, address.encode()) != 0:
        raise ListenGuardError(f"the listen guard refused {address}:{port} for {what}")
    return address


def _not_in_effect(what: str, host: str, port: int) -> str:
    if not LIBRARY.exists():
        why = (f"the guard is not built ({LIBRARY} is missing). Run `make setup` in the repository "
               "(it builds it), then restart this process (in Jupyter: Kernel > Restart Kernel).")
    elif not is_preloaded():
        why = (f"this Python process ({sys.executable}) was not started with it. Every Python of the "
               "series' environment (.venv) gets it at its start; choose that environment's kernel "
               "(`make lab` does) and restart the kernel.")
    else:
        why = ("another library's bind() comes before it in this process (LD_PRELOAD="
               f"{os.environ.get('LD_PRELOAD', '')!r}). Start this process without that preload.")
    return (f"Refusing to start {what}: TensorFlow's server would listen on every network interface of this "
            f"machine instead of {host}:{port} alone, and anyone on the same network (a café's or a "
            f"classroom's Wi-Fi) could run operations on it, such as reading your files. The series' listen "
            f"guard keeps it on {host}, but {why}")


def listening_addresses(pid: int, port: int):
    """The addresses on which process ``pid`` listens on ``port`` (psutil: not needed at start-up)."""
    import psutil

    return sorted({c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port})


def check_listening(port: int, address: str, what: str) -> None:
    """Raise ListenGuardError unless this process listens on ``port`` at ``address`` only."""
    allowed = {address, f"::ffff:{address}"}
    found = listening_addresses(os.getpid(), port)
    if not found or not set(found) <= allowed:
        raise ListenGuardError(f"{what} listens on {', '.join(found) or 'nothing'} port {port}, not on "
                               f"{address} alone. Stop this process now (in Jupyter: restart the kernel).")
