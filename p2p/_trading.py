"""Trading, sans-I/O: lookups ranked for a buyer, and the seller's side of a deal.

A lookup answers the longest prefix held by a usable provider, ranked by standing
(delivered to us, stranger, failed us), then price. QUOTE_REQUEST, ACCEPT, REJECT and
RECEIPT go to the market (p2p/_market.py), whose quote states are spec §10.4's table
(p2p/_negotiation.py). A mixin of NodeCore (p2p/_core.py), whose state and outputs it
uses.
"""

from __future__ import annotations

import sqlite3

from kvx.protocol import (
    MAX_FRAME_BYTES,
    Lookup,
    LookupResult,
    MessageType,
    Receipt,
    RemoteProtocolError,
    node_id,
)
from kvx.trust import Statement

from ._clock import Now
from ._events import Sold, StoreDropped, StoreNoteFailed
from ._index import Advert
from ._market import Authorize
from ._peers import State
from ._state import CoreState
from ._store import Payload


class Trading(CoreState):
    def _may_buy(self, peer: bytes, ns: bytes) -> bool:
        """A node id that proved `ns` and that the namespace's rules let buy."""
        try:
            self.policy.check_namespace(peer, ns, publish=False)
        except RemoteProtocolError:
            return False
        return self.memberships.is_member(peer, ns, self.clock.time())

    def _on_lookup(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        lookup = st.message
        assert isinstance(lookup, Lookup)
        if routing is None:
            return
        matched, ads = self._lookup(
            lookup.fp, lookup.ns, lookup.blocks, lookup.limit, asker=st.signer_id
        )
        frames, total = [], 0
        for advert in ads:  # stay well inside one frame
            if total + len(advert.frame) > MAX_FRAME_BYTES // 2:
                break
            frames.append(advert.frame)
            total += len(advert.frame)
        self._reply(
            routing,
            st,
            LookupResult(re=st.header.seq, matched=matched if frames else 0, ads=tuple(frames)),
        )

    def lookup(
        self,
        fp: bytes,
        ns: bytes | None,
        chain: tuple[bytes, ...],
        limit: int,
        *,
        asker: bytes,
        now: Now,
    ) -> tuple[int, list[Advert]]:
        """A local client's lookup (the admin socket); see _lookup."""
        self.clock = now
        return self._lookup(fp, ns, chain, limit, asker=asker)

    def _lookup(
        self, fp: bytes, ns: bytes | None, chain: tuple[bytes, ...], limit: int, *, asker: bytes
    ) -> tuple[int, list[Advert]]:
        """Longest prefix held by a usable provider, best first: those that delivered
        to this node, then live peers, then strangers, then those that failed it; the
        cheapest first in each.

        A peer that has not proved membership of a private namespace gets the answer of
        a namespace with nothing in it, whether or not this node is in it (§7.6).
        """
        if ns is not None:
            if asker == self.id:
                self.policy.check_namespace(asker, ns, publish=False)
            elif not self._may_buy(asker, ns):
                self.metrics.misses.inc()
                return 0, []
        now = self.clock.time()

        def usable(advert: Advert) -> bool:
            # A provider outside our table of 64 peers is no sign of trouble: in a swarm
            # of thousands nearly every provider is. Only a dead or banned one is skipped.
            peer = self.peers.get(advert.signer)
            return (peer is None or peer.state != State.DEAD) and not self.scores.is_banned(
                node_id(advert.signer), now
            )

        def rank(advert: Advert) -> tuple[float, ...]:
            # Standing before price, since a price is the one thing a liar sets for free:
            # a provider that delivered to us first, then live peers that speak for
            # themselves, then strangers, and one that failed us last.
            score = self.scores.score(node_id(advert.signer), now)
            if score < 0:
                return (3, advert.message.price, -score)
            return (2 - self._standing(advert.signer), advert.message.price, -score)

        matched, ads = self.index.lookup(fp, ns, chain, limit, usable=usable, rank=rank)
        (self.metrics.hits if matched else self.metrics.misses).inc()
        return matched, ads

    def _on_quote_request(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        if routing is not None:
            frame = self.market.quote_request(st, self.clock.now_ms(), self.source_network)
            self._reply_frame(routing, frame, MessageType.QUOTE)

    def _on_accept(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        deal = self.market.accept(st, self.clock.now_ms(), self.source_network)
        at_hand = self.market.at_hand(deal)
        if at_hand is None:  # the driver loads it, off the loop
            self._out.append(deal)
        else:  # a loop turn less matters when the loop is busy
            self._serve(deal, *at_hand)

    def loaded(
        self,
        deal: Authorize,
        payload: Payload | None,
        data: bytes | memoryview,
        hashes: list[bytes],
        *,
        now: Now,
    ) -> None:
        """The driver loaded a sold payload: its stream may open."""
        self.clock = now
        self._serve(deal, payload, data, hashes)

    def _serve(
        self,
        deal: Authorize,
        payload: Payload | None,
        data: bytes | memoryview,
        hashes: list[bytes],
    ) -> None:
        """Open the deal's stream, then note the sale in the store's index. The note only
        orders eviction: when the disk refuses it, the deal is served all the same."""
        self.market.serve(deal, data, hashes)
        try:
            self.store.used(deal.entry, payload)
        except sqlite3.Error as exc:
            self.event(StoreNoteFailed(error=str(exc)[:200]))

    def unservable(self, deal: Authorize, why: str, now: Now) -> None:
        """A sold payload failed its root when the driver loaded it: that deal is over
        undelivered, and the payload is neither served nor advertised again."""
        self.clock = now
        self.event(StoreDropped(root=deal.entry.root.hex()[:16], reason=why))
        try:
            self.market.unservable(deal, self.clock.now_ms(), why)
        except sqlite3.Error as exc:
            self._ledger_failed(exc)
        self._withdraw(deal.entry.root)

    def _on_reject(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        frame = self.market.reject(st, self.clock.now_ms())
        if frame is not None and routing is not None:
            self._reply_frame(routing, frame, MessageType.QUOTE)

    def _on_receipt(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        receipt = st.message
        assert isinstance(receipt, Receipt)
        self._earned(self.market.receipt(st, self.clock.now_ms()))
        self.event(Sold(buyer=st.signer_id.hex()[:12], price=receipt.price))
