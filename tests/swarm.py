"""Real node processes on loopback for tests and benchmarks: start, wait, ask, kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvx.p2p import admin_call

FAST = {  # timers short enough for tests, long enough for a loaded 2-core machine
    "heartbeat_s": 0.3,
    "suspect_after_s": 2.0,
    "dead_after_s": 4.0,
    "anti_entropy_s": 1.0,
    "metrics_port": -1,
}


class NodeProcess:
    def __init__(self, data_dir: Path, bootstrap: list[Path] = (), **node: object) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = [str(b) for b in bootstrap]
        settings = {**FAST, **node, "data_dir": ".", "bootstrap": self.bootstrap}
        lines = ["[node]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        (self.dir / "node.toml").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        (self.dir / "node.json").unlink(missing_ok=True)
        with open(self.dir / "node.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvx.cli", "node", "--config", str(self.dir / "node.toml")],
                stdout=log,
                stderr=log,
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict:
        info = self.dir / "node.json"
        deadline = time.monotonic() + timeout
        while not info.exists():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {(self.dir / 'node.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node in {self.dir} not ready")
            time.sleep(0.05)
        return json.loads(info.read_text())

    @property
    def info(self) -> dict:
        return json.loads((self.dir / "node.json").read_text())

    def call(self, op: str, **args: object) -> dict:
        return admin_call(self.dir, op, **args)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def eventually(check, timeout: float = 20.0, every: float = 0.1):
    """Poll `check` until it returns something truthy; its last value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout} s (last: {value!r})")
        time.sleep(every)


class TestPeer:
    """A hand-driven peer: a CURVE DEALER to a node process, sending whatever frames a test
    makes (good or hostile) and reading the node's answers."""

    __test__ = False  # not a test class

    def __init__(self, node: NodeProcess, identity) -> None:
        import zmq

        from kvx.trust import make_curve_client

        self.identity = identity
        self.node_key = bytes.fromhex(node.info["public_key"])
        self.node_id = bytes.fromhex(node.info["node_id"])
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        make_curve_client(self.sock, identity, self.node_key)
        self.sock.connect(node.info["ctl"])

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float = 3.0):
        """The node's next statement to us, opened, or None if it stays silent."""
        from kvx.trust import open_envelope

        if not self.sock.poll(int(timeout * 1000)):
            return None
        return open_envelope(self.sock.recv())

    def close(self) -> None:
        self.sock.close()
        self._ctx.term()
