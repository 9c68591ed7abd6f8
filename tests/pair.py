"""Node cores in memory, fed frames by hand: the shape of aioquic's roundtrip tests.

A rule of the core (what a seller answers, whom it scores, what it indexes) is tested
here in milliseconds, with time that moves only when a test moves it. Node processes
stay for what only a process has: the CLI, the data dir, sockets, metrics, many hosts,
and one smoke test of each attack class (tests/test_attacks.py).

    with Pair() as pair:                     # core 0 and core 1, each knowing the other
        stranger = pair.stranger()           # an identity no core has met
        [answer] = pair.roundtrip(stranger, Hello(...))
        pair.advance(5.0)                    # timers fire
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvx.p2p import NodeConfig, PublishRequest
from kvx.p2p._core import NodeCore, Output
from kvx.p2p._events import Happening
from kvx.p2p._metrics import Metrics
from kvx.p2p._outbox import Reply
from kvx.p2p._store import Entry
from kvx.protocol import Hello, Message, Peers
from kvx.testing import Simulation
from kvx.trust import Identity, Signer, curve_public_key, open_envelope

HELLO = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
"""A newcomer's HELLO: it names an address nobody dials."""


@dataclass
class Stranger:
    """A peer that is no core: a raw identity that seals what a test tells it to."""

    identity: Identity
    signer: Signer
    routing: bytes  # how the core's answers find their way back to it
    curve: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.curve = curve_public_key(self.identity.public_key)

    @property
    def node_id(self) -> bytes:
        return self.identity.node_id


class Pair:
    """`n` cores (two by default, each knowing the others) on one simulated clock, and
    strangers that talk to them. Core 0 has a store; `config` are NodeConfig fields
    every core gets, `own` those of one core (by its index) over them."""

    def __init__(
        self,
        n: int = 2,
        *,
        seed: int = 0,
        publishers: frozenset[int] = frozenset({0}),
        own: dict[int, dict[str, Any]] | None = None,
        **config: Any,
    ) -> None:
        def make(data_dir: Path) -> NodeConfig:
            mine = (own or {}).get(int(data_dir.name), {})
            return NodeConfig(data_dir=data_dir, metrics_port=None, **{**config, **mine})

        self.sim = Simulation(n, seed=seed, config=make, publishers=publishers)
        # Each core's happenings counted as a node counts them, so a test reads a core's
        # metrics as an operator would.
        self.metrics = [Metrics() for _ in range(n)]
        self.sim.on_happening = lambda i, happening: self.metrics[i].note(happening)
        self.sim.start(known=n - 1)
        self.outputs: list[Output] = []  # what the last input made the core emit
        self._routes = itertools.count(1 << 24)  # routing ids no core index uses

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim.close()

    @property
    def cores(self) -> list[NodeCore]:
        return self.sim.cores

    def core(self, i: int = 0) -> NodeCore:
        return self.sim.cores[i]

    def now_ms(self) -> int:
        return self.sim.clock.at().now_ms()

    def time(self) -> float:
        """Wall time on the simulated clock, as scores and bans reckon it."""
        return self.sim.clock.at().wall

    def stranger(self, identity: Identity | None = None) -> Stranger:
        identity = identity or Identity.generate()
        return Stranger(identity, Signer(identity), next(self._routes).to_bytes(4, "big"))

    def seal(self, by: Stranger, message: Message, to: int = 0, **kw: object) -> bytes:
        """`message` sealed by `by` for core `to`, at the simulated now."""
        return by.signer.seal(message, now_ms=self.now_ms(), to=self.core(to).id, **kw)

    def send(self, by: Stranger, frame: bytes, to: int = 0) -> list[Message]:
        """Deliver one raw frame from `by` to core `to`; the answers sent back to `by`."""
        core = self.core(to)
        core.receive(frame, by.curve, by.routing, None, now=self.sim.clock.at())
        self.outputs = core.drain()
        for out in self.outputs:
            if isinstance(out, Happening):
                self.metrics[to].note(out)
        return self.answers(by)

    def roundtrip(self, by: Stranger, message: Message, to: int = 0, **kw: object) -> list[Message]:
        """`message` from `by` to core `to`, sealed now; the answers to `by`."""
        return self.send(by, self.seal(by, message, to, **kw), to)

    def ask(self, by: Stranger, message: Message, to: int = 0) -> Message:
        """The one answer `message` gets."""
        answers = self.roundtrip(by, message, to)
        assert len(answers) == 1, answers
        return answers[0]

    def answers(self, by: Stranger) -> list[Message]:
        return [
            open_envelope(o.frame).message
            for o in self.outputs
            if isinstance(o, Reply) and o.routing == by.routing
        ]

    def welcomed(self, by: Stranger, to: int = 0) -> bool:
        """Whether core `to` answers `by`'s HELLO with PEERS, as it answers a newcomer."""
        return [type(m) for m in self.roundtrip(by, HELLO, to)] == [Peers]

    def score(self, node_id: bytes, by: int = 0) -> float:
        """Core `by`'s score of a peer, now."""
        return self.core(by).scores.score(node_id, self.time())

    def banned(self, node_id: bytes, by: int = 0) -> bool:
        return self.core(by).scores.is_banned(node_id, self.time())

    def advance(self, seconds: float) -> None:
        """Move the clock; every core's timers that fall due fire, and cores' frames to
        one another are delivered, in time order. What the cores answered strangers
        meanwhile is read with `answers`."""
        self.sim.run_until(self.sim.clock.now + seconds)
        self.outputs, self.sim.outside = list(self.sim.outside), []

    def publish(self, request: PublishRequest, i: int = 0) -> Entry:
        """Core `i` stores and advertises a payload; its gossip waits for `advance`."""
        entry = self.core(i).publish(request, self.sim.clock.at())
        self.sim._drain(i)
        return entry
