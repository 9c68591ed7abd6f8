"""The seller's side of a sale (spec §10): quotes, counter-offers, deals and receipts.

Compatibility is settled before any byte moves: an unknown fingerprint, a chain it holds
nothing of, a dtype it cannot convert to, a price below its floor, a buyer over its
credit — each is refused with its code at QUOTE_REQUEST time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from kvx.protocol import (
    Accept,
    Ephemeral,
    ErrorCode,
    KVLayout,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    RemoteProtocolError,
    channel_key,
    chunk_hashes,
    content_root,
    node_id,
)
from kvx.transport import Expected, Offer, Sessions, choose_transport
from kvx.trust import Ledger, Memberships, Policy, Receipted, Signer, Statement, open_envelope

from ._negotiation import Phase, advance
from ._pricing import PricePolicy
from ._store import Entry, LocalStore, Payload

CONVERTIBLE = ("float32", "float16", "bfloat16")
QUOTE_TTL_MS = 30_000
MAX_COUNTERS = 3


def _fail(code: ErrorCode, detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, detail)


Loaded = tuple["Payload | None", bytes | memoryview, list[bytes]]
"""A sold payload made ready: the stored payload if it was read, the bytes to serve (a
view of ones another deal serves, or a conversion), and their chunk list."""


def convert(data: bytes, src: str, dst: str) -> bytes:
    """KV bytes from one float type to another (the conversions a quote may name)."""
    import torch  # only a seller that converts needs it

    tensor = torch.frombuffer(bytearray(data), dtype=getattr(torch, src))
    return tensor.to(getattr(torch, dst)).view(torch.uint8).numpy().tobytes()


@dataclass(frozen=True)
class Authorize:
    """A deal is recorded: load its payload (read it, check it against its root, convert
    its dtype) off the event loop with Market.load, then open its stream with
    NodeCore.loaded — or NodeCore.unservable if the payload failed. A payload of GiBs
    takes a second to read and hash; on the loop, that second is every peer's."""

    quote: Quote
    buyer: bytes  # its Ed25519 public key: only it may open the stream
    entry: Entry
    layout: KVLayout  # as delivered
    expires_ms: int  # the stream's token lapses then
    key: bytes | None  # the deal's channel key, when the stream is sealed (§9.6)


@dataclass
class _Pending:
    quote: Statement
    buyer: bytes  # the buyer's public key
    entry: Entry
    layout: KVLayout  # as delivered
    lowest: int
    counters: int = 0
    phase: Phase = Phase.OFFERED
    ephemeral: Ephemeral | None = None  # this quote's half of the channel key (§9.6)


