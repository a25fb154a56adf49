"""Is every server still there? Asked every half second by whoever waits on them."""
import time
from typing import Dict, Optional

from .config import SERVER_NAMES, ClusterConfig
from .ports import port_is_open, probe

# A host is taken for silent only once its port has not answered for this long: on a busy machine (a
# teacher's laptop with a class asking, two cores) one probe can miss its half second while the port
# is fine, and a serving side that stopped on that, or a door that failed its waits, stopped a class.
SILENT_AFTER = 3.0


class ServerUnreachableError(ConnectionError):
    """A server stopped answering: what it held (shares, queues) may be lost.

    ``silent`` tells a host that went quiet (it may come back, state intact) from a
    server whose port refuses connections (its process, and what it held, are gone);
    ``since`` is when (time.monotonic()) it was first found not answering.
    """

    def __init__(self, message: str, name: str = "", silent: bool = False, since: Optional[float] = None):
        super().__init__(message)
        self.name, self.silent = name, silent
        self.since = time.monotonic() if since is None else since


def first_dead_server(config: ClusterConfig, timeout: float = 0.5) -> Optional[str]:
    """The first server in ``config`` that does not accept a connection within ``timeout`` s, or None."""
    for name in SERVER_NAMES:
        if not port_is_open(*config.address(name), timeout=timeout):
            return name
    return None


class ServerWatch:
    """Raises ServerUnreachableError naming the first server that stopped answering.

    A server whose process died refuses connections at once, and is named at once; one whose
    host went silent (cable, Wi-Fi, sleep) does not answer, and is named once it has not
    answered for SILENT_AFTER s. Either way the waiting party learns it within seconds,
    without touching TensorFlow, whose calls to a silent host never return.
    """

    def __init__(self, config: ClusterConfig, advice: str):
        self.config, self.advice = config, advice
        self._silent_since: Dict[str, float] = {}

    def check(self) -> None:
        gone = self.first_gone()
        if gone is not None:
            raise self.error(gone)

    def first_gone(self, silent_after: float = SILENT_AFTER) -> Optional[str]:
        """The first server whose process is gone, or whose host has been silent for ``silent_after`` s,
        or None. One probe per server decides, and what it found is kept for :meth:`error`."""
        now = time.monotonic()
        for name in SERVER_NAMES:
            found = probe(*self.config.address(name))
            if found == "open":
                self._silent_since.pop(name, None)
            elif found == "refused":
                self._silent_since.pop(name, None)
                return name
            elif now - self._silent_since.setdefault(name, now) >= silent_after:
                return name
        return None

    def silent(self, name: str) -> bool:
        """Whether ``name``'s host was silent (not refusing) when last probed."""
        return name in self._silent_since

    def error(self, name: str) -> ServerUnreachableError:
        # A silent host's outage began when it was first found silent; a refusing one's, now.
        return ServerUnreachableError(f"{name} ({self.config.hosts[name]}) is not answering. {self.advice}",
                                      name, self.silent(name), self._silent_since.get(name))

    def explain(self, error: BaseException) -> BaseException:
        """The error to show for a failed TF call: the server it lost, if one is gone.

        A failed call is itself a sign: a host found silent now is named at once, not after
        SILENT_AFTER s (those are for probes that merely ran late on a busy machine)."""
        gone = self.first_gone(silent_after=0.0)
        return self.error(gone) if gone is not None else error
