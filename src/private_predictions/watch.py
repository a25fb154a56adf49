"""Is every server still there? Asked every half second by whoever waits on them."""
import time
from typing import Dict, Optional

from .config import SERVER_NAMES, ClusterConfig
from .ports import port_is_open, port_is_silent

# A host is taken for silent only once its port has not answered for this long: on a busy machine (a
# teacher's laptop with a class asking, two cores) one probe can miss its half second while the port
# is fine, and a serving side that stopped on that, or a door that failed its waits, stopped a class.
SILENT_AFTER = 3.0


class ServerUnreachableError(ConnectionError):
    """A server stopped answering: what it held (shares, queues) may be lost.

    ``silent`` tells a host that went quiet (it may come back, state intact) from a
    server whose port refuses connections (its process, and what it held, are gone).
    """

    def __init__(self, message: str, name: str = "", silent: bool = False):
        super().__init__(message)
        self.name, self.silent = name, silent


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

    def first_gone(self) -> Optional[str]:
        """The first server whose process is gone, or whose host has been silent for SILENT_AFTER s, or None."""
        now = time.monotonic()
        for name in SERVER_NAMES:
            if port_is_open(*self.config.address(name)):
                self._silent_since.pop(name, None)
            elif not port_is_silent(*self.config.address(name)):
                return name  # refused: the process is gone
            elif now - self._silent_since.setdefault(name, now) >= SILENT_AFTER:
                return name
        return None

    def error(self, name: str) -> ServerUnreachableError:
        return ServerUnreachableError(f"{name} ({self.config.hosts[name]}) is not answering. {self.advice}",
                                      name, port_is_silent(*self.config.address(name)))

    def explain(self, error: BaseException) -> BaseException:
        """The error to show for a failed TF call: the server it lost, if one is gone."""
        gone = self.first_gone()
        return self.error(gone) if gone is not None else error
