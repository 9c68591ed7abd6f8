"""Gossip, sans-I/O: how a node takes, relays and repairs the swarm's advertisements.

Push: a relayable statement new to the node goes to `fanout` live peers that may see
its namespace. Pull: every answer to a probe names the news its sender took in the last
seconds (PEERS `recent`), and a node missing some asks for it with a DIGEST at once;
anti-entropy sends one random peer a DIGEST every few seconds for whatever both missed.
This part owns the advertisement index, the news it took lately, its pulls and pace
toward each peer, and the node's own advertisements; whom it may tell what it asks of
p2p/_liveness.py.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import TYPE_CHECKING

from kvx.protocol import (
    ENDPOINT_TRANSPORTS,
    Advertise,
    Digest,
    DigestEntry,
    ErrorCode,
    MessageType,
    RemoteProtocolError,
    Withdraw,
    node_id,
    split_ctl,
    split_host_port,
)
from kvx.trust import ReplayGuard, Statement, open_envelope

from ._config import NodeConfig
from ._events import AdPublished, AdReceived, Shed
from ._index import AdId, AdIndex
from ._liveness import Liveness
from ._outbox import Outbox
from ._pricing import PricePolicy
from ._rates import RateLimits
from ._store import Entry, LocalStore, PublishRequest

RECENT_S = 10.0
"""How long a relayable statement a node took counts as news it tells each prober of."""
RECENT_MAX = 64
SEND_RATE_PER_S = 100.0
SEND_BURST = 200
"""Relayable statements a node sends one peer, pushed and in DIGEST answers together
(spec §8.6): half of what a node accepts from a connection by default, so that honest
gossip never runs into a receiver's rate limit."""
DIGEST_PAGE = 200
"""Statements at most in one answer to a DIGEST; the asker pulls the rest in pages."""
PULL_EVERY_S = 1.0
"""The least time between two DIGESTs a node sends one peer."""

if TYPE_CHECKING:
    import random


