"""The seller's side: which streams it has agreed to serve, each claimable once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvx.protocol import (
    ErrorCode,
    Receipt,
    RemoteProtocolError,
    Transfer,
    body_seq,
    byte_view,
    node_id,
)
from kvx.trust import Inbox, Signer, Statement, verify_envelope

from ._verify import Expected


@dataclass(frozen=True)
class Offer:
    """One accepted quote, ready to stream: the payload and the chunk list its root signs."""

    quote: bytes
    token: bytes
    buyer: bytes  # the buyer's Ed25519 public key: only it may open the stream
    payload: memoryview  # the whole payload the root covers
    hashes: tuple[bytes, ...]
    expected: Expected
    expires_ms: int
    key: bytes | None = None  # the deal's channel key: the stream is sealed (§9.6)

    @classmethod
    def build(
        cls,
        *,
        quote: bytes,
        token: bytes,
        buyer: bytes,
        payload: object,
        hashes: list[bytes],
        expected: Expected,
        expires_ms: int,
        key: bytes | None = None,
    ) -> Offer:
        view = byte_view(payload)
        if len(view) != expected.size or len(hashes) != expected.chunks:
            raise ValueError("payload or chunk list does not match the expected size")
        return cls(quote, token, buyer, view, tuple(hashes), expected, expires_ms, key)

    def chunk(self, index: int) -> memoryview:
        start = index * self.expected.chunk
        return self.payload[start : start + self.expected.length(index)]


def _bad_token(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_TOKEN, detail)


class Sessions:
    """Offers by token. Tokens are single-use: a claimed or expired one is gone for good.

    A buyer sends ACCEPT on the control channel and opens the data channel at once, so a
    TRANSFER may overtake its ACCEPT: a token that was quoted (`expect`) but is not yet
    authorised is waited for, briefly, before it is refused.
    """

    def __init__(self, accept_wait_s: float = 5.0) -> None:
        self.accept_wait_s = accept_wait_s
        self._offers: dict[bytes, Offer] = {}
        self._expected: set[bytes] = set()
        self._changed = threading.Condition()  # streams are served from worker threads

    def expect(self, token: bytes) -> None:
        """A quote carrying `token` went out; its ACCEPT may follow."""
        with self._changed:
            self._expected.add(token)

    def forget(self, token: bytes) -> None:
        with self._changed:
            self._expected.discard(token)
            self._offers.pop(token, None)

    def authorize(self, offer: Offer) -> None:
        with self._changed:
            self._expected.discard(offer.token)
            self._offers[offer.token] = offer
            self._changed.notify_all()

    def claim(self, transfer: Transfer, signer: bytes, now_ms: int) -> Offer:
        """The offer a TRANSFER opens, or BAD_TOKEN; the token is spent once it matched."""
        with self._changed:
            self._changed.wait_for(
                lambda: transfer.token not in self._expected, timeout=self.accept_wait_s
            )
            offer = self._offers.get(transfer.token)
            if offer is None:
                raise _bad_token("unknown, unaccepted or already used session token")
            if offer.quote != transfer.quote or offer.buyer != signer:
                raise _bad_token("the token belongs to another quote or buyer")
            del self._offers[transfer.token]
        if now_ms > offer.expires_ms:
            raise _bad_token("the session token has expired")
        if transfer.first >= offer.expected.needed:
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, "first is past the last chunk")
        return offer

    def expired(self, now_ms: int) -> list[Offer]:
        """Remove and return the accepted offers whose token's life passed unclaimed."""
        with self._changed:
            gone = [o for o in self._offers.values() if o.expires_ms < now_ms]
            for offer in gone:
                del self._offers[offer.token]
        return gone

    def __len__(self) -> int:
        return len(self._offers)


@dataclass(frozen=True)
class Admission:
    """A seller's answer to a stream's opening frame: an offer to serve from chunk
    `first`, or, when refused, the ERROR frame to send (None if nobody can be addressed)."""

    offer: Offer | None
    first: int = 0
    reply: bytes | None = None
    seq: int | None = None  # of the TRANSFER, for an ERROR's `re`


