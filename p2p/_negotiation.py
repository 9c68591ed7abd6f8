"""The seller's side of one quote as a state machine: the table of spec §10.4, in one place.

Every QUOTE the seller signs starts OFFERED. The buyer's ACCEPT or REJECT moves it on;
whatever the table does not list is UNEXPECTED_MESSAGE, and a quote the seller does not
hold (never issued, made to someone else, or past its `exp`) is UNKNOWN_QUOTE. What
follows an ACCEPT — the data channel and the receipts — is checked by the data-channel
session (the token) and the ledger (the deal), each against its own table in the spec.
"""

from __future__ import annotations

import enum

from kvx.protocol import ErrorCode, MessageType, RemoteProtocolError


class Phase(enum.Enum):
    OFFERED = "offered"  # the QUOTE is out; the buyer may ACCEPT or REJECT it
    ACCEPTED = "accepted"  # the deal is recorded; the data channel may open
    REJECTED = "rejected"  # the buyer refused it (a counter-offer is a new quote)


TRANSITIONS: dict[tuple[Phase, MessageType], Phase] = {
    (Phase.OFFERED, MessageType.ACCEPT): Phase.ACCEPTED,
    (Phase.OFFERED, MessageType.REJECT): Phase.REJECTED,
}


def advance(phase: Phase | None, message: MessageType) -> Phase:
    """The phase a quote in `phase` (None: not held) moves to on `message`, or the
    RemoteProtocolError with the code the spec gives."""
    if phase is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_QUOTE, "no live quote of ours has that id")
    after = TRANSITIONS.get((phase, message))
    if after is None:
        raise RemoteProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE, f"{message.name} for a quote already {phase.value}"
        )
    return after