class Gossip:
    def __init__(
        self,
        out: Outbox,
        config: NodeConfig,
        liveness: Liveness,
        *,
        guard: ReplayGuard,
        store: LocalStore,
        pricing: PricePolicy,
        rng: random.Random,
    ) -> None:
        self.out = out
        self.config = config
        self.policy = config.policy
        self.liveness = liveness
        self.guard = guard  # a relayable statement taken is remembered, as a direct one is
        self.store = store
        self.pricing = pricing
        self.random = rng
        self.index = AdIndex(config.index_budget, standing=liveness.standing)
        self._own: dict[bytes, Statement] = {}  # content root -> our ADVERTISE
        self._recent: deque[tuple[float, AdId, bytes | None]] = deque(maxlen=RECENT_MAX)
        self._pulled: dict[bytes, float] = {}  # peer -> when its news was last pulled
        self._pull_later: set[bytes] = set()  # peers whose pull waits for PULL_EVERY_S
        self.sending = RateLimits(SEND_RATE_PER_S, SEND_BURST)  # our pace to each peer

    def push(self, frame: bytes, mtype: MessageType, exclude: set[bytes], ns: bytes | None) -> None:
        """Gossip a relayable statement to `fanout` live peers that may see its namespace."""
        may_see = self.liveness.may_see
        targets = [
            p.key
            for p in self.liveness.peers.alive()
            if p.key not in exclude and may_see(p.key, ns)
        ]
        now = self.out.now.monotonic()
        for key in self.random.sample(targets, min(self.config.fanout, len(targets))):
            if self.sending.take(key, now):
                self.out.send_frame(key, frame, mtype)
            else:  # that peer's pull (anti-entropy) brings it instead
                self.out.event(Shed(what="push"))

    def _took(self, st: Statement, ns: bytes | None) -> None:
        """A relayable statement was just indexed or applied: recent news, for PEERS."""
        self._recent.append((self.out.now.monotonic(), (st.signer, st.header.seq), ns))

    def recent_for(self, key: bytes) -> tuple[DigestEntry, ...]:
        """The recent news `key` may see, newest first (§8.3 `recent`)."""
        since = self.out.now.monotonic() - RECENT_S
        return tuple(
            DigestEntry(key=signer, seq=seq)
            for at, (signer, seq), ns in reversed(self._recent)
            if at >= since and self.liveness.may_see(key, ns)
        )

    def holds_all(self, entries: tuple[DigestEntry, ...]) -> bool:
        return all(self.index.holds((e.key, e.seq)) for e in entries)

    def all_public(self, entries: tuple[DigestEntry, ...]) -> bool:
        """Whether every one of these is a public advertisement this node holds."""
        return all(self.index.public((e.key, e.seq)) for e in entries)

    def _digest_for(self, key: bytes) -> Digest:
        """Our digest as `key` may see it: ids of a private namespace only for its members."""
        return Digest(have=self.index.digest(lambda ns: self.liveness.may_see(key, ns)))

    def on_advertise(self, st: Statement, relayer: bytes) -> None:
        ad = st.message
        assert isinstance(ad, Advertise)
        if ad.ns is not None:
            if self.policy.namespace(ad.ns) is None:
                return  # a private namespace we are not in: nothing to do with it
            # Only a member may publish into it: the signer proved it to us, or the
            # member that relays it did (members relay only what their members sign).
            may_see = self.liveness.may_see
            if not (may_see(st.signer, ad.ns) or (relayer and may_see(relayer, ad.ns))):
                return
        self.policy.check_namespace(st.signer_id, ad.ns, publish=True)
        for address in (split_ctl(ad.ctl)[0], *self._data_hosts(ad)):
            self.policy.check_address(address)
        if not self.index.add(st):
            return
        self.guard.remember(st.signer, st.header)
        self._took(st, ad.ns)
        self.out.event(
            AdReceived(
                signer=st.signer_id.hex()[:12],
                seq=st.header.seq,
                via=node_id(relayer).hex()[:12] if relayer else "",
            )
        )
        self.liveness.candidate(st.signer, ad.ctl)  # we will need to reach it to buy
        self.push(st.frame, MessageType.ADVERTISE, {relayer, st.signer}, ad.ns)

    @staticmethod
    def _data_hosts(ad: Advertise) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [split_host_port(d.addr)[0] for d in ad.data if d.t in ENDPOINT_TRANSPORTS]

    def on_withdraw(self, st: Statement, relayer: bytes) -> None:
        new, ns = self.index.withdraw(st)
        if new:
            self.guard.remember(st.signer, st.header)
            self._took(st, ns)
            self.push(st.frame, MessageType.WITHDRAW, {relayer, st.signer}, ns)

    def on_digest(self, st: Statement, routing: bytes | None) -> None:
        """Answer with one page of what the asker lacks, within our pace for it; when more
        is left, our own DIGEST tells it so and it pulls the next page (§8.6)."""
        digest = st.message
        assert isinstance(digest, Digest)
        missing = self.index.missing_from(
            digest.have, lambda ns: self.liveness.may_see(st.signer, ns), DIGEST_PAGE + 1
        )  # one more than a page: whether more is left
        now = self.out.now.monotonic()
        page = self.sending.take(st.signer, now, min(len(missing), DIGEST_PAGE))
        for frame in missing[:page]:
            # Answer on the connection the DIGEST came on: the asker may not listen itself.
            self.out.answer_frame(routing, st.signer, frame, MessageType.ADVERTISE)
        if page < len(missing) or self.index.lacks_any(digest.have):
            self.pull_news(st.signer, routing)

    def pull_news(self, key: bytes, routing: bytes | None = None) -> None:
        """Send `key` our DIGEST (which asks for what we lack and shows what we hold), at
        most once each PULL_EVERY_S; a pull that comes sooner waits for its time. It goes
        on the connection `routing` names (the one a DIGEST of `key` came on), if any."""
        now = self.out.now.monotonic()
        if now - self._pulled.get(key, float("-inf")) < PULL_EVERY_S:
            self._pull_later.add(key)
            return
        self._pulled[key] = now
        self._pull_later.discard(key)
        self.out.answer(routing, key, self._digest_for(key))

    def signer_left(self, st: Statement) -> int:
        """A peer said LEAVE: its advertisements go; returns how many."""
        return self.index.signer_left(st.signer, st.header.seq, st.header.iat)

    def drop_signer(self, key: bytes) -> int:
        """A convicted seller's advertisements go, and stay out; returns how many."""
        return self.index.drop_signer(key)

    def _advertise(self, entry: Entry) -> None:
        ad = Advertise(
            fp=entry.fp,
            layout=entry.layout,
            blocks=entry.blocks,
            root=entry.root,
            chunk=entry.chunk,
            price=self.pricing.ask(
                entry.params, entry.layout, len(entry.blocks) * entry.layout.block, entry.size
            ),
            ctl=self.liveness.ctl,
            data=self.liveness.data,
            ns=entry.ns,
        )
        frame = self.out.seal(ad, ttl_ms=int(self.config.advert_ttl_s * 1000))
        st = open_envelope(frame)
        self.index.add(st)
        self._took(st, entry.ns)
        self._own[entry.root] = st
        self.out.event(
            AdPublished(root=entry.root.hex()[:16], seq=st.header.seq, blocks=len(entry.blocks))
        )
        self.push(frame, MessageType.ADVERTISE, set(), entry.ns)

    def advertise_stored(self) -> None:
        """Advertise every payload the store holds (the node starts serving)."""
        for entry in self.store.entries():
            self._advertise(entry)

    def withdraw(self, root: bytes) -> None:
        """Withdraw our advertisement of a payload (evicted, failed, or asked)."""
        st = self._own.pop(root, None)
        if st is None:
            return
        frame = self.out.seal(
            Withdraw(ad=st.header.seq), ttl_ms=int(self.config.advert_ttl_s * 1000)
        )
        withdrawal, ad = open_envelope(frame), st.message
        assert isinstance(ad, Advertise)
        self.index.withdraw(withdrawal)
        self._took(withdrawal, ad.ns)
        self.push(frame, MessageType.WITHDRAW, set(), ad.ns)

    def publish(self, request: PublishRequest) -> Entry:
        if request.ns is not None and self.policy.namespace(request.ns) is None:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node is not in that namespace")
        entry, evicted = self.store.put(request)
        for old in evicted:
            self.withdraw(old.root)
        self._advertise(entry)
        return entry

    def advertisement(self, root: bytes) -> Statement:
        """This node's live ADVERTISE of the payload with this content root."""
        return self._own[root]

    # ---- timers ----------------------------------------------------------------------

    def pull_news_due(self) -> None:
        """Pulls that waited for their time (each second, from housekeeping)."""
        for key in list(self._pull_later):
            if key in self.liveness.peers:
                self.pull_news(key)
            else:
                self._pull_later.discard(key)

    def refresh_own(self) -> None:
        """Advertise our payloads again before their advertisements expire."""
        half = self.config.advert_ttl_s * 500
        for root, st in list(self._own.items()):
            if st.header.exp - self.out.now.now_ms() < half:
                entry = next((e for e in self.store.entries() if e.root == root), None)
                if entry is not None:
                    self._advertise(entry)

    def anti_entropy_round(self) -> None:
        alive = self.liveness.peers.alive()
        if alive:
            self.pull_news(self.random.choice(alive).key)

    def expire(self) -> None:
        self.index.expire(self.out.now.now_ms())

    def forget_strangers(self, known: set[bytes]) -> None:
        """Pull times and paces of peers no longer in the table go."""
        self.sending.prune(self.out.now.monotonic())
        for key in [k for k in self._pulled if k not in known]:
            del self._pulled[key]
