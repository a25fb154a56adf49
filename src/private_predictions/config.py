"""The cluster configuration file: which host and port each of the three servers uses."""
import json
import socket
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

        return tfe.RemoteConfig(OrderedDict((name, self.hosts[name]) for name in SERVER_NAMES), job_name=TFE_JOB)

    def connect_this_process(self) -> None:
        """Make the three servers available to this process as TF devices.

        This process joins the cluster as a task of its own, and the servers connect
        back to it while running a model (parts of a traced function stay here). TF's
        default (tf-encrypted's ``connect_servers``) gives this task the address
        ``localhost:PORT``, which on another machine means that machine itself: with
        servers on other hosts, every private prediction failed with "failed to
        connect to all addresses". So the address given is the one the servers reach us at.
        """
        from ._tf import tf
        from .cluster import find_free_base_port

        own_address = address_towards(*self.address(SERVER_NAMES[0]))
        cluster = tf.train.ClusterSpec({
            TFE_JOB: [self.hosts[name] for name in SERVER_NAMES],
            LOCAL_JOB: [f"{own_address}:{find_free_base_port(count=1)}"],
        })
        tf.config.experimental_connect_to_cluster(cluster, job_name=LOCAL_JOB)


TFE_JOB, LOCAL_JOB = "tfe", "localhost"  # the names tf-encrypted's device names use


def address_towards(host: str, port: int) -> str:
    """This machine's IP address on the route to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]
