"""Which connections a node opens to its peers (spec §8.1a), sans-I/O.

One connection per address: a second key claiming an address that another key's
connection uses gets none until it has spoken for itself, so a listing of many keys at
one victim's address costs the victim one connection, not one per key.

An address in an ADVERTISE or a PEERS entry is a stranger's claim; the node dials it to
hear the key there speak for itself. libzmq's reconnect backoff grows only while
connects fail, not when the far end accepts and closes, so an address of a victim that
is not a kvx node would be dialed every second for as long as the claim stands. The
driver gives such an address one attempt per connection (libzmq's reconnection off), and
new connections to it — when the peer table names it again — from `first_s` apart,
doubling to `max_s` (spec §8.1a).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Connect:
    """Open this node's connection to `key` at `ctl`: one libzmq keeps reconnecting when
    the key is `proven` (it spoke for itself, or is a bootstrap peer), else one attempt."""

    key: bytes
    ctl: str
    proven: bool


class Connections:
    """The connections a node holds to its peers, by key, and the rule that opens them."""

    def __init__(self) -> None:
        self.dials = Dials()
        self._ctl: dict[bytes, str] = {}  # key -> the address its connection dials
        self._key: dict[str, bytes] = {}  # address -> the key its connection speaks to
        self._trial: set[bytes] = set()  # keys connected to before they were proven

    def __len__(self) -> int:
        return len(self._ctl)

    def connected(self) -> list[bytes]:
        return list(self._ctl)

    def reach(
        self, key: bytes, ctl: str | None, proven: bool, now: float
    ) -> tuple[list[bytes], Connect | None, bool]:
        """For a statement to `key` (whose address is `ctl`, if known): the keys whose
        connections to drop first, the connection to open, and whether to send at all."""
        drop: list[bytes] = []
        if key in self._trial and proven:
            # It spoke: from now on a connection that libzmq keeps, reconnecting.
            self.dials.proven(self._ctl[key])
            drop.append(key)
            self.forget(key)
        if key in self._ctl:
            return drop, None, True
        if ctl is None:
            return drop, None, False
        other = self._key.get(ctl)
        if other is not None and other != key:
            if not proven:
                return drop, None, False
            drop.append(other)
            self.forget(other)
        if not (proven or self.dials.allow(ctl, now)):
            return drop, None, False
        self._ctl[key], self._key[ctl] = ctl, key
        if not proven:
            self._trial.add(key)
        return drop, Connect(key, ctl, proven), True

    def forget(self, key: bytes) -> None:
        """The connection to `key` is gone (dropped, or it could not be made)."""
        ctl = self._ctl.pop(key, None)
        if ctl is not None and self._key.get(ctl) == key:
            del self._key[ctl]
        self._trial.discard(key)