class Market:
    def __init__(
        self,
        *,
        signer: Signer,
        store: LocalStore,
        ledger: Ledger,
        sessions: Sessions,
        policy: Policy,
        memberships: Memberships,
        pricing: PricePolicy,
        data: dict[str, str],  # transport -> data address
        window_bytes: int = 64 << 20,
        selling: Callable[[], bool] = lambda: True,
        tokens: Callable[[int], bytes],
        now_ms: int,
    ) -> None:
        self.signer = signer
        self.store = store
        self.ledger = ledger
        self.sessions = sessions
        self.policy = policy
        self.memberships = memberships
        self.pricing = pricing
        self.data = data
        self.window_bytes = window_bytes
        self.selling = selling
        self.tokens = tokens  # quote ids and session tokens: unguessable in a node
        self._pending: dict[bytes, _Pending] = {}
        self._early: dict[bytes, Statement] = {}  # quote id -> final receipt before its end
        # No stream outlives the process that served it: deals left open are over.
        self.ledger.expire_undelivered(now_ms, "the seller restarted")
        self._conversion: tuple[tuple[bytes, str], tuple[bytes, bytes, list[bytes]]] | None = None

    def quote_request(self, st: Statement, now_ms: int, network: str = "") -> bytes:
        """Answer a QUOTE_REQUEST with a signed QUOTE frame, or raise why not; `network`
        is the source network the request came from (§10.5)."""
        req = st.message
        assert isinstance(req, QuoteRequest)
        buyer = st.signer_id
        if not self.selling():
            raise _fail(ErrorCode.UNAVAILABLE, "this node cannot record deals now")
        if req.ns is not None:
            try:
                self.policy.check_namespace(buyer, req.ns, publish=False)
                self.memberships.require(buyer, req.ns, now_ms / 1000)
            except RemoteProtocolError:
                # One answer whether or not we are in it: no oracle for outsiders (§7.6).
                raise _fail(ErrorCode.NOT_FOUND, "no block of that chain is held here") from None
        matched, entry = self.store.best_match(req.fp, req.ns, req.blocks)
        if entry is None:
            # Only the request's own namespace counts: what is held elsewhere (public, or
            # another private namespace) must not change the answer (§7.7, §10.2).
            if not any(e.fp == req.fp and e.ns == req.ns for e in self.store.entries()):
                raise _fail(ErrorCode.FINGERPRINT_MISMATCH, "no KV held for that fingerprint")
            raise _fail(ErrorCode.NOT_FOUND, "no block of that chain is held here")
        layout = entry.layout
        if req.dtype is not None and req.dtype != layout.dtype:
            if req.dtype not in CONVERTIBLE or layout.dtype not in CONVERTIBLE:
                raise _fail(
                    ErrorCode.UNSUPPORTED_CONVERSION,
                    f"{layout.dtype} cannot be delivered as {req.dtype}",
                )
            layout = replace(layout, dtype=req.dtype)
        transport = choose_transport(req.transports, self.data)
        tokens = matched * layout.block
        ask = self.pricing.ask(entry.params, layout, tokens, layout.payload_bytes(matched))
        lowest = self.pricing.lowest(ask)
        if req.max_price < lowest:
            raise _fail(ErrorCode.PRICE_TOO_HIGH, f"the lowest price is {lowest}")
        price = min(ask, req.max_price)
        window = max(entry.chunk, self.window_bytes // entry.chunk * entry.chunk)
        self.ledger.check_credit(buyer, price, self.policy.credit_limit_for(buyer))
        unpaid = min(window, layout.payload_bytes(matched))
        self.ledger.check_unpaid(
            buyer, network, unpaid, now_ms, self.policy.unpaid, self.window_bytes
        )
        root = entry.root if layout == entry.layout else self._converted(entry, layout)[1]
        # Sealed when the buyer asks, and always for a private namespace (§9.6).
        ephemeral = Ephemeral() if req.seal or req.ns is not None else None
        quote = Quote(
            re=st.header.seq,
            quote=self.tokens(16),
            blocks=matched,
            stored=len(entry.blocks),
            layout=layout,
            root=root,
            chunk=entry.chunk,
            price=price,
            transport=transport,
            data=self.data[transport],
            token=self.tokens(32),
            window=window,
            kx=None if ephemeral is None else ephemeral.public,
        )
        return self._offer(quote, st.signer, entry, lowest, now_ms, ephemeral)

    def _offer(
        self,
        quote: Quote,
        buyer: bytes,
        entry: Entry,
        lowest: int,
        now_ms: int,
        ephemeral: Ephemeral | None,
        counters: int = 0,
    ) -> bytes:
        frame = self.signer.seal(quote, now_ms=now_ms, to=node_id(buyer), ttl_ms=QUOTE_TTL_MS)
        self._pending[quote.quote] = _Pending(
            open_envelope(frame), buyer, entry, quote.layout, lowest, counters, ephemeral=ephemeral
        )
        self.sessions.expect(quote.token)
        return frame

    def _converted(
        self, entry: Entry, layout: KVLayout, payload: Payload | None = None
    ) -> tuple[bytes, bytes, list[bytes]]:
        """(data, root, hashes) of a stored payload in another dtype.

        The QUOTE needs the root and its ACCEPT the data: one slot keeps the latest
        conversion so the pair converts and hashes once, and memory holds one payload at
        most. The slot is replaced whole, so a load off the loop reads it safely.
        """
        key = (entry.root, layout.dtype)
        slot = self._conversion
        if slot is None or slot[0] != key:
            source = self.store.get(entry.root) if payload is None else payload
            data = convert(source.data, entry.layout.dtype, layout.dtype)
            hashes = chunk_hashes(data, entry.chunk)
            root = content_root(len(data), entry.chunk, hashes)
            slot = self._conversion = (key, (data, root, hashes))
        return slot[1]

    def _step(self, st: Statement, quote_id: bytes, now_ms: int) -> tuple[_Pending, Phase]:
        """The quote a buyer's ACCEPT or REJECT names, and the phase it would move to."""
        pending = self._pending.get(quote_id)
        if pending is not None and (
            pending.quote.header.exp < now_ms or pending.buyer != st.signer
        ):
            pending = None  # past its exp, or made to someone else: not held for this buyer
        after = advance(None if pending is None else pending.phase, st.type)
        assert pending is not None  # advance refuses a quote that is not held
        return pending, after

    def accept(self, st: Statement, now_ms: int, network: str = "") -> Authorize:
        """Record the deal atomically with the credit checks: what is left is to serve it,
        from what is at hand or once the driver has loaded it."""
        accept = st.message
        assert isinstance(accept, Accept)
        pending, accepted = self._step(st, accept.quote, now_ms)
        quote = pending.quote.message
        assert isinstance(quote, Quote)
        buyer = st.signer_id
        key = None
        if pending.ephemeral is not None and accept.kx is not None:
            shared = pending.ephemeral.shared(accept.kx)
            key = channel_key(shared, quote.quote, pending.ephemeral.public, accept.kx)
        self.ledger.record_accept(
            pending.quote,
            st,
            now_ms,
            self.policy.credit_limit_for(buyer),
            network=network,
            allowance=self.policy.unpaid,
            window_bytes=self.window_bytes,
        )
        pending.phase = accepted  # kept until its exp, to answer what comes after it
        pending.ephemeral = None  # the key is derived: the secret half is needed no more
        return Authorize(
            quote, st.signer, pending.entry, pending.layout, pending.quote.header.exp + 60_000, key
        )

    def at_hand(self, deal: Authorize) -> Loaded | None:
        """A deal's payload without I/O: shared with a deal waiting for its stream, or in
        the memory tier in the stored dtype."""
        live = self.sessions.serving(deal.quote.root)
        if live is not None:
            return None, live.payload, list(live.hashes)
        payload = self.store.cached(deal.entry.root)
        if payload is None or deal.layout != deal.entry.layout:
            return None
        return payload, payload.data, list(payload.hashes)

    def load(self, deal: Authorize) -> Loaded:
        """(the stored payload if it was read, bytes to serve, their chunk list) of a deal,
        or IntegrityError. It reads no index and changes nothing but the conversion slot
        (replaced whole), so it runs off the loop. Deals of one payload share its bytes
        while one of them waits for its stream: not a copy each."""
        at_hand = self.at_hand(deal)
        if at_hand is not None:
            return at_hand
        payload = self.store.read(deal.entry)
        if deal.layout == deal.entry.layout:
            return payload, payload.data, list(payload.hashes)
        data, _, hashes = self._converted(deal.entry, deal.layout, payload)
        return payload, data, hashes

    def serve(self, deal: Authorize, data: bytes | memoryview, hashes: list[bytes]) -> None:
        """Open the stream to a deal whose payload is at hand or loaded."""
        self.sessions.authorize(
            Offer.build(
                quote=deal.quote.quote,
                token=deal.quote.token,
                buyer=deal.buyer,
                payload=data,
                hashes=hashes,
                expected=Expected.from_quote(deal.quote),
                expires_ms=deal.expires_ms,
                key=deal.key,
            )
        )

    def unservable(self, deal: Authorize, now_ms: int, why: str) -> None:
        """A deal whose payload failed its root: its stream is refused at once (BAD_TOKEN,
        not after the wait for a late ACCEPT), and the deal is over undelivered."""
        self.sessions.forget(deal.quote.token, why)
        self.store.drop(deal.entry.root)
        self.ledger.record_expiry(deal.quote.quote, now_ms, why, 0)

    def reject(self, st: Statement, now_ms: int) -> bytes | None:
        """A counter-offer at or above our floor gets a new QUOTE; anything else ends it."""
        reject = st.message
        assert isinstance(reject, Reject)
        pending, rejected = self._step(st, reject.quote, now_ms)
        pending.phase = rejected
        old = pending.quote.message
        assert isinstance(old, Quote)
        self.sessions.forget(old.token, "the buyer rejected the quote")
        if reject.counter is None:
            return None
        if reject.counter > old.price:  # a counter-offer bids the price down, never up
            raise _fail(ErrorCode.INVALID_FIELD, f"a counter above the quoted {old.price}")
        if pending.counters >= MAX_COUNTERS or reject.counter < pending.lowest:
            raise _fail(ErrorCode.PRICE_TOO_HIGH, f"the lowest price is {pending.lowest}")
        ephemeral = None if old.kx is None else Ephemeral()
        quote = replace(
            old,
            re=st.header.seq,
            quote=self.tokens(16),
            price=reject.counter,
            token=self.tokens(32),
            kx=None if ephemeral is None else ephemeral.public,
        )
        return self._offer(
            quote,
            st.signer,
            pending.entry,
            pending.lowest,
            now_ms,
            ephemeral,
            pending.counters + 1,
        )

    def receipt(self, st: Statement, now_ms: int) -> Receipted | None:
        """A buyer's RECEIPT for the whole delivery, from the control channel (§10.6); None
        when it came before its stream's end was booked: it is held until then."""
        receipt = st.message
        assert isinstance(receipt, Receipt)
        if self.sessions.streaming(receipt.quote) == st.signer:
            # The buyer read END and paid; the data port has not booked that end yet (the
            # two channels are not ordered against each other). Its latest word counts.
            self._early[receipt.quote] = st
            return None
        return self.ledger.record_receipt(st, now_ms, partial=False)

    def window_receipt(self, st: Statement, now_ms: int) -> Receipted:
        """A RECEIPT that moves a payment window, from the data channel (§9.4)."""
        assert isinstance(st.message, Receipt)
        return self.ledger.record_receipt(st, now_ms, partial=True)

    def finished(
        self, offer: Offer, sent: int, whole: bool, now_ms: int
    ) -> tuple[Statement, Receipted] | None:
        """A stream of a deal ended: delivered, or — whatever cut it — the deal's life is
        over undelivered, with `sent` bytes gone out (§10.7). A final receipt held for
        this end is taken now (or refused, raising why): returned with what it paid."""
        self.sessions.ended(offer.quote)
        early = self._early.pop(offer.quote, None)
        if whole:
            self.ledger.record_delivery(offer.quote, now_ms, sent)
        else:
            self.ledger.record_expiry(offer.quote, now_ms, "its stream ended before END", sent)
        if early is None:
            return None
        return early, self.ledger.record_receipt(early, now_ms, partial=False)

    def expire(self, now_ms: int) -> None:
        for quote_id in [q for q, p in self._pending.items() if p.quote.header.exp < now_ms]:
            pending = self._pending.pop(quote_id)
            quote = pending.quote.message
            assert isinstance(quote, Quote)
            if pending.phase is Phase.OFFERED:  # an accepted one's stream has its own expiry
                self.sessions.forget(quote.token, "its quote expired unaccepted")
        for offer in self.sessions.expired(now_ms):
            self.ledger.record_expiry(offer.quote, now_ms, "no stream opened it in time", 0)
