"""Dials of addresses nobody has proven yet, each with a backoff of its own.

An address in an ADVERTISE or a PEERS entry is a stranger's claim; the node dials it to
hear the key there speak for itself. libzmq's reconnect backoff grows only while
connects fail, not when the far end accepts and closes, so an address of a victim that
is not a kvx node would be dialed every second for as long as the claim stands. The
driver gives such an address one attempt per connection (libzmq's reconnection off), and
new connections to it — when the peer table names it again — from `first_s` apart,
doubling to `max_s` (spec §8.1a).
"""

from __future__ import annotations

FIRST_S = 1.0
MAX_S = 64.0
MAX_ADDRESSES = 4096
"""Addresses whose backoff is remembered; past it the one due longest ago is forgotten."""


class Dials:
    def __init__(self, first_s: float = FIRST_S, max_s: float = MAX_S) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next: dict[str, tuple[float, float]] = {}  # address -> (next attempt, wait)

    def __len__(self) -> int:
        return len(self._next)

    def allow(self, address: str, now: float) -> bool:
        """Whether an attempt at `address` may be made now; if so it is counted."""
        at, wait = self._next.get(address, (now, self.first_s / 2))
        if now < at:
            return False
        wait = min(wait * 2, self.max_s)
        self._next.pop(address, None)
        self._next[address] = (now + wait, wait)  # newest last
        if len(self._next) > MAX_ADDRESSES:
            del self._next[next(iter(self._next))]
        return True

    def proven(self, address: str) -> None:
        """A key at `address` spoke for itself: its connection is the node's to keep."""
        self._next.pop(address, None)

    def prune(self, now: float) -> None:
        """Forget addresses not dialed for longer than the longest backoff: a name that
        comes back within it (a new listing of the same victim) keeps its backoff."""
        self._next = {a: (at, w) for a, (at, w) in self._next.items() if now < at + self.max_s}
