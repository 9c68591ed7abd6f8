"""A seller's data port, whatever moves its frames (spec §9): the offers it serves, the
checks of each stream's TRANSFER, the per-buyer budget, and whom it tells how each
stream ended. TcpDataServer and UcxDataServer differ only in how they move frames."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvx.protocol import ErrorCode, RemoteProtocolError, node_id
from kvx.trust import Inbox, Signer, Statement

from ._serving import Serving, admit
from ._sessions import Offer, Sessions


@dataclass(frozen=True)
class DataLimits:
    """A seller's data-port budgets (spec §13.1); the node's config sets them."""

    connections: int = 256
    """Open data connections in total; past it, the oldest one not yet streaming is closed."""
    streams: int = 8
    """Streams served at once, each on a thread of the port's own pool."""
    streams_per_buyer: int = 2
    header_s: float = 5.0
    """The opening TRANSFER must arrive whole within this, however it trickles."""
    stall_s: float = 30.0
    """No progress for this long ends a stream."""
    min_rate: int = 1 << 20
    """Bytes a second a stream must average: after `stall_s` of grace, and at once (after
    its first second) while other streams wait for a thread."""


@dataclass(frozen=True)
class Opening:
    """A port's answer to a stream's TRANSFER: the stream to send, or the ERROR frame to
    send instead (None: close without a word, §6.5)."""

    serving: Serving | None = None
    reply: bytes | None = None
    spent: Offer | None = None  # an offer whose token a refusal spent: it never streams


class DataPort:
    """What both data ports share. `open` may be called from any thread (it may wait for
    a quote's ACCEPT); `ended` on the event loop, where the callbacks run."""

    def __init__(
        self,
        sessions: Sessions,
        inbox: Inbox,
        signer: Signer,
        *,
        on_finished: Callable[[Offer, int, bool], None] | None = None,
        on_receipt: Callable[[Statement], None] | None = None,
        on_fault: Callable[[bytes, RemoteProtocolError], None] | None = None,
        now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        limits: DataLimits | None = None,
    ) -> None:
        self.sessions = sessions
        self.inbox = inbox
        self.signer = signer
        self.on_finished = on_finished  # (offer, bytes sent, whole): every admitted stream
        self.on_receipt = on_receipt  # records a window receipt, raising if it is refused
        self.on_fault = on_fault  # (buyer key, what it broke): cut for its pace or a frame
        self.now_ms = now_ms
        self.limits = limits if limits is not None else DataLimits()
        self._per_buyer: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def open(self, frame: bytes) -> Opening:
        """Admit a stream's TRANSFER (§9.2) within the buyer's budget of streams (§13.1)."""
        admission = admit(frame, self.sessions, self.inbox, self.signer, self.now_ms())
        offer, transfer = admission.offer, admission.transfer
        if offer is None or transfer is None:
            return Opening(reply=admission.reply)
        with self._lock:
            busy = self._per_buyer.get(offer.buyer, 0) >= self.limits.streams_per_buyer
            if not busy:
                self._per_buyer[offer.buyer] = self._per_buyer.get(offer.buyer, 0) + 1
        if busy:
            over = RemoteProtocolError(
                ErrorCode.OVER_BUDGET,
                f"at most {self.limits.streams_per_buyer} streams per buyer at once",
            )
            reply = self.signer.seal_error(
                over, re=admission.seq, to=node_id(offer.buyer), now_ms=self.now_ms()
            )
            return Opening(reply=reply, spent=offer)  # the token is spent: it never streams
        return Opening(Serving(offer, transfer, self.inbox, self.signer, self.on_receipt))

    def ended(self, opening: Opening, whole: bool = False, cut: str | None = None) -> None:
        """A stream (or its refusal) ended: the buyer's budget comes back, a buyer that
        broke a rule (a frame refused, or the pace `cut`, §9.5) is reported, and how far
        the stream went."""
        serving = opening.serving
        if serving is None:
            if opening.spent is not None and self.on_finished is not None:
                self.on_finished(opening.spent, 0, False)
            return
        buyer = serving.offer.buyer
        with self._lock:
            self._per_buyer[buyer] -= 1
            if not self._per_buyer[buyer]:
                del self._per_buyer[buyer]
        fault = serving.refused
        if cut is not None:
            fault = RemoteProtocolError(ErrorCode.TIMEOUT, cut)
        if fault is not None and self.on_fault is not None:
            self.on_fault(buyer, fault)
        if self.on_finished is not None:
            self.on_finished(serving.offer, serving.sent_bytes, whole)
