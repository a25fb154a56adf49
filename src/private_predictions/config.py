"""The cluster configuration file: which host and port each of the three servers uses."""
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

SERVER_NAMES = ("server0", "server1", "server2")
DEFAULT_BASE_PORT = 4440


@dataclass(frozen=True)
class ClusterConfig:
    hosts: Dict[str, str]

    @classmethod
    def local(cls, base_port: int = DEFAULT_BASE_PORT) -> "ClusterConfig":
        return cls({name: f"localhost:{base_port + i}" for i, name in enumerate(SERVER_NAMES)})

    @classmethod
    def load(cls, path) -> "ClusterConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"No cluster configuration at {path}. Run notebooks/02_secure_serving.ipynb "
                "first: it starts the servers and writes this file."
            )
        hosts = json.loads(path.read_text(), object_pairs_hook=OrderedDict)
        if tuple(hosts) != SERVER_NAMES:
            raise ValueError(f"{path} must name exactly {SERVER_NAMES} in order, got {tuple(hosts)}")
        return cls(dict(hosts))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.hosts, indent=2) + "\n")

    def address(self, name: str):
        host, port = self.hosts[name].rsplit(":", 1)
        return host, int(port)

    def tfe_config(self):
        from ._tf import tfe

        return tfe.RemoteConfig(OrderedDict((name, self.hosts[name]) for name in SERVER_NAMES))
