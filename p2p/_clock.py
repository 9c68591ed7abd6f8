"""The clock a node reads, injected so that a simulation can run its own."""

from __future__ import annotations

import time


class Clock:
    """The one clock a node reads: wall time for statements and scores, monotonic time
    for liveness and timers. The simulator gives the core a clock of its own."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def now_ms(self) -> int:
        return int(self.time() * 1000)
