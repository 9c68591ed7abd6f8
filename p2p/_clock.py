"""The time of an input, which the driver passes to the core with it.

The core reads no clock: the node's driver passes the host's time with every input, the
simulator its own, so that a simulated run is a function of its seed and its inputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Now:
    """Monotonic seconds, for timers and liveness; wall seconds, for what is signed and
    scored."""

    mono: float
    wall: float

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def now_ms(self) -> int:
        return int(self.wall * 1000)
