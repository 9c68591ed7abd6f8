"""The state the parts of the node core share, and the calls they make across, declared
once: NodeCore (p2p/_core.py) builds the state and defines the outbox; its parts
(p2p/_liveness.py, p2p/_gossip.py, p2p/_trading.py, p2p/_fraud.py) read and change the
one and call the other, and the type checker holds each call to these signatures."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from kvx.protocol import DataAddress, DigestEntry, Message, MessageType
from kvx.trust import Identity, Inbox, Memberships, PeerScores, Policy, Signer, Statement

from ._clock import Now
from ._config import NodeConfig
from ._index import AdId, AdIndex
from ._market import Market
from ._metrics import Metrics
from ._peers import PeerTable
from ._pricing import PricePolicy
from ._probing import IndirectProbes
from ._rates import RateLimits
from ._store import LocalStore

if TYPE_CHECKING:
    import random
    import sqlite3

    from kvx.trust import Receipted

    from ._core import Output
    from ._events import Happening
    from ._index import Standing


class CoreState:
    config: NodeConfig
    clock: Now  # the time of the input being handled
    random: random.Random
    identity: Identity
    id: bytes  # our node id
    signer: Signer
    policy: Policy
    scores: PeerScores
    store: LocalStore
    peers: PeerTable
    index: AdIndex
    memberships: Memberships
    metrics: Metrics
    pricing: PricePolicy
    probes: IndirectProbes
    market: Market  # from serve() on: a quote needs the data addresses it names
    ctl: str
    incarnation: int
    leaving: bool  # said LEAVE: it finishes its deals and does nothing else (§8.22)
    _own: dict[bytes, Statement]  # content root -> our ADVERTISE
    _recent: deque[tuple[float, AdId, bytes | None]]  # news we took, for PEERS `recent`
    _pulled: dict[bytes, float]  # peer -> when its news was last pulled
    _pull_later: set[bytes]  # peers whose pull waits for PULL_EVERY_S
    _sending: RateLimits  # our pace of relayable statements to each peer
    inbox: Inbox
    data: tuple[DataAddress, ...]  # our data channel's addresses
    source_network: str  # of the frame being handled: what its sender spoke from
    _out: list[Output]  # what the core emits, for the driver to drain

    if TYPE_CHECKING:  # the outbox, and what one part asks of another (NodeCore has them)

        def _send(self, key: bytes, message: Message) -> None: ...

        def _send_frame(self, key: bytes, frame: bytes, mtype: MessageType) -> None: ...

        def _reply(self, routing: bytes, st: Statement, message: Message) -> None: ...

        def _reply_frame(self, routing: bytes, frame: bytes, mtype: MessageType) -> None: ...

        def _disconnect(self, key: bytes) -> None: ...

        def event(self, happening: Happening) -> None: ...

        def _push(
            self, frame: bytes, mtype: MessageType, exclude: set[bytes], ns: bytes | None
        ) -> None: ...

        def _recent_for(self, key: bytes) -> tuple[DigestEntry, ...]: ...

        def _pull_news(
            self, key: bytes, routing: bytes | None = None, asked: Statement | None = None
        ) -> None: ...

        def _withdraw(self, root: bytes) -> None: ...

        def _standing(self, key: bytes) -> Standing: ...

        def _ledger_failed(self, exc: sqlite3.Error) -> None: ...

        def _earned(self, paid: Receipted) -> None: ...
