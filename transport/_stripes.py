"""Which provider streams which chunks of one payload, sans-I/O (spec §9.7).

A purchase draws disjoint ranges of chunks from several providers of one root at once.
Every chunk belongs to one stream at a time, so no chunk is asked for, or paid for, twice:
a range only shrinks (a stream the buyer shortens ends at its END) or is given back (a
stream that fails returns every chunk its receipts did not pay for). A provider that
finishes takes what nobody holds, else the larger part of the slowest stream's rest; a
stream that stops moving is abandoned, its rest taken by the others. Time comes in as
`now`: the driver (transport/_fetch.py) does all the I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STALL_MIN_S = 1.0
"""A stream that verified a chunk is abandoned after this long without another, at least."""
STALL_INTERVALS = 6
"""… or after this many of its own mean chunk intervals, when that is longer: a slow
provider is not a stalled one."""
SHORTEN_WAIT_S = 3.0
"""A stream asked to end sooner that sends no END in this long is abandoned."""
YOUNG_S = 1.0
"""A stream that has verified nothing, of a provider not seen before, is not cut for
another before it is this old."""


@dataclass
class Lane:
    """One stream: chunks [first, stop) asked of one deal."""

    key: bytes  # the deal it streams
    provider: bytes
    first: int
    stop: int  # the chunk after the last it was opened for: the seller may send up to here
    opened: float
    asked: int = field(init=False)  # the chunk after the last the buyer still wants of it
    verified: int = field(init=False)  # the first chunk not yet verified
    paid: int = field(init=False)  # the first chunk its window receipts do not cover
    moved: float = field(init=False)  # when it last verified a chunk
    shortened: float | None = None  # when it was asked to end sooner

    def __post_init__(self) -> None:
        self.verified = self.paid = self.first
        self.asked = self.stop
        self.moved = self.opened

    def rate(self, now: float) -> float:
        """Chunks a second since it opened."""
        return (self.verified - self.first) / max(now - self.opened, 1e-3)


@dataclass(frozen=True)
class Shorten:
    """Ask `key`'s stream to end before chunk `stop`."""

    key: bytes
    stop: int


@dataclass(frozen=True)
class Abandon:
    """Give up `key`'s stream: it stalled."""

    key: bytes
    why: str


