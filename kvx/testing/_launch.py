"""Node daemons as local processes: for the demo swarm, the benchmarks and the tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kvx.p2p import admin_call

T = TypeVar("T")

FAST = {  # timers short enough for tests, long enough for a loaded 2-core machine
    "heartbeat_s": 0.3,
    "suspect_after_s": 2.0,
    "dead_after_s": 4.0,
    "anti_entropy_s": 1.0,
    "metrics_port": -1,
    "leave_grace_s": 3.0,  # a test that stops a node mid-stream waits no longer than this
}


class NodeProcess:
    """One `kvx node` process with its own data dir and generated node.toml."""

    def __init__(
        self,
        data_dir: Path,
        bootstrap: list[Path] = (),
        *,
        tables: str = "",
        prefix: tuple[str, ...] = (),
        **node: object,
    ) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = [str(b) for b in bootstrap]
        settings = {**FAST, **node, "data_dir": ".", "bootstrap": self.bootstrap}
        lines = ["[node]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        # `tables`: more TOML after [node], such as [policy] or [[namespace]].
        (self.dir / "node.toml").write_text("\n".join(lines) + "\n" + tables)
        self.prefix = prefix  # e.g. ("ip", "netns", "exec", NAME): run it on another host
        self.proc: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        (self.dir / "node.json").unlink(missing_ok=True)
        with open(self.dir / "node.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "kvx.cli",
                    "node",
                    "--config",
                    str(self.dir / "node.toml"),
                ],
                stdout=log,
                stderr=log,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict:
        info = self.dir / "node.json"

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {(self.dir / 'node.log').read_text()[-2000:]}")
            return info.exists()

        wait_for(ready, timeout)
        return json.loads(info.read_text())

    @property
    def info(self) -> dict:
        return json.loads((self.dir / "node.json").read_text())

    def call(self, op: str, **args: Any) -> dict:
        return admin_call(self.dir, op, **args)

    def events(self, name: str) -> list[dict]:
        """The records of one event in the node's log (JSON lines), oldest first."""
        lines = (self.dir / "node.log").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e.get("event") == name]

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


def wait_for(check: Callable[[], T], timeout: float = 20.0, every: float = 0.1) -> T:
    """Poll `check` until it returns something truthy and return that, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout} s (last: {value!r})")
        time.sleep(every)
