"""Trading, sans-I/O: lookups ranked for a buyer, and the seller's side of a deal.

A lookup answers the longest prefix held by a usable provider, ranked by standing
(delivered to us, stranger, failed us), then price. QUOTE_REQUEST, ACCEPT, REJECT and
RECEIPT go to the market (p2p/_market.py), whose quote states are spec §10.4's table
(p2p/_negotiation.py). This part owns the market and whether the ledger can record a
deal now; what it lists it reads from p2p/_gossip.py's index, ranked by p2p/_liveness.py's
standing of each provider.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from kvx.protocol import (
    MAX_FRAME_BYTES,
    DataAddress,
    ErrorCode,
    Lookup,
    LookupResult,
    MessageType,
    Receipt,
    RemoteProtocolError,
    node_id,
)
from kvx.transport import Offer, Sessions
from kvx.trust import Event, Ledger, PeerScores, Receipted, Statement

from ._config import NodeConfig
from ._events import (
    Degraded,
    Earned,
    Looked,
    Rejected,
    Sold,
    StoreDropped,
    StoreNoteFailed,
    StreamCut,
)
from ._gossip import Gossip
from ._index import Advert
from ._liveness import Liveness
from ._market import Authorize, Market
from ._outbox import Outbox
from ._peers import State
from ._pricing import PricePolicy
from ._store import LocalStore, Payload

LEDGER_RETRY_S = 10.0
"""After a failed ledger write (a full disk), the node quotes nothing for this long."""


class Trading:
    def __init__(
        self,
        out: Outbox,
        config: NodeConfig,
        liveness: Liveness,
        gossip: Gossip,
        *,
        scores: PeerScores,
        ledger: Ledger,
        store: LocalStore,
        sessions: Sessions,
        pricing: PricePolicy,
        tokens: Callable[[int], bytes],
    ) -> None:
        self.out = out
        self.config = config
        self.policy = config.policy
        self.id = node_id(out.signer.identity.public_key)
        self.liveness = liveness
        self.gossip = gossip
        self.scores = scores
        self.ledger = ledger
        self.store = store
        self.sessions = sessions
        self.pricing = pricing
        self.tokens = tokens
        self._ledger_failed_at = float("-inf")

    def serve(self, data: tuple[DataAddress, ...]) -> None:
        """Sell at these data addresses: a quote names them."""
        self.market = Market(
            signer=self.out.signer,
            store=self.store,
            ledger=self.ledger,
            sessions=self.sessions,
            policy=self.policy,
            memberships=self.liveness.memberships,
            pricing=self.pricing,
            data={d.t: d.addr for d in data},
            window_bytes=self.config.payment_window_bytes,
            selling=self.selling,
            tokens=self.tokens,
            now_ms=self.out.now.now_ms(),
        )

    def selling(self) -> bool:
        """Whether the ledger can record deals: not within a while of a failed write."""
        return self.out.now.monotonic() - self._ledger_failed_at > LEDGER_RETRY_S

    def ledger_failed(self, exc: sqlite3.Error) -> None:
        """Selling needs the ledger: for a while the node quotes nothing, and says why."""
        self._ledger_failed_at = self.out.now.monotonic()
        self.out.event(Degraded(what="ledger", error=str(exc)[:200]))

    # ---- lookups ---------------------------------------------------------------------

    def on_lookup(self, st: Statement, routing: bytes | None) -> None:
        lookup = st.message
        assert isinstance(lookup, Lookup)
        if routing is None:
            return
        matched, ads = self.lookup(
            lookup.fp, lookup.ns, lookup.blocks, lookup.limit, asker=st.signer_id
        )
        frames, total = [], 0
        for advert in ads:  # stay well inside one frame
            if total + len(advert.frame) > MAX_FRAME_BYTES // 2:
                break
            frames.append(advert.frame)
            total += len(advert.frame)
        self.out.reply(
            routing,
            st,
            LookupResult(re=st.header.seq, matched=matched if frames else 0, ads=tuple(frames)),
        )

    def lookup(
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
            elif not self.liveness.may_buy(asker, ns):
                self.out.event(Looked(matched=0))
                return 0, []
        now = self.out.now.time()
        peers, standing = self.liveness.peers, self.liveness.standing

        def usable(advert: Advert) -> bool:
            # A provider outside our table of 64 peers is no sign of trouble: in a swarm
            # of thousands nearly every provider is. Only a dead or banned one is skipped.
            peer = peers.get(advert.signer)
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
            return (2 - standing(advert.signer), advert.message.price, -score)

        matched, ads = self.gossip.index.lookup(fp, ns, chain, limit, usable=usable, rank=rank)
        self.out.event(Looked(matched=matched))
        return matched, ads

    # ---- the seller's side of a deal -------------------------------------------------

    def on_quote_request(self, st: Statement, routing: bytes | None, network: str) -> None:
        if routing is not None:
            frame = self.market.quote_request(st, self.out.now.now_ms(), network)
            self.out.reply_frame(routing, frame, MessageType.QUOTE)

    def on_accept(self, st: Statement, network: str) -> None:
        deal = self.market.accept(st, self.out.now.now_ms(), network)
        at_hand = self.market.at_hand(deal)
        if at_hand is None:  # the driver loads it, off the loop
            self.out.emit(deal)
        else:  # a loop turn less matters when the loop is busy
            self.serve_deal(deal, *at_hand)

    def serve_deal(
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
            self.out.event(StoreNoteFailed(error=str(exc)[:200]))

    def unservable(self, deal: Authorize, why: str) -> None:
        """A sold payload failed its root when the driver loaded it: that deal is over
        undelivered, and the payload is neither served nor advertised again."""
        self.out.event(StoreDropped(root=deal.entry.root.hex()[:16], reason=why))
        try:
            self.market.unservable(deal, self.out.now.now_ms(), why)
        except sqlite3.Error as exc:
            self.ledger_failed(exc)
        self.gossip.withdraw(deal.entry.root)

    def on_reject(self, st: Statement, routing: bytes | None) -> None:
        frame = self.market.reject(st, self.out.now.now_ms())
        if frame is not None and routing is not None:
            self.out.reply_frame(routing, frame, MessageType.QUOTE)

    def on_receipt(self, st: Statement) -> None:
        paid = self.market.receipt(st, self.out.now.now_ms())
        if paid is not None:  # None: held until the data port books its stream's end
            self._paid(st, paid)

    def _paid(self, st: Statement, paid: Receipted) -> None:
        receipt = st.message
        assert isinstance(receipt, Receipt)
        self.out.event(Earned(credits=paid.credits, tokens=paid.tokens))
        self.out.event(Sold(buyer=st.signer_id.hex()[:12], price=receipt.price))

    def expire(self) -> None:
        """Quotes that expired unaccepted, and deals no stream opened in time, are over."""
        self.market.expire(self.out.now.now_ms())

    # ---- what the data ports tell ----------------------------------------------------

    def window_receipt(self, st: Statement) -> None:
        """A receipt a buyer paid mid-stream (§9.4): the stream moves on only once it is
        recorded, so a refusal here (the ledger's code, or UNAVAILABLE) ends the stream."""
        try:
            paid = self.market.window_receipt(st, self.out.now.now_ms())
        except sqlite3.Error as exc:
            self.ledger_failed(exc)
            raise RemoteProtocolError(ErrorCode.UNAVAILABLE, "this node cannot write now") from None
        self.out.event(Earned(credits=paid.credits, tokens=paid.tokens))

    def stream_finished(self, offer: Offer, sent: int, whole: bool) -> None:
        """A stream of one of our deals ended: delivered, or the deal is over (§10.7)."""
        try:
            held = self.market.finished(offer, sent, whole, self.out.now.now_ms())
        except sqlite3.Error as exc:
            self.ledger_failed(exc)
            return
        except RemoteProtocolError as exc:  # the receipt held for this end does not fit it
            self.out.event(Rejected(code=exc.code.name, detail=exc.detail[:120]))
            return
        if held is not None:
            self._paid(*held)

    def stream_fault(self, buyer: bytes, exc: RemoteProtocolError) -> None:
        """A seller's stream ended for what its buyer did: read below the minimum rate
        (§9.5), holding a thread others needed, or sent a window receipt the seller could
        not take (§9.4). Either breaks a rule of the spec, so the buyer is scored for it;
        a ledger that cannot write is nobody's fault."""
        if exc.code == ErrorCode.UNAVAILABLE:
            return
        event = Event.TIMEOUT if exc.code == ErrorCode.TIMEOUT else Event.BAD_RECEIPT
        self.scores.record(node_id(buyer), event, self.out.now.time())
        self.out.event(
            StreamCut(buyer=node_id(buyer).hex()[:12], code=exc.code.name, why=exc.detail[:120])
        )
