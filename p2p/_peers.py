"""Membership as a sans-I/O table: who the peers are, and whether they are alive.

SWIM-style: a node probes the peers it has probed least recently, counts any valid
statement from a peer as a sign of life, marks a peer suspect when a probe has gone
unanswered for `suspect_after_s` and dead when it still has after `dead_after_s`. Half
way to suspicion it names the peer for indirect probes (`need_help`): other peers probe
it, and a proof that it answered them counts as its answer (`vouched`), so that one
lossy link does not make a healthy peer suspect.
Silence alone suspects nobody: in a table of 64 peers, each is probed only every half
minute or so, and a simulated swarm of 1,000 nodes showed silence-based suspicion
suspecting healthy peers about six times a second per node. Dead peers are still
probed now and then, so that a healed partition joins up again: a statement signed by
the peer itself is proof that it lives. A higher incarnation says the peer restarted
(its address may have changed). The table is bounded; times are passed in.

Admission resists eclipse: a full table admits a newcomer that spoke for itself by
evicting the least proven entry (a dead peer, then a candidate nobody has heard from,
then a suspect, then — at most once a second — a random live peer that is neither
kept by the node (a bootstrap peer, one with a good score) nor among the longest known
half). Names learned from others are candidates only: a quarter of the table at most,
one per address, and forgotten rather than probed once they die unheard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from kvx.protocol import PeerEntry

if TYPE_CHECKING:
    import random


class State(IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2


@dataclass
class Peer:
    key: bytes  # Ed25519 public key
    ctl: str
    inc: int
    state: State
    last_heard: float
    last_probed: float = 0.0
    proven: bool = False  # a statement signed by the peer itself has arrived
    left: bool = False  # it said it stopped serving (LEAVE), and has not spoken since
    since: float = 0.0  # when it was admitted
    awaiting: float | None = None  # when the oldest probe it has not answered was sent
    helped: float | None = None  # the `awaiting` for which others were asked to probe it


class PeerTable:
    def __init__(
        self,
        me: bytes,
        *,
        suspect_after_s: float,
        dead_after_s: float,
        max_peers: int,
        forget_dead_after_s: float = 600.0,
        keep: Callable[[bytes], bool] = lambda key: False,
        evict_every_s: float = 1.0,
        rng: random.Random,
    ) -> None:
        self.me = me
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.max_peers = max_peers
        self.max_candidates = max(1, max_peers // 4)
        self.forget_dead_after_s = forget_dead_after_s
        self.keep = keep
        self.evict_every_s = evict_every_s
        self.evicted = 0  # live peers evicted for newcomers (a metric)
        self._last_eviction = float("-inf")
        self._rng = rng
        self._peers: dict[bytes, Peer] = {}

    def __contains__(self, key: bytes) -> bool:
        return key in self._peers

    def get(self, key: bytes) -> Peer | None:
        return self._peers.get(key)

    def heard_from(self, key: bytes, ctl: str, inc: int, now: float) -> bool:
        """A valid statement came from `key` itself. Returns True if it is new or came back."""
        if key == self.me:
            return False
        peer = self._peers.get(key)
        if peer is None:
            if len(self._peers) >= self.max_peers and not self._make_room(now):
                return False
            self._peers[key] = Peer(key, ctl, inc, State.ALIVE, now, proven=True, since=now)
            return True
        back = peer.state == State.DEAD or inc > peer.inc or not peer.proven
        peer.ctl, peer.inc, peer.left = ctl, max(peer.inc, inc), False
        peer.state, peer.last_heard, peer.proven, peer.awaiting = State.ALIVE, now, True, None
        return back

    def alive_again(self, key: bytes, now: float) -> bool:
        """A valid statement signed by a known peer: it lives. True if it had been dead."""
        peer = self._peers.get(key)
        if peer is None:
            return False
        was_dead = peer.state == State.DEAD
        peer.state, peer.last_heard, peer.proven, peer.awaiting = State.ALIVE, now, True, None
        peer.left = False
        return was_dead

    def left(self, key: bytes, inc: int) -> bool:
        """`key` said it stops serving: dead at once, not after seconds of suspicion, until
        it speaks again. False when the LEAVE is of an incarnation older than we know."""
        peer = self._peers.get(key)
        if peer is None or inc < peer.inc:
            return False
        peer.state, peer.left, peer.awaiting = State.DEAD, True, None
        return True

    def vouched(self, key: bytes) -> bool:
        """Another peer showed us a fresh statement of `key` (§8.18): its probe is
        answered, though it did not answer us. False for a peer not (or no longer) alive
        in our table: only our own probes bring a dead peer back."""
        peer = self._peers.get(key)
        if peer is None or peer.state == State.DEAD:
            return False
        peer.state, peer.awaiting = State.ALIVE, None
        return True

    def need_help(self, now: float) -> list[Peer]:
        """Proven live or suspect peers whose probe has gone unanswered for half the
        suspicion time, for which nobody has been asked to probe yet: one lossy link
        between us must not make them suspect."""
        retry = now - self.suspect_after_s / 2
        chosen = [
            p
            for p in self._peers.values()
            if p.proven
            and p.state != State.DEAD
            and p.awaiting is not None
            and p.awaiting <= retry
            and p.helped != p.awaiting
        ]
        for peer in chosen:
            peer.helped = peer.awaiting
        return chosen

    def learn(self, entries: list[PeerEntry]) -> list[Peer]:
        """Peers named by someone else (peer exchange): candidates to contact, not yet alive."""
        fresh: list[Peer] = []
        for entry in entries:
            if entry.key == self.me or entry.key in self._peers or entry.state == State.DEAD:
                continue
            if any(p.ctl == entry.ctl for p in fresh):
                continue
            fresh.append(Peer(entry.key, entry.ctl, entry.inc, State.SUSPECT, 0.0))
        return fresh

    def add_candidate(self, peer: Peer, now: float) -> bool:
        """Take a peer someone else named, if there is room for one more candidate and
        nobody in the table has its address (so a listing cannot aim us at one victim)."""
        if peer.key in self._peers or len(self._peers) >= self.max_peers:
            return False
        peers = self._peers.values()
        if sum(not p.proven for p in peers) >= self.max_candidates:
            return False
        if any(p.ctl == peer.ctl for p in peers):
            return False
        peer.last_heard = peer.since = peer.awaiting = now  # the node says HELLO right away
        peer.proven = False
        self._peers[peer.key] = peer
        return True

    def _make_room(self, now: float) -> bool:
        """Evict the least proven entry for a newcomer that spoke for itself."""
        peers = list(self._peers.values())
        for group in (
            [p for p in peers if p.state == State.DEAD],
            [p for p in peers if not p.proven],
            [p for p in peers if p.state == State.SUSPECT and not self.keep(p.key)],
        ):
            if group:
                del self._peers[min(group, key=lambda p: p.last_heard).key]
                return True
        if now - self._last_eviction < self.evict_every_s:
            return False
        elders = sorted(peers, key=lambda p: p.since)[: len(peers) // 2]
        protected = {p.key for p in elders}
        open_ = [p for p in peers if p.key not in protected and not self.keep(p.key)]
        if not open_:
            return False
        del self._peers[self._rng.choice(open_).key]
        self._last_eviction = now
        self.evicted += 1
        return True

    def tick(self, now: float) -> tuple[list[Peer], list[Peer]]:
        """Advance suspicion; returns (newly suspect, newly dead) peers."""
        suspect, dead = [], []
        for peer in list(self._peers.values()):
            unanswered = 0.0 if peer.awaiting is None else now - peer.awaiting
            silent = now - peer.last_heard
            if peer.state == State.ALIVE and unanswered > self.suspect_after_s:
                peer.state = State.SUSPECT
                suspect.append(peer)
            if peer.state == State.SUSPECT and unanswered > self.dead_after_s:
                if not peer.proven:  # a name nobody could reach: forget it, do not probe it
                    del self._peers[peer.key]
                    continue
                peer.state = State.DEAD
                dead.append(peer)
            if peer.state == State.DEAD and silent > self.forget_dead_after_s:
                del self._peers[peer.key]
        return suspect, dead

    def to_probe(self, n: int, now: float) -> list[Peer]:
        """The `n` live or suspect peers probed least recently, and one dead peer. Those
        with a probe unanswered for half the suspicion time come first: a retry before
        suspicion, so that one lost frame does not make a healthy peer suspect."""
        live = [p for p in self._peers.values() if p.state != State.DEAD]
        dead = [p for p in self._peers.values() if p.state == State.DEAD]
        retry = now - self.suspect_after_s / 2

        def order(p: Peer) -> tuple[bool, float]:
            return (p.awaiting is None or p.awaiting > retry, p.last_probed)

        chosen = sorted(live, key=order)[:n]
        chosen += sorted(dead, key=lambda p: p.last_probed)[:1]  # is the partition over?
        for peer in chosen:
            peer.last_probed = now
            if peer.awaiting is None:
                peer.awaiting = now
        return chosen

    def alive(self) -> list[Peer]:
        return [p for p in self._peers.values() if p.state == State.ALIVE]

    def all(self) -> list[Peer]:
        return list(self._peers.values())

    def entries(self, limit: int = 64) -> tuple[PeerEntry, ...]:
        """What to tell others in PEERS: the live and suspect peers that spoke for
        themselves, most recently heard first. A name someone else gave and nobody has
        heard at its address is never passed on (spec §8.1a): it may be a victim's."""
        known = sorted(
            (p for p in self._peers.values() if p.state != State.DEAD and p.proven),
            key=lambda p: -p.last_heard,
        )
        return tuple(
            PeerEntry(key=p.key, ctl=p.ctl, inc=p.inc, state=int(p.state)) for p in known[:limit]
        )