@dataclass
class Stripes:
    """The chunks [0, needed) of one payload, and who streams which."""

    needed: int
    width: int = 1  # streams the buyer means to run at once
    free: list[tuple[int, int]] = field(default_factory=list)  # ranges nobody holds
    lanes: dict[bytes, Lane] = field(default_factory=dict)  # streams that run
    done: list[tuple[int, int, bytes]] = field(default_factory=list)  # kept: (first, stop, key)
    rates: dict[bytes, float] = field(default_factory=dict)  # chunks/s a provider reached
    opened: int = 0  # streams opened so far

    def __post_init__(self) -> None:
        if self.needed < 1 or self.width < 1:
            raise ValueError("a payload of at least one chunk, over at least one stream")
        self.free = [(0, self.needed)]

    @property
    def complete(self) -> bool:
        return not self.free and not self.lanes

    def wants(self, now: float) -> bool:
        """Whether another provider's stream would help now."""
        return bool(self.free) or (len(self.lanes) < self.width and self._victim(now) is not None)

    # ---- opening ---------------------------------------------------------------------

    def open(
        self, key: bytes, provider: bytes, now: float, sharing: int = 1
    ) -> tuple[int, int] | Shorten | None:
        """A range [first, stop) for a new stream of `key`; or a Shorten to send first,
        after whose END `open` is asked again; or None: nothing left to share. `sharing`:
        the new streams about to open together, this one among them."""
        if self.free:
            first, stop = self.free.pop(0)
            # The first `width` streams share the payload. Later ones share what is free
            # with those running, which will want some once they end; a faster one takes
            # part back if it comes to that.
            if self.opened < self.width:
                coming = self.width - self.opened
            else:
                coming = len(self.lanes) + sharing
            share = math.ceil(self._free_total(first, stop) / coming)
            self.opened += 1
            if stop - first > share:
                self.free.insert(0, (first + share, stop))
                stop = first + share
            self.lanes[key] = Lane(key, provider, first, stop, now)
            return first, stop
        victim = self._victim(now, self.rates.get(provider))
        if victim is None:
            return None
        lane, stop = victim
        lane.asked, lane.shortened = stop, now
        return Shorten(lane.key, stop)

    def _free_total(self, first: int, stop: int) -> int:
        return stop - first + sum(b - a for a, b in self.free)

    def _victim(self, now: float, thief_rate: float | None = None) -> tuple[Lane, int] | None:
        """The stream whose rest would end last, and where to cut it so that it and a
        new stream of the rest end together; None when no cut is worth a new stream."""
        best: tuple[float, Lane, float] | None = None
        for lane in self.lanes.values():
            left = lane.asked - lane.verified
            if lane.shortened is not None or left < 2:
                continue
            rate = self._rate(lane, now)
            if rate is None:
                continue  # nothing known of its pace yet
            eta = math.inf if rate <= 0 else left / rate
            if best is None or eta > best[0]:
                best = (eta, lane, rate)
        if best is None:
            return None
        _, lane, mine = best
        theirs = thief_rate if thief_rate else max(mine, 1e-3)
        keep = math.floor((lane.asked - lane.verified) * mine / (mine + theirs))
        stop = lane.verified + max(1, keep)  # the chunk arriving now stays with it
        return (lane, stop) if stop < lane.asked else None

    def _rate(self, lane: Lane, now: float) -> float | None:
        """Chunks a second the stream goes at: as measured once it verified a chunk, else
        what its provider reached last time; None while nothing is known and it is young."""
        if lane.verified > lane.first or now - lane.opened >= YOUNG_S:
            return lane.rate(now)
        return self.rates.get(lane.provider)

    # ---- progress --------------------------------------------------------------------

    def verified(self, key: bytes, verified: int, paid: int, now: float) -> None:
        lane = self.lanes[key]
        if verified > lane.verified:
            lane.moved = now
        lane.verified, lane.paid = verified, paid

    def declined(self, key: bytes) -> None:
        """The stream could not be shortened (over UCX, or it ended meanwhile)."""
        lane = self.lanes[key]
        lane.asked, lane.shortened = lane.stop, None

    def ended(self, key: bytes, end: int, now: float) -> None:
        """The stream sent END after chunk `end` - 1: it keeps [first, end), and what it
        was opened for beyond that is free again."""
        lane = self.lanes.pop(key)
        self.done.append((lane.first, end, key))
        self.rates[lane.provider] = (end - lane.first) / max(now - lane.opened, 1e-3)
        self._give_back(end, lane.stop)

    def failed(self, key: bytes) -> None:
        """The stream broke: the buyer keeps what its receipts paid for, no more, and every
        other chunk of its range is free again."""
        lane = self.lanes.pop(key)
        if lane.paid > lane.first:
            self.done.append((lane.first, lane.paid, key))
        self._give_back(lane.paid, lane.stop)

    def _give_back(self, first: int, stop: int) -> None:
        if first < stop:
            self.free.append((first, stop))
            self.free.sort()

    def tick(self, now: float) -> list[Abandon]:
        """Streams to abandon: stalled ones, and ones asked to end sooner that did not."""
        out = []
        for lane in self.lanes.values():
            if lane.shortened is not None and now - lane.shortened > SHORTEN_WAIT_S:
                out.append(Abandon(lane.key, "it did not end when asked"))
            elif lane.verified > lane.first:
                interval = (lane.moved - lane.opened) / (lane.verified - lane.first)
                if now - lane.moved > max(STALL_MIN_S, STALL_INTERVALS * interval):
                    out.append(Abandon(lane.key, f"no chunk in {now - lane.moved:.1f} s"))
        return out