def refusal(frame: bytes, exc: RemoteProtocolError, signer: Signer, now_ms: int) -> bytes | None:
    """The ERROR that answers a data-channel statement refused for `exc` (§9.2): addressed
    to its signer once the signature verified (§6.4 step 7), whatever later step refused
    it; None for a frame with no verified sender, which is only closed on (§6.5)."""
    try:
        raw = verify_envelope(frame)
    except RemoteProtocolError:
        return None
    return signer.seal_error(exc, re=body_seq(raw.body), to=node_id(raw.signer), now_ms=now_ms)


def admit(frame: bytes, sessions: Sessions, inbox: Inbox, signer: Signer, now_ms: int) -> Admission:
    """Check a buyer's TRANSFER (spec §9.2) and claim its offer, whatever the transport."""
    try:
        statement = inbox.receive(frame, now_ms=now_ms, peer_curve_key=None)
        if not isinstance(statement.message, Transfer):
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a stream opens with TRANSFER")
        offer = sessions.claim(statement.message, statement.signer, now_ms)
    except RemoteProtocolError as exc:
        return Admission(None, reply=refusal(frame, exc, signer, now_ms))
    return Admission(offer, statement.message.first, seq=statement.header.seq)


class Payments:
    """The seller's side of one stream's payment window (spec §9.4): chunk `index` may be
    sent only while fewer than `window` chunks are unpaid; a receipt moves the window, and
    only once `record` (the ledger) has taken it, so that what the stream gives away and
    what the books say was paid can never part."""

    def __init__(
        self,
        offer: Offer,
        first: int,
        inbox: Inbox,
        signer: Signer,
        record: Callable[[Statement], None] | None = None,
    ) -> None:
        self.offer = offer
        self.inbox = inbox
        self.signer = signer
        self.record = record
        self.first = first  # receipts count from this stream's first chunk (§9.4)
        self.paid = first  # chunks receipted, as chunk indices of the payload
        self.sent = first  # chunks handed to the connection, likewise
        self.refused: RemoteProtocolError | None = None  # why the buyer's receipt was not taken

    @property
    def sent_bytes(self) -> int:
        """Bytes this stream sent, from its first chunk: what a receipt may cover."""
        return self._carried(self.sent)

    def _carried(self, next_index: int) -> int:
        chunk = self.offer.expected.chunk
        return min(next_index * chunk, self.offer.expected.deliver) - self.first * chunk

    def blocked(self, index: int) -> bool:
        window = self.offer.expected.window
        return bool(window) and index >= self.paid + window

    def receipt(self, frame: bytes, next_index: int, now_ms: int) -> bytes | None:
        """Take the buyer's receipt for exactly the chunks before `next_index`. When it is
        refused, `refused` says why (the buyer broke a rule, §9.4) and the ERROR frame
        that ends the stream is returned (None for a frame with no verified sender)."""
        try:
            st = self.inbox.receive(frame, now_ms=now_ms, peer_curve_key=None)
            self._check(st, next_index)
            if self.record is not None:
                self.record(st)
        except RemoteProtocolError as exc:
            self.refused = exc
            return refusal(frame, exc, self.signer, now_ms)
        self.paid = next_index
        return None

    def _check(self, st: Statement, next_index: int) -> None:
        expected = self.offer.expected
        r = st.message
        if not isinstance(r, Receipt):
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "the window waits for RECEIPT")
        if (
            st.signer != self.offer.buyer
            or r.quote != self.offer.quote
            or r.seller != self.signer.identity.node_id
            or r.root != expected.root
        ):
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TRANSFER, "a receipt for another deal")
        sent = self._carried(next_index)
        if r.bytes != sent or r.price != expected.paid_price(r.bytes):
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_TRANSFER,
                f"the receipt covers {r.bytes} bytes at {r.price}; sent and due: {sent} bytes"
                f" at {expected.paid_price(sent)}",
            )
