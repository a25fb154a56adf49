"""The cluster file: which host and port each of the three servers uses."""
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence

SERVER_NAMES = ("server0", "server1", "server2")


@dataclass(frozen=True)
class ClusterConfig:
    hosts: Dict[str, str]

    @classmethod
    def local(cls, ports: Sequence[int]) -> "ClusterConfig":
        """Three servers on this machine, on ``ports`` (one each)."""
        return cls({name: f"localhost:{port}" for name, port in zip(SERVER_NAMES, ports)})

    @classmethod
    def load(cls, path) -> "ClusterConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"No cluster configuration at {path}. Run notebook 02 (secure serving) "
                "first: it starts the servers and writes this file."
            )
        hosts = json.loads(path.read_text(), object_pairs_hook=OrderedDict)
        if not isinstance(hosts, dict) or tuple(hosts) != SERVER_NAMES:
            raise ValueError(f"{path} must name exactly {SERVER_NAMES} in order")
        return cls(dict(hosts))

    def save(self, path) -> None:
        """Write the file in one step: a reader never sees half of it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(self.hosts, indent=2) + "\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)

    def address(self, name: str):
        host, port = self.hosts[name].rsplit(":", 1)
        return host, int(port)
