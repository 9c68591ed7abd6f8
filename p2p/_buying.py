"""The rules a purchase (p2p/_purchase.py) follows: which providers to try, the steps
of a deal with one provider as a state machine (the buyer's table of spec §10.4), what
an advertisement and a quote must match, and what a failure says about the provider."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from kvx.protocol import (
    Advertise,
    ErrorCode,
    KVLayout,
    LocalProtocolError,
    MessageType,
    Quote,
    RemoteProtocolError,
)
from kvx.trust import Event, Statement

MAX_PROVIDERS = 256
"""Providers one purchase tries before it gives up (and it stops walking once the client's
timeout has passed): a liar that answers at once costs the buyer one round trip."""

T = TypeVar("T")


class Step(enum.Enum):
    ASKING = "asking"  # QUOTE_REQUEST sent
    QUOTED = "quoted"  # a QUOTE came, and matches the advertisement and the bid
    ACCEPTED = "accepted"  # ACCEPT sent and recorded: the buyer owes on verified delivery
    STREAMING = "streaming"  # TRANSFER sent: chunks arrive, each verified
    PAID = "paid"  # all verified; the RECEIPT sent
    FAILED = "failed"  # this provider failed (or asked too much): on to the next


TRANSITIONS: dict[tuple[Step, MessageType], Step] = {
    (Step.ASKING, MessageType.QUOTE): Step.QUOTED,
    (Step.ASKING, MessageType.ERROR): Step.FAILED,
    (Step.QUOTED, MessageType.ACCEPT): Step.ACCEPTED,
    (Step.QUOTED, MessageType.REJECT): Step.FAILED,
    (Step.QUOTED, MessageType.ERROR): Step.FAILED,
    (Step.ACCEPTED, MessageType.TRANSFER): Step.STREAMING,
    (Step.ACCEPTED, MessageType.ERROR): Step.FAILED,
    (Step.STREAMING, MessageType.RECEIPT): Step.PAID,
    (Step.STREAMING, MessageType.ERROR): Step.FAILED,
}
"""(step, message received or sent) -> next step, as spec §10.4's buyer's table. ERROR
stands for every failure: an ERROR received, no answer in time, a quote unlike its
advertisement or the buyer's model, a stream that breaks or does not verify, KV that the
buyer's model refutes. A step the table does not list
is a fault of the client itself (LocalProtocolError)."""


class Deal:
    """One deal with one provider, moved by each message that crosses it."""

    def __init__(self) -> None:
        self.step = Step.ASKING

    def advance(self, message: MessageType) -> Step:
        after = TRANSITIONS.get((self.step, message))
        if after is None:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"{message.name} in a deal already {self.step.value}"
            )
        self.step = after
        return after


class Walk(Generic[T]):
    """Which providers a purchase tries: those a lookup lists, best first, and when every
    one has failed, the untried ones a new lookup lists. The node ranks a provider that
    failed after every stranger once it is told, so a swarm of liars advertising at price
    0 costs one buyer one attempt per liar, once — not one failed purchase per lookup."""

    def __init__(self, key: Callable[[T], bytes], limit: int = MAX_PROVIDERS) -> None:
        self.key = key
        self.limit = limit
        self.tried: set[bytes] = set()

    def take(self, listed: Sequence[T]) -> list[T]:
        """The providers of `listed` to try now (none: the purchase is over)."""
        fresh = [p for p in listed if self.key(p) not in self.tried]
        fresh = fresh[: max(0, self.limit - len(self.tried))]
        self.tried.update(self.key(p) for p in fresh)
        return fresh


def check_layout(ad: Statement, dtype: str | None, mine: KVLayout | None) -> None:
    """Refuse an advertisement whose layout is not the one the buyer's own model implies
    for the fingerprint it names (`mine`, in the dtype the buyer asks for): the seller
    signed a fingerprint and a shape that contradict each other, which is a lie."""
    a = ad.message
    assert isinstance(a, Advertise)
    layout = a.layout if dtype is None else dataclasses.replace(a.layout, dtype=dtype)
    if mine is not None and layout != mine:
        raise RemoteProtocolError(
            ErrorCode.KV_MISMATCH, f"the advertised layout {a.layout} is not this model's {mine}"
        )


def check_quote(
    ad: Statement, quote: Quote, matched: int, dtype: str | None, mine: KVLayout | None = None
) -> None:
    """Refuse a quote that is not for what its seller advertised, or not in the layout
    the buyer's own model implies (`mine`; the advertisement passed check_layout before
    the quote was asked for), before anything is allocated for it. Each is signed by the
    seller, so a mismatch is its fault alone."""
    a = ad.message
    assert isinstance(a, Advertise)
    if mine is not None and quote.layout != mine:
        raise RemoteProtocolError(
            ErrorCode.KV_MISMATCH, f"the quoted layout {quote.layout} is not this model's {mine}"
        )
    layout = a.layout if dtype is None else dataclasses.replace(a.layout, dtype=dtype)
    problems = [
        name
        for name, ok in (
            ("blocks", quote.blocks == matched),
            ("stored", quote.stored == len(a.blocks)),
            ("layout", quote.layout == layout),
            ("chunk", quote.chunk == a.chunk),
            ("root", dtype is not None or quote.root == a.root),
            ("data", (quote.transport, quote.data) in {(d.t, d.addr) for d in a.data}),
            ("kx", a.ns is None or quote.kx is not None),  # a private stream is sealed (§9.6)
        )
        if not ok
    ]
    if problems:
        raise RemoteProtocolError(
            ErrorCode.ROOT_MISMATCH,
            f"the quote differs from the advertisement in {', '.join(problems)}",
        )


def blame(code: ErrorCode) -> Event | None:
    """What a failure says about the provider. A refusal of *our* request (a price, our
    credit, a replay of ours, our membership) is no fault of theirs; a provider that
    advertised a chain and then does not hold it is."""
    if code in (ErrorCode.NOT_FOUND, ErrorCode.FINGERPRINT_MISMATCH):
        return Event.UNSERVABLE_AD
    if code in (
        ErrorCode.CHUNK_HASH_MISMATCH,
        ErrorCode.ROOT_MISMATCH,
        ErrorCode.SIZE_MISMATCH,
        ErrorCode.STREAM_TRUNCATED,
        ErrorCode.TIMEOUT,
        ErrorCode.UNAVAILABLE,
        ErrorCode.BAD_SIGNATURE,
        ErrorCode.KV_MISMATCH,
    ):
        return Event.for_code(code) or Event.TIMEOUT
    return None
