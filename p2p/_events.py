"""What happened in a node, as typed values: the core emits them among its outputs, and
the driver writes them to the log (p2p/_logs.py: one JSON line each, `event` = the
class's name in snake_case) and counts them in its metrics (p2p/_metrics.py). Those too
frequent for a log line (each frame taken, each lookup) have no level: only counted. A
test reads them off the core instead of a log file.

Ids in fields are short hex prefixes, as an operator greps them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Happening:
    """One thing that happened: a value, so that the core reads no logger and a test can
    compare it; its class says how loud it is in the log (None: counted, not logged)."""

    level: ClassVar[int | None] = logging.INFO

    @property
    def name(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the node itself ------------------------------------------------------------------


@dataclass(frozen=True)
class Ready(Happening):
    ctl: str
    data: str
    peers: int  # bootstrap peers it was given


@dataclass(frozen=True)
class Leaving(Happening):
    peers: int  # told it leaves


@dataclass(frozen=True)
class Stopped(Happening):
    pass


@dataclass(frozen=True)
class TaskFailed(Happening):
    level: ClassVar[int | None] = logging.ERROR
    error: str


@dataclass(frozen=True)
class InternalError(Happening):
    """A fault of kvx itself cost one frame or one timer round."""

    level: ClassVar[int | None] = logging.ERROR
    where: str
    trace: str


@dataclass(frozen=True)
class Shed(Happening):
    """Work left undone to pace this node or its peers."""

    level: ClassVar[int | None] = None
    what: str


@dataclass(frozen=True)
class Degraded(Happening):
    """A part the node needs cannot write; the node goes on without what needs it."""

    level: ClassVar[int | None] = logging.ERROR
    what: str
    error: str


@dataclass(frozen=True)
class StoreDropped(Happening):
    level: ClassVar[int | None] = logging.WARNING
    root: str
    reason: str


@dataclass(frozen=True)
class StoreNoteFailed(Happening):
    """A sale was served, but the store's index could not note it (eviction order)."""

    level: ClassVar[int | None] = logging.WARNING
    error: str


# ---- peers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerJoined(Happening):
    peer: str
    ctl: str


@dataclass(frozen=True)
class PeerBack(Happening):
    peer: str


@dataclass(frozen=True)
class PeerLeft(Happening):
    peer: str
    ads: int  # its advertisements dropped


@dataclass(frozen=True)
class PeerVouched(Happening):
    peer: str
    by: str


@dataclass(frozen=True)
class PeerSuspect(Happening):
    level: ClassVar[int | None] = logging.WARNING
    peer: str


@dataclass(frozen=True)
class PeerDead(Happening):
    level: ClassVar[int | None] = logging.WARNING
    peer: str


@dataclass(frozen=True)
class PeerError(Happening):
    """A peer answered this node with an ERROR."""

    peer: str
    code: int
    msg: str


@dataclass(frozen=True)
class ConnectFailed(Happening):
    level: ClassVar[int | None] = logging.WARNING
    peer: str
    error: str


@dataclass(frozen=True)
class Rejected(Happening):
    """A frame this node refused, with the code it answered or would have."""

    code: str
    detail: str


@dataclass(frozen=True)
class Dropped(Happening):
    """A frame refused for its rate, its banned signer or what its handler found."""

    level: ClassVar[int | None] = None
    code: str


@dataclass(frozen=True)
class Accepted(Happening):
    """A statement taken in and handed to its part."""

    level: ClassVar[int | None] = None
    type: str


# ---- gossip ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdReceived(Happening):
    signer: str
    seq: int
    via: str


@dataclass(frozen=True)
class AdPublished(Happening):
    root: str
    seq: int
    blocks: int


# ---- trade ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Looked(Happening):
    """A lookup answered: `matched` blocks (0, a miss)."""

    level: ClassVar[int | None] = None
    matched: int


@dataclass(frozen=True)
class Earned(Happening):
    """A buyer's receipt recorded: what it paid for."""

    level: ClassVar[int | None] = None
    credits: int
    tokens: int


@dataclass(frozen=True)
class Sold(Happening):
    buyer: str
    price: int


@dataclass(frozen=True)
class StreamCut(Happening):
    level: ClassVar[int | None] = logging.WARNING
    buyer: str
    code: str
    why: str


@dataclass(frozen=True)
class Bought(Happening):
    """A local client's purchase, as it told the node."""

    seller: str
    bytes: int
    tokens: int
    price: int
    seconds: float


@dataclass(frozen=True)
class Missed(Happening):
    reason: str


@dataclass(frozen=True)
class Refused(Happening):
    """A local client's model refuted KV that matched its root."""

    level: ClassVar[int | None] = logging.WARNING
    seller: str
    check: str
    detail: str


# ---- fraud proofs (spec §8.19) --------------------------------------------------------


@dataclass(frozen=True)
class Accused(Happening):
    seller: str
    accuser: str
    checked: int


@dataclass(frozen=True)
class FalseAccusation(Happening):
    level: ClassVar[int | None] = logging.WARNING
    accuser: str
    seller: str
    why: str


@dataclass(frozen=True)
class EvidenceAbandoned(Happening):
    source: str
    why: str


@dataclass(frozen=True)
class Convicted(Happening):
    level: ClassVar[int | None] = logging.WARNING
    seller: str
    proof: str
    ads_dropped: int
