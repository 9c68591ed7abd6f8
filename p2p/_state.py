"""The state the parts of the node core share, declared once: NodeCore (p2p/_core.py)
builds it, and its parts (p2p/_liveness.py, p2p/_gossip.py, p2p/_trading.py) read and
change it, so each declares no attribute of its own here."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from kvx.trust import Identity, Memberships, PeerScores, Policy, Signer, Statement

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
    market: Market | None
    ctl: str
    incarnation: int
    leaving: bool  # said LEAVE: it finishes its deals and does nothing else (§8.22)
    _own: dict[bytes, Statement]  # content root -> our ADVERTISE
    _recent: deque[tuple[float, AdId, bytes | None]]  # news we took, for PEERS `recent`
    _pulled: dict[bytes, float]  # peer -> when its news was last pulled
    _pull_later: set[bytes]  # peers whose pull waits for PULL_EVERY_S
    _sending: RateLimits  # our pace of relayable statements to each peer
