"""Is every server still there? Asked every half second by whoever waits on them."""
from typing import Optional

from .config import SERVER_NAMES, ClusterConfig
from .ports import port_is_open, port_is_silent


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

    A server whose process died refuses connections at once; one whose host went
    silent (cable, Wi-Fi, sleep) does not answer within the probe's timeout. Either
    way the waiting party learns it within a second or two, without touching
    TensorFlow, whose calls to a silent host never return.
    """

    def __init__(self, config: ClusterConfig, advice: str):
        self.config, self.advice = config, advice

    def check(self) -> None:
        dead = first_dead_server(self.config)
        if dead is not None:
            raise self.error(dead)

    def error(self, name: str) -> ServerUnreachableError:
        return ServerUnreachableError(f"{name} ({self.config.hosts[name]}) is not answering. {self.advice}",
                                      name, port_is_silent(*self.config.address(name)))

    def explain(self, error: BaseException) -> BaseException:
        """The error to show for a failed TF call: the server it lost, if one is gone."""
        dead = first_dead_server(self.config)
        return self.error(dead) if dead is not None else error
