"""Gossip, sans-I/O: how a node takes, relays and repairs the swarm's advertisements.

Push: a relayable statement new to the node goes to `fanout` live peers that may see
its namespace. Pull: every answer to a probe names the news its sender took in the last
seconds (PEERS `recent`), and a node missing some asks for it with a DIGEST at once;
anti-entropy sends one random peer a DIGEST every few seconds for whatever both missed.
A mixin of NodeCore (p2p/_core.py), whose state and outputs it uses.
"""

from __future__ import annotations

import ipaddress

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
from kvx.trust import Statement, open_envelope

from ._clock import Now
from ._events import AdPublished, AdReceived
from ._peers import Peer, State
from ._state import CoreState
from ._store import Entry, PublishRequest

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


class Gossip(CoreState):
    def _push(
        self, frame: bytes, mtype: MessageType, exclude: set[bytes], ns: bytes | None
    ) -> None:
        """Gossip a relayable statement to `fanout` live peers that may see its namespace."""
        targets = [
            p.key for p in self.peers.alive() if p.key not in exclude and self._may_see(p.key, ns)
        ]
        now = self.clock.monotonic()
        for key in self.random.sample(targets, min(self.config.fanout, len(targets))):
            if self._sending.take(key, now):
                self._send_frame(key, frame, mtype)
            else:  # that peer's pull (anti-entropy) brings it instead
                self.metrics.shed.labels("push").inc()

    def _may_see(self, key: bytes, ns: bytes | None) -> bool:
        """Private advertisements go only to peers that proved the namespace (spec §7.6)."""
        return self.memberships.is_member(node_id(key), ns, self.clock.time())

    def _took(self, st: Statement, ns: bytes | None) -> None:
        """A relayable statement was just indexed or applied: recent news, for PEERS."""
        self._recent.append((self.clock.monotonic(), (st.signer, st.header.seq), ns))

    def _recent_for(self, key: bytes) -> tuple[DigestEntry, ...]:
        """The recent news `key` may see, newest first (§8.3 `recent`)."""
        since = self.clock.monotonic() - RECENT_S
        return tuple(
            DigestEntry(key=signer, seq=seq)
            for at, (signer, seq), ns in reversed(self._recent)
            if at >= since and self._may_see(key, ns)
        )

    def _digest_for(self, key: bytes) -> Digest:
        """Our digest as `key` may see it: ids of a private namespace only for its members."""
        return Digest(have=self.index.digest(lambda ns: self._may_see(key, ns)))

    def _on_advertise(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        ad = st.message
        assert isinstance(ad, Advertise)
        if ad.ns is not None:
            if self.policy.namespace(ad.ns) is None:
                return  # a private namespace we are not in: nothing to do with it
            # Only a member may publish into it: the signer proved it to us, or the
            # member that relays it did (members relay only what their members sign).
            if not (self._may_see(st.signer, ad.ns) or (relayer and self._may_see(relayer, ad.ns))):
                return
        self.policy.check_namespace(st.signer_id, ad.ns, publish=True)
        for address in (split_ctl(ad.ctl)[0], *self._data_hosts(ad)):
            self.policy.check_address(address)
        if not self.index.add(st):
            return
        self.inbox.guard.remember(st.signer, st.header)
        self._took(st, ad.ns)
        self.event(
            AdReceived(
                signer=st.signer_id.hex()[:12],
                seq=st.header.seq,
                via=node_id(relayer).hex()[:12] if relayer else "",
            )
        )
        self.metrics.ads.set(len(self.index))
        if st.signer not in self.peers:
            # The provider may be news to us; we will need to reach it to buy.
            self.peers.add_candidate(
                Peer(st.signer, ad.ctl, 0, State.SUSPECT, 0.0), self.clock.monotonic()
            )
        self._push(st.frame, MessageType.ADVERTISE, {relayer, st.signer}, ad.ns)

    @staticmethod
    def _data_hosts(ad: Advertise) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [split_host_port(d.addr)[0] for d in ad.data if d.t in ENDPOINT_TRANSPORTS]

    def _on_withdraw(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        new, ns = self.index.withdraw(st)
        if new:
            self.inbox.guard.remember(st.signer, st.header)
            self._took(st, ns)
            self.metrics.ads.set(len(self.index))
            self._push(st.frame, MessageType.WITHDRAW, {relayer, st.signer}, ns)

    def _on_digest(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        """Answer with one page of what the asker lacks, within our pace for it; when more
        is left, our own DIGEST tells it so and it pulls the next page (§8.6)."""
        digest = st.message
        assert isinstance(digest, Digest)
        missing = self.index.missing_from(
            digest.have, lambda ns: self._may_see(st.signer, ns), DIGEST_PAGE + 1
        )  # one more than a page: whether more is left
        page = self._sending.take(st.signer, self.clock.monotonic(), min(len(missing), DIGEST_PAGE))
        for frame in missing[:page]:
            # Answer on the connection the DIGEST came on: the asker may not listen itself.
            if routing is not None:
                self._reply_frame(routing, frame, MessageType.ADVERTISE)
            else:
                self._send_frame(st.signer, frame, MessageType.ADVERTISE)
        if page < len(missing) or self.index.lacks_any(digest.have):
            self._pull_news(st.signer, routing, st)

    def _pull_news(
        self, key: bytes, routing: bytes | None = None, asked: Statement | None = None
    ) -> None:
        """Send `key` our DIGEST (which asks for what we lack and shows what we hold), at
        most once each PULL_EVERY_S; a pull that comes sooner waits for its time."""
        now = self.clock.monotonic()
        if now - self._pulled.get(key, float("-inf")) < PULL_EVERY_S:
            self._pull_later.add(key)
            return
        self._pulled[key] = now
        self._pull_later.discard(key)
        if routing is not None and asked is not None:
            self._reply(routing, asked, self._digest_for(key))
        else:
            self._send(key, self._digest_for(key))

    def _pull_news_due(self) -> None:
        """Pulls that waited for their time (each second, from housekeeping)."""
        for key in list(self._pull_later):
            if key in self.peers:
                self._pull_news(key)
            else:
                self._pull_later.discard(key)

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
            ctl=self.ctl,
            data=self.data,
            ns=entry.ns,
        )
        frame = self.signer.seal(
            ad, now_ms=self.clock.now_ms(), ttl_ms=int(self.config.advert_ttl_s * 1000)
        )
        st = open_envelope(frame)
        self.index.add(st)
        self._took(st, entry.ns)
        self._own[entry.root] = st
        self.metrics.ads.set(len(self.index))
        self.event(
            AdPublished(root=entry.root.hex()[:16], seq=st.header.seq, blocks=len(entry.blocks))
        )
        self._push(frame, MessageType.ADVERTISE, set(), entry.ns)

    def withdraw(self, root: bytes, now: Now) -> None:
        """Withdraw our advertisement of a payload, as asked (the admin socket)."""
        self.clock = now
        self._withdraw(root)

    def _withdraw(self, root: bytes) -> None:
        """Withdraw our advertisement of a payload (evicted, failed, or asked)."""
        st = self._own.pop(root, None)
        if st is None:
            return
        frame = self.signer.seal(
            Withdraw(ad=st.header.seq),
            now_ms=self.clock.now_ms(),
            ttl_ms=int(self.config.advert_ttl_s * 1000),
        )
        withdrawal, ad = open_envelope(frame), st.message
        assert isinstance(ad, Advertise)
        self.index.withdraw(withdrawal)
        self._took(withdrawal, ad.ns)
        self.metrics.ads.set(len(self.index))
        self._push(frame, MessageType.WITHDRAW, set(), ad.ns)

    def publish(self, request: PublishRequest, now: Now) -> Entry:
        self.clock = now
        if request.ns is not None and self.policy.namespace(request.ns) is None:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node is not in that namespace")
        entry, evicted = self.store.put(request)
        for old in evicted:
            self._withdraw(old.root)
        self._advertise(entry)
        return entry

    def advertisement(self, root: bytes) -> Statement:
        """This node's live ADVERTISE of the payload with this content root."""
        return self._own[root]

    def _refresh_own(self) -> None:
        """Advertise our payloads again before their advertisements expire."""
        half = self.config.advert_ttl_s * 500
        for root, st in list(self._own.items()):
            if st.header.exp - self.clock.now_ms() < half:
                entry = next((e for e in self.store.entries() if e.root == root), None)
                if entry is not None:
                    self._advertise(entry)

    def _anti_entropy_round(self) -> None:
        alive = self.peers.alive()
        if alive:
            self._pull_news(self.random.choice(alive).key)
