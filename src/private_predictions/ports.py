"""Network addresses and ports: which are free, which answer, who listens on them."""
import socket
from typing import List, Optional

import psutil

import listen_guard


def probe(host: str, port: int, timeout: float = 0.5) -> str:
    """What one connection attempt there finds within ``timeout`` s: "open", "refused" or "silent".

    A dead process's port refuses at once (or its host says there is no such address); a host that
    dropped off the network (cable pulled, laptop asleep) answers nothing, so the timeout is what
    turns it into "silent" instead of a wait. One attempt decides: two (is it open? then is it
    silent?) can straddle a host coming back, and call a silent host's return a dead process.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except socket.timeout:
        return "silent"
    except OSError:
        return "refused"


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts connections there within ``timeout`` s."""
    return probe(host, port, timeout) == "open"


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
            return True
        except OSError:
            return False


def free_ports(count: int) -> List[int]:
    """``count`` different ports that are free right now, chosen by the system."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def find_free_base_port(count: int = 5) -> int:
    """A port p such that p .. p+count-1 are all free right now (for tests of fixed port ranges)."""
    for _ in range(100):
        base = free_ports(1)[0]
        if base + count < 65536 and all(port_is_free(base + i) for i in range(count)):
            return base
    raise OSError(f"found no {count} consecutive free ports")


def who_listens_on(port: int) -> Optional[psutil.Process]:
    """The process listening on ``port``, or None if there is none or this user cannot tell."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                return psutil.Process(connection.pid) if connection.pid else None
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return None


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a listening socket on ``port``."""
    try:
        return bool(listen_guard.listening_addresses(pid, port))
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return False


def describe_port_holder(port: int, holder: Optional[psutil.Process]) -> str:
    if holder is None:
        return f"port {port} is in use by a process this user cannot see"
    try:
        command = " ".join(holder.cmdline())[:120]
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        command = "?"
    return f"port {port} is in use by process {holder.pid} ({command})"


def address_towards(host: str, port: int) -> str:
    """This machine's IP address on the route to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]
