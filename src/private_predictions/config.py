"""The cluster file: which host and port each of the three servers uses, and where its door is.

A *door* (door.py) is the TLS service through which clients reach server0 and server1;
the servers' TensorFlow runtime itself stays where the first three lines say.
"""
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence

SERVER_NAMES = ("server0", "server1", "server2")
DOOR_SERVERS = ("server0", "server1")  # the two that hold shares: a client sends one to each


@dataclass(frozen=True)
class ClusterConfig:
    hosts: Dict[str, str]
    doors: Dict[str, str] = field(default_factory=dict)  # server name -> "host:port" of its door

    @classmethod
    def local(cls, ports: Sequence[int], door_ports: Sequence[int] = (), door_host: str = "127.0.0.1"):
        """Three servers on this machine, on ``ports`` (one each); doors on ``door_ports`` at ``door_host``."""
        return cls({name: f"localhost:{port}" for name, port in zip(SERVER_NAMES, ports)},
                   {name: f"{door_host}:{port}" for name, port in zip(DOOR_SERVERS, door_ports)})

    @classmethod
    def load(cls, path) -> "ClusterConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"No cluster configuration at {path}. Run notebook 02 (secure serving) "
                "first: it starts the servers and writes this file."
            )
        hosts = json.loads(path.read_text(), object_pairs_hook=OrderedDict)
        doors = hosts.pop("doors", {}) if isinstance(hosts, dict) else {}
        if not isinstance(hosts, dict) or tuple(hosts) != SERVER_NAMES:
            raise ValueError(f"{path} must name exactly {SERVER_NAMES} in order (and may add \"doors\")")
        if not isinstance(doors, dict) or not set(doors) <= set(DOOR_SERVERS):
            raise ValueError(f"{path}: \"doors\" may name only {DOOR_SERVERS}")
        return cls(dict(hosts), dict(doors))

    def save(self, path) -> None:
        """Write the file in one step: a reader never sees half of it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        content = dict(self.hosts, **({"doors": self.doors} if self.doors else {}))
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(content, indent=2) + "\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)

    def address(self, name: str):
        host, port = self.hosts[name].rsplit(":", 1)
        return host, int(port)

    def door_address(self, name: str):
        host, port = self.doors[name].rsplit(":", 1)
        return host, int(port)
