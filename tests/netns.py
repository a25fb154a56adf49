"""Hosts of our own on this machine: Linux network namespaces on one virtual switch.

Each host gets a namespace with its own loopback and one interface, eth0, with an
address of its own; the other end of its cable (a veth pair) is plugged into a bridge
in a switch namespace. Nothing is changed in this machine's own network.
"""
import json
import os
import shutil
import subprocess
from typing import Dict, List, Sequence

SUBNET = "10.0.0"


class NamespacesUnavailable(RuntimeError):
    """This machine or user cannot create network namespaces."""


class VirtualNetwork:
    def __init__(self, hosts: Sequence[str]):
        self.prefix = f"pp{os.getpid()}-"  # unique, so runs side by side do not meet
        self.switch = self.prefix + "switch"
        self.addresses: Dict[str, str] = {h: f"{SUBNET}.{i}" for i, h in enumerate(hosts, start=1)}
        self.created: List[str] = []

    @classmethod
    def create(cls, hosts: Sequence[str]) -> "VirtualNetwork":
        if os.geteuid() != 0:
            raise NamespacesUnavailable("creating network namespaces needs root (CI runs as root)")
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("the `ip` command (iproute2) is not installed")
        network = cls(hosts)
        try:
            network._build()
        except subprocess.CalledProcessError as error:
            network.remove()
            raise NamespacesUnavailable(f"`{' '.join(error.cmd)}` failed: {error.stderr.strip()}") from None
        return network

    def _build(self) -> None:
        self._add_namespace(self.switch)
        self.run_in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
        self.run_in(self.switch, "ip", "link", "set", "br0", "up")
        for number, (host, address) in enumerate(self.addresses.items()):
            namespace, port = self.namespace(host), f"port{number}"
            self._add_namespace(namespace)
            _ip("link", "add", "eth0", "netns", namespace, "type", "veth",
                "peer", "name", port, "netns", self.switch)
            self.run_in(namespace, "ip", "address", "add", f"{address}/24", "dev", "eth0")
            self.run_in(namespace, "ip", "link", "set", "eth0", "up")
            self.run_in(namespace, "ip", "link", "set", "lo", "up")
            self.run_in(self.switch, "ip", "link", "set", port, "master", "br0", "up")

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self.created.append(namespace)

    def namespace(self, host: str) -> str:
        return self.prefix + host

    def launcher(self, host: str) -> List[str]:
        """Put this in front of a command to run it on ``host``."""
        return ["ip", "netns", "exec", self.namespace(host)]

    def run_in(self, namespace: str, *command: str) -> str:
        return subprocess.run(["ip", "netns", "exec", namespace, *command], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def bytes_through(self, host: str) -> int:
        """Bytes that crossed ``host``'s cable so far, both directions."""
        port = f"port{list(self.addresses).index(host)}"
        stats = json.loads(self.run_in(self.switch, "ip", "-json", "-statistics", "link", "show", port))
        return stats[0]["stats64"]["rx"]["bytes"] + stats[0]["stats64"]["tx"]["bytes"]

    def remove(self) -> None:
        """Delete every namespace made; their interfaces go with them."""
        for namespace in reversed(self.created):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=30)
        self.created.clear()


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True, timeout=30)
