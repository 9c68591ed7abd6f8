"""The seller's side of one stream, sans-I/O (spec §9.2, §9.4, §9.7): the admission of
its TRANSFER, which chunk goes next, when the payment window waits for a receipt, where
the stream ends, and what each frame the buyer sends mid-stream does. The TCP and UCX
ports only move its frames, so both keep the same rules by construction.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from kvx.protocol import (
    ErrorCode,
    Receipt,
    RemoteProtocolError,
    Transfer,
    body_seq,
    node_id,
)
from kvx.trust import Inbox, Signer, Statement, verify_envelope

from ._sessions import Offer, Sessions


@dataclass(frozen=True)
class Admission:
    """A seller's answer to a stream's opening frame: the offer and the TRANSFER that
    opened it, or, when refused, the ERROR frame to send (None if nobody can be
    addressed)."""

    offer: Offer | None
    transfer: Transfer | None = None
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
    return Admission(offer, statement.message, seq=statement.header.seq)


class Next(enum.Enum):
    CHUNK = "chunk"  # send chunk `Serving.sent`
    RECEIPT = "receipt"  # the window is used up: read the buyer's next frame first
    END = "end"  # every chunk of the stream went: send END


class Serving:
    """One stream from chunk `first` to `last` (§9.7): chunk `i` may be sent only while
    fewer than `window` chunks are unpaid; a receipt moves the window, and only once
    `record` (the ledger) has taken it, so that what the stream gives away and what the
    books say was paid can never part. The buyer may end the stream sooner with a TRANSFER
    naming it and a smaller `last`; the seller ends it there, or after the chunks it has
    sent already."""

    def __init__(
        self,
        offer: Offer,
        transfer: Transfer,
        inbox: Inbox,
        signer: Signer,
        record: Callable[[Statement], None] | None = None,
    ) -> None:
        self.offer = offer
        self.transfer = transfer
        self.inbox = inbox
        self.signer = signer
        self.record = record
        self.first = transfer.first  # receipts count from this stream's first chunk (§9.4)
        last = offer.expected.needed - 1 if transfer.last is None else transfer.last
        self.stop = last + 1  # the chunk after the stream's last
        self.paid = self.first  # chunks receipted, as chunk indices of the payload
        self.sent = self.first  # chunks handed to the connection, likewise
        self.refused: RemoteProtocolError | None = None  # why the buyer was refused

    @property
    def size(self) -> int:
        """Bytes the stream carries if it runs to its `last`: what its pace is set by."""
        return self._carried(self.stop)

    @property
    def sent_bytes(self) -> int:
        """Bytes this stream sent, from its first chunk: what a receipt may cover."""
        return self._carried(self.sent)

    def _carried(self, next_index: int) -> int:
        chunk = self.offer.expected.chunk
        return min(next_index * chunk, self.offer.expected.deliver) - self.first * chunk

    def next(self) -> Next:
        if self.sent >= self.stop:
            return Next.END
        window = self.offer.expected.window
        if window and self.sent >= self.paid + window:
            return Next.RECEIPT
        return Next.CHUNK

    def chunk_sent(self) -> None:
        self.sent += 1

    def control(self, frame: bytes, now_ms: int) -> bytes | None:
        """Take a CONTROL frame the buyer sent mid-stream: a receipt for exactly what was
        sent, or a TRANSFER that ends this stream sooner. When it is refused, `refused`
        says why (the buyer broke a rule, §9.4) and the ERROR frame that ends the stream
        is returned (None for a frame with no verified sender)."""
        try:
            st = self.inbox.receive(frame, now_ms=now_ms, peer_curve_key=None)
            if isinstance(st.message, Transfer):
                self._shorten(st)
            else:
                self._check_receipt(st)
                if self.record is not None:
                    self.record(st)
                self.paid = self.sent
        except RemoteProtocolError as exc:
            self.refused = exc
            return refusal(frame, exc, self.signer, now_ms)
        return None

    def _shorten(self, st: Statement) -> None:
        t = st.message
        assert isinstance(t, Transfer)
        opened = self.transfer
        if (
            st.signer != self.offer.buyer
            or (t.quote, t.token, t.first) != (opened.quote, opened.token, opened.first)
            or t.last is None
            or t.last >= self.stop - 1
        ):
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD,
                "a TRANSFER mid-stream names this stream and a last chunk before its end",
            )
        self.stop = max(t.last + 1, self.sent)

    def _check_receipt(self, st: Statement) -> None:
        expected = self.offer.expected
        r = st.message
        if not isinstance(r, Receipt):
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, "mid-stream, a buyer sends RECEIPT or TRANSFER"
            )
        if (
            st.signer != self.offer.buyer
            or r.quote != self.offer.quote
            or r.seller != self.signer.identity.node_id
            or r.root != expected.root
        ):
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TRANSFER, "a receipt for another deal")
        sent = self.sent_bytes
        if r.bytes != sent or r.price != expected.paid_price(r.bytes):
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_TRANSFER,
                f"the receipt covers {r.bytes} bytes at {r.price}; sent and due: {sent} bytes"
                f" at {expected.paid_price(sent)}",
            )
