"""Test hosts in network namespaces: four hosts on two switches joined by one link, so
cutting that link partitions the swarm. Created by the test, removed after it; only the
namespaces' own addresses are ever contacted."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from swarm import NodeProcess


def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")


class Network:
    def __init__(self, hosts: int = 4) -> None:
        self.tag = f"kx{os.getpid() % 10000}"
        self.subnet = f"10.199.{os.getpid() % 250}"
        self.switch = f"{self.tag}sw"
        self.hosts = [f"{self.tag}h{i}" for i in range(1, hosts + 1)]
        self.made: list[str] = []
        try:
            self._build()
        except Exception:
            self.close()
            raise

    def _build(self) -> None:
        ip("netns", "add", self.switch)
        self.made.append(self.switch)
        for bridge in ("bra", "brb"):
            ip("link", "add", bridge, "type", "bridge", ns=self.switch)
            ip("link", "set", bridge, "up", ns=self.switch)
        ip("link", "add", "la", "type", "veth", "peer", "name", "lb", ns=self.switch)
        for end, bridge in (("la", "bra"), ("lb", "brb")):
            ip("link", "set", end, "master", bridge, "up", ns=self.switch)
        for i, host in enumerate(self.hosts, 1):
            ip("netns", "add", host)
            self.made.append(host)
            inside, outside = f"{self.tag}e{i}", f"{self.tag}p{i}"
            ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            ip("link", "set", inside, "netns", host)
            ip("link", "set", outside, "netns", self.switch)
            ip("addr", "add", f"{self.address(i)}/24", "dev", inside, ns=host)
            ip("link", "set", inside, "up", ns=host)
            ip("link", "set", "lo", "up", ns=host)
            bridge = "bra" if i <= len(self.hosts) // 2 else "brb"
            ip("link", "set", outside, "master", bridge, "up", ns=self.switch)

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i}"

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.hosts[i - 1])

    def node(self, i: int, data_dir: Path, bootstrap: list[Path], **config: object) -> NodeProcess:
        """A node process on host i, listening on that host's address."""
        return NodeProcess(
            data_dir,
            bootstrap,
            prefix=self.prefix(i),
            listen=f"tcp://{self.address(i)}:0",
            data_host=self.address(i),
            **config,
        )

    def cut(self) -> None:
        ip("link", "set", "la", "down", ns=self.switch)

    def heal(self) -> None:
        ip("link", "set", "la", "up", ns=self.switch)

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.made.clear()
