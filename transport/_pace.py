"""A data stream's pace: a deadline for the whole stream and a minimum rate, checked at
every send (spec §9.5, §13.1).

A seller streams on a thread of a small pool, so a reader that takes a few bytes now
and then holds a thread others need. Each send blocks at most CHECK_S before the pace
is checked again; a stream below the minimum rate after its grace is cut, and, while
other streams wait for a thread, so is any stream that is below it at all. The seller
scores a reader it cut (it broke the rate the spec sets), never one it merely queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvx.protocol import ErrorCode, RemoteProtocolError

CHECK_S = 0.5
"""The longest one send blocks before the stream's pace is checked again."""
PRESSED_GRACE_S = 1.0
"""A stream's first second is never cut for others waiting: TCP is still ramping up."""


class Pace:
    """One stream's clock: `check` before each send (and each wait for a receipt),
    `sent` after it."""

    def __init__(
        self, size: int, stall_s: float, min_rate: int, pressed: Callable[[], bool]
    ) -> None:
        self.start = self.progress_at = time.monotonic()
        self.deadline = self.start + stall_s + size / min_rate
        self.stall_s, self.min_rate, self.pressed = stall_s, min_rate, pressed
        self.bytes = 0
        self.cut: str | None = None  # why the stream was cut for its pace, if it was

    def check(self) -> float:
        """Raise TIMEOUT when the reader has fallen behind; else how long the next send
        may block."""
        now = time.monotonic()
        elapsed = now - self.start
        if now >= self.deadline:
            self.cut = "the stream's deadline passed"
        elif now - self.progress_at >= self.stall_s:
            self.cut = f"no progress in {self.stall_s:g} s"
        elif self.bytes < self.min_rate * (elapsed - self.stall_s):
            self.cut = "below the minimum rate"
        elif elapsed >= PRESSED_GRACE_S and self.bytes < self.min_rate * elapsed and self.pressed():
            self.cut = "below the minimum rate while other streams wait"
        else:
            return min(CHECK_S, self.deadline - now)
        raise RemoteProtocolError(ErrorCode.TIMEOUT, f"the reader is too slow: {self.cut}")

    def sent(self, n: int) -> None:
        if n:
            self.bytes += n
            self.progress_at = time.monotonic()
