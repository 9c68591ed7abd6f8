"""The seller's side: which streams it has agreed to serve, each claimable once."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kvx.protocol import ErrorCode, Receipt, RemoteProtocolError, Transfer, byte_view
from kvx.trust import Inbox, Signer, Statement

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
    ) -> Offer:
        view = byte_view(payload)
        if len(view) != expected.size or len(hashes) != expected.chunks:
            raise ValueError("payload or chunk list does not match the expected size")
        return cls(quote, token, buyer, view, tuple(hashes), expected, expires_ms)

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


def admit(frame: bytes, sessions: Sessions, inbox: Inbox, signer: Signer, now_ms: int) -> Admission:
    """Check a buyer's TRANSFER (spec §9.2) and claim its offer, whatever the transport."""
    statement = None
    try:
        statement = inbox.receive(frame, now_ms=now_ms, peer_curve_key=None)
        if not isinstance(statement.message, Transfer):
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a stream opens with TRANSFER")
        offer = sessions.claim(statement.message, statement.signer, now_ms)
    except RemoteProtocolError as exc:
        if statement is None:  # an ERROR needs a verified sender to address it to
            return Admission(None)
        reply = signer.seal_error(
            exc, re=statement.header.seq, to=statement.signer_id, now_ms=now_ms
        )
        return Admission(None, reply=reply)
    return Admission(offer, statement.message.first, seq=statement.header.seq)


class Payments:
    """The seller's side of one stream's payment window (spec §9.4): chunk `index` may be
    sent only while fewer than `window` chunks are unpaid; a receipt moves the window."""

    def __init__(self, offer: Offer, first: int, inbox: Inbox, seller: bytes) -> None:
        self.offer = offer
        self.inbox = inbox
        self.seller = seller  # our node id, which a receipt must name
        self.paid = first  # chunks receipted, counted from the payload's start

    def blocked(self, index: int) -> bool:
        window = self.offer.expected.window
        return bool(window) and index >= self.paid + window

    def receipt(self, frame: bytes, next_index: int, now_ms: int) -> Statement:
        """Check the buyer's receipt for every chunk before `next_index`; raise if it is not."""
        expected = self.offer.expected
        st = self.inbox.receive(frame, now_ms=now_ms, peer_curve_key=None)
        r = st.message
        if not isinstance(r, Receipt):
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "the window waits for RECEIPT")
        covered = min(next_index * expected.chunk, expected.deliver)
        if (
            st.signer != self.offer.buyer
            or r.quote != self.offer.quote
            or r.seller != self.seller
            or r.root != expected.root
        ):
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TRANSFER, "a receipt for another deal")
        if not covered <= r.bytes <= expected.deliver or r.price != expected.paid_price(r.bytes):
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_TRANSFER,
                f"the receipt covers {r.bytes} bytes at {r.price}; due: {covered} bytes"
                f" at {expected.paid_price(covered)}",
            )
        self.paid = -(-r.bytes // expected.chunk)
        return st
