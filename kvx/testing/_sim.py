"""A deterministic swarm simulator: thousands of real node cores (p2p/_core.py) in one
process, over a simulated network and simulated time.

It is a driver like p2p/_node.py, with a priority queue of deliveries instead of
sockets: a frame a core sends reaches its peer after a latency drawn from a seeded
distribution, unless the link drops it. Signatures, replay checks, rate limits, the
peer table, gossip and anti-entropy are the node's own code. The same seed gives the
same run, event for event.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import itertools
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvx.p2p._buying import blame
from kvx.p2p._clock import Now
from kvx.p2p._config import NodeConfig
from kvx.p2p._core import NodeCore
from kvx.p2p._dials import Connect
from kvx.p2p._events import Happening
from kvx.p2p._gossip import RECENT_MAX, Gossip
from kvx.p2p._liveness import Liveness
from kvx.p2p._outbox import Disconnect, Reply, Send
from kvx.p2p._purchase import Action, Ask, Exhausted, Lookup, Purchase, Ready, Report, Want
from kvx.p2p._store import Entry, LocalStore, PublishRequest
from kvx.protocol import (
    Advertise,
    DataAddress,
    DigestEntry,
    ErrorCode,
    KVLayout,
    MessageType,
    PeerEntry,
    Quote,
)
from kvx.trust import (
    Event,
    Identity,
    Ledger,
    PeerScores,
    Statement,
    curve_public_key,
    open_envelope,
)


class SimClock:
    """Simulated time, shared by every core of a simulation (wall = epoch + elapsed)."""

    EPOCH = 1_800_000_000.0

    def __init__(self) -> None:
        self.now = 0.0

    def at(self) -> Now:
        """The time passed to a core with an input."""
        return Now(self.now, self.EPOCH + self.now)


@dataclass(frozen=True)
class Network:
    """The simulated links: one-way latency (a base plus an exponential tail, in
    seconds) and the chance that a frame is lost."""

    latency_s: float = 0.010
    jitter_s: float = 0.005
    loss: float = 0.0

    def delay(self, rng: random.Random) -> float:
        return self.latency_s + rng.expovariate(1 / self.jitter_s) if self.jitter_s else 0.0


@dataclass
class Traffic:
    """What crossed the network, by message type."""

    frames: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    lost: int = 0

    def count(self, mtype: MessageType, size: int) -> None:
        self.frames[mtype.name] = self.frames.get(mtype.name, 0) + 1
        self.bytes[mtype.name] = self.bytes.get(mtype.name, 0) + size


@dataclass(order=True)
class _Delivery:
    at: float
    order: int
    to: int = field(compare=False)
    frame: bytes = field(compare=False)
    sender: int = field(compare=False)
    reply: bool = field(compare=False)  # on the receiver's own connection to `sender`


class NoStore:
    """The store of a node that holds no KV: a relay or a buyer. Simulated swarms of
    10,000 nodes cannot give each one a LocalStore (each keeps an SQLite index open,
    three descriptors with its WAL); the nodes that publish get a real one."""

    def entries(self) -> list[Entry]:
        return []

    def verify_all(self) -> list[Entry]:
        return []

    def best_match(self, fp: bytes, ns: bytes | None, chain: tuple[bytes, ...]):
        return 0, None

    def get(self, root: bytes):
        raise KeyError(root)

    def put(self, **kwargs: object):
        raise ValueError("this simulated node was not made a publisher")

    def close(self) -> None:
        pass


class HostileLiveness(Liveness):
    """Names only its accomplices in PEERS: an eclipse."""

    accomplices: tuple[PeerEntry, ...] = ()  # the simulation names them

    def sample(self) -> tuple[PeerEntry, ...]:
        return self.accomplices[:64]  # as many as an honest table lists (PeerTable.entries)


class HostileGossip(Gossip):
    """Relays nothing and answers no DIGEST (withholding), tells every prober of news
    that does not exist (so each pulls a DIGEST it will not answer), and advertises under
    its own key, at price 0, every chain an honest node advertises (a liar: it holds
    none of it)."""

    accomplices: tuple[PeerEntry, ...] = ()  # the simulation names them

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lied: set[bytes] = set()

    def push(self, frame: bytes, mtype: MessageType, exclude: set[bytes], ns: bytes | None) -> None:
        pass

    def on_digest(self, st: Statement, routing: bytes | None) -> None:
        pass

    def recent_for(self, key: bytes) -> tuple[DigestEntry, ...]:
        return tuple(DigestEntry(key=self.random.randbytes(32), seq=1) for _ in range(RECENT_MAX))

    def on_advertise(self, st: Statement, relayer: bytes) -> None:
        super().on_advertise(st, relayer)
        ad = st.message
        assert isinstance(ad, Advertise)
        if ad.root in self._lied or any(st.signer == a.key for a in self.accomplices):
            return
        self._lied.add(ad.root)
        lie = dataclasses.replace(ad, price=0, ctl=self.liveness.ctl, data=self.liveness.data)
        frame = self.out.seal(lie, ttl_ms=3_600_000)
        for peer in self.liveness.peers.alive():  # to everyone, not to a fanout
            self.out.send_frame(peer.key, frame, MessageType.ADVERTISE)


class HostileCore(NodeCore):
    """A node that runs the real core where that keeps it in honest tables (it answers
    probes, it speaks for itself) and cheats wherever cheating scales to a swarm: its
    parts are HostileLiveness and HostileGossip."""

    liveness_kind = HostileLiveness
    gossip_kind = HostileGossip

    def conspire(self, accomplices: tuple[PeerEntry, ...]) -> None:
        assert isinstance(self.liveness, HostileLiveness)
        assert isinstance(self.gossip, HostileGossip)
        self.liveness.accomplices = self.gossip.accomplices = accomplices


class Simulation:
    """`n` nodes, every one a NodeCore with in-memory ledger and scores; the nodes
    in `publishers` have a LocalStore (in a temporary directory), the others none."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        network: Network | None = None,
        config: Callable[[Path], NodeConfig] | None = None,
        publishers: frozenset[int] = frozenset({0}),
        hostile: frozenset[int] = frozenset(),
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self._seq: dict[bytes, int] = {}  # signer -> its last sequence number, across restarts
        self._generation: dict[int, int] = {}  # node -> restarts, to drop stale timers
        self.network = network or Network()
        self.clock = SimClock()
        self.traffic = Traffic()
        self._queue: list[_Delivery] = []
        self._order = itertools.count()
        self._dir = tempfile.TemporaryDirectory(prefix="kvx-sim-")
        root = Path(self._dir.name)
        make = config or (lambda d: NodeConfig(data_dir=d, metrics_port=None))
        self._root, self._publishers, self.hostile = root, publishers, hostile
        self.cores: list[NodeCore] = [
            self._core(i, make(root / str(i)), Identity.from_seed(self.rng.randbytes(32)))
            for i in range(n)
        ]
        self.index = {core.identity.public_key: i for i, core in enumerate(self.cores)}
        accomplices = tuple(
            PeerEntry(key=self.cores[i].identity.public_key, ctl=self.address(i), inc=0, state=0)
            for i in sorted(hostile)
        )
        for i in hostile:
            core = self.cores[i]
            assert isinstance(core, HostileCore)
            core.conspire(accomplices)
        self.curve = [curve_public_key(core.identity.public_key) for core in self.cores]
        self.down: set[int] = set()
        self._connected: list[set[bytes]] = [set() for _ in self.cores]  # keys each dialed
        self._timers: list[tuple[float, int, int]] = []  # (due, node, its generation)
        self.on_receive: Callable[[int, int, bytes], None] | None = None
        self.on_happening: Callable[[int, Happening], None] | None = None  # node, what
        self.outside: list[Reply] = []  # answers to connections no core opened
        self._links: dict[frozenset[int], float] = {}  # loss of one link, over the network's
        self._side: dict[int, int] = {}  # node -> its side of a partition

    def _core(self, i: int, config: NodeConfig, identity: Identity) -> NodeCore:
        """Node `i` as a process starting: in-memory ledger and scores, a store if it
        publishes, its own seeded RNG."""
        store = (
            LocalStore(self._root / str(i), memory_bytes=1 << 30, disk_bytes=1 << 30)
            if i in self._publishers
            else NoStore()
        )
        kind = HostileCore if i in self.hostile else NodeCore
        return kind(
            config,
            identity,
            scores=PeerScores(":memory:"),
            ledger=Ledger(":memory:", identity.node_id),
            store=store,
            now=self.clock.at(),
            rng=random.Random(self.rng.getrandbits(64)),
            seqs=functools.partial(self._next_seq, identity.public_key),
            # Tokens and challenges from a source of their own: the main RNG's draws (and so
            # every figure of a run) are the same whether or not a node draws tokens.
            tokens=random.Random(f"{self.seed}/{i}/{self._generation.get(i, 0)}").randbytes,
        )

    def _next_seq(self, key: bytes) -> int:
        """A node's next sequence number: above its last, and at least simulated time in
        microseconds, as a node's own are (trust/_envelope.py), so that a restarted node
        is not taken for a replay."""
        seq = self._seq[key] = max(self._seq.get(key, 0) + 1, int(self.clock.at().wall * 1e6))
        return seq

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for core in self.cores:
            core.ledger.close()
            core.scores.close()
            core.store.close()
        self._dir.cleanup()

    # ---- setting up ------------------------------------------------------------------

    def start(self, *, known: int = 16) -> None:
        """Serve every core, each knowing `known` random others as alive peers (a swarm
        that has already formed: joining is the subject of other runs)."""
        for i, core in enumerate(self.cores):
            core.serve(self.address(i), self._data(i), self.clock.at())
        for i in range(len(self.cores)):
            self._introduce(i, known)
        self._timers = [(core.next_timer(), i, 0) for i, core in enumerate(self.cores)]
        heapq.heapify(self._timers)
        for i in range(len(self.cores)):
            self._drain(i)

    def _introduce(self, i: int, known: int) -> None:
        core, now = self.cores[i], self.clock.now
        others = self.rng.sample(range(len(self.cores)), min(known + 1, len(self.cores)))
        for j in [j for j in others if j != i][:known]:
            core.liveness.peers.heard_from(
                self.cores[j].identity.public_key, self.address(j), 0, now
            )

    @staticmethod
    def _data(i: int) -> tuple[DataAddress, ...]:
        return (DataAddress("tcp", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7001"),)

    def crash(self, i: int) -> None:
        """Node `i` stops: frames to it are lost, its timers stop, its state is gone."""
        self.down.add(i)
        self._generation[i] = self._generation.get(i, 0) + 1

    def restart(self, i: int, *, known: int = 16) -> None:
        """Node `i` starts again with its identity and nothing else (a new incarnation),
        knowing `known` peers, as from its bootstrap list."""
        old = self.cores[i]
        old.ledger.close()
        old.scores.close()
        old.store.close()
        self.cores[i] = core = self._core(i, old.config, old.identity)
        self._connected[i] = set()  # a new process holds no connection
        core.serve(self.address(i), self._data(i), self.clock.at())
        self._introduce(i, known)
        self.down.discard(i)
        heapq.heappush(self._timers, (core.next_timer(), i, self._generation.get(i, 0)))
        self._drain(i)

    def link(self, i: int, j: int, loss: float) -> None:
        """The link between `i` and `j` loses this fraction of frames, both ways."""
        self._links[frozenset((i, j))] = loss

    def partition(self, *sides: set[int]) -> None:
        """Cut the network into `sides` (nodes named in none form one more side): frames
        between sides are lost until `heal`."""
        self._side = {i: n for n, side in enumerate(sides, start=1) for i in side}

    def heal(self) -> None:
        self._side = {}

    def _lost(self, i: int, j: int) -> bool:
        if self._side.get(i, 0) != self._side.get(j, 0):
            return True
        return self.rng.random() < self._links.get(frozenset((i, j)), self.network.loss)

    @staticmethod
    def address(i: int) -> str:
        return f"tcp://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7000"

    # ---- running ---------------------------------------------------------------------

    def run_until(self, t: float) -> None:
        """Deliver frames and fire timers, in time order, up to simulated time `t`."""
        while True:
            frame_at = self._queue[0].at if self._queue else float("inf")
            timer_at = self._timers[0][0] if self._timers else float("inf")
            at = min(frame_at, timer_at)
            if at > t:
                self.clock.now = t
                return
            self.clock.now = at
            if frame_at <= timer_at:
                self._deliver(heapq.heappop(self._queue))
                continue
            _, i, generation = heapq.heappop(self._timers)
            if i in self.down or generation != self._generation.get(i, 0):
                continue  # a crashed node's timers stop; restart() sets them again
            self.cores[i].handle_timer(self.clock.at())
            heapq.heappush(self._timers, (self.cores[i].next_timer(), i, generation))
            self._drain(i)

    def _deliver(self, d: _Delivery) -> None:
        if d.to in self.down:
            return
        core = self.cores[d.to]
        if d.reply:  # an answer on the receiver's own connection to the sender
            sender = self.cores[d.sender].identity.public_key
            core.receive(d.frame, self.curve[d.sender], None, sender, now=self.clock.at())
        else:
            routing = d.sender.to_bytes(4, "big")
            core.receive(d.frame, self.curve[d.sender], routing, None, now=self.clock.at())
        if self.on_receive is not None:
            self.on_receive(d.to, d.sender, d.frame)
        self._drain(d.to)

    def _drain(self, i: int) -> None:
        for out in self.cores[i].drain():
            if isinstance(out, Connect):
                # The CURVE handshake fails unless the key is the one at that address.
                to = self.index.get(out.key)
                if to is not None and self.address(to) == out.ctl:
                    self._connected[i].add(out.key)
                continue
            if isinstance(out, Disconnect):
                self._connected[i].discard(out.key)
                continue
            if isinstance(out, Happening):
                if self.on_happening is not None:
                    self.on_happening(i, out)
                continue
            if isinstance(out, Send):
                if out.key not in self._connected[i]:
                    continue  # no connection carries it
                to, reply = self.index.get(out.key), False
            else:
                assert isinstance(out, Reply)
                to, reply = int.from_bytes(out.routing, "big"), True
                if to >= len(self.cores):  # to a peer that is no core: a test's own
                    self.outside.append(out)
                    continue
            if to is None:
                continue
            self.traffic.count(out.mtype, len(out.frame))
            if self._lost(i, to):
                self.traffic.lost += 1
                continue
            at = self.clock.now + self.network.delay(self.rng)
            heapq.heappush(self._queue, _Delivery(at, next(self._order), to, out.frame, i, reply))

    # ---- what a run measures ---------------------------------------------------------

    def publish(
        self, i: int, blocks: int = 2, *, document: tuple[bytes, tuple[bytes, ...]] | None = None
    ) -> tuple[bytes, int]:
        """Node `i` stores and advertises a small payload (of `document`, a fingerprint
        and chain, if given); returns the ad's (signer, seq)."""
        core = self.cores[i]
        layout = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)
        fp, chain = document or (
            self.rng.randbytes(32),
            tuple(self.rng.randbytes(32) for _ in range(blocks)),
        )
        payload = bytes(layout.payload_bytes(len(chain)))
        request = PublishRequest(fp, layout, chain, payload, chunk=1 << 16)
        entry = core.publish(request, self.clock.at())
        st = core.advertisement(entry.root)
        self._drain(i)
        return st.signer, st.header.seq

    def purchase(self, i: int, fp: bytes, chain: tuple[bytes, ...]) -> int:
        """Node `i` buys `chain` through the Purchase a PeerClient drives (p2p/_purchase.py):
        it looks the chain up at its own node, asks the providers listed, then those a
        new lookup lists, until one quotes, and its node scores each provider by what the
        purchase reports (a failure by its code, a quote taken GOOD_DELIVERY). No KV moves
        and no time passes here: a hostile provider, which holds nothing, answers
        NOT_FOUND; an honest one quotes what it advertised. Returns the providers asked,
        or 0 when none could deliver."""
        core, now = self.cores[i], self.clock.at().wall
        want = Want(fp, chain, bid=lambda layout, tokens: 1 << 62, max_bytes=1 << 40, timeout_s=30)
        buyer = Purchase(want, core.signer, now)

        def lookup() -> list[Action]:
            matched, adverts = core.lookup(fp, None, chain, 8, asker=core.id, now=self.clock.at())
            return buyer.listed(matched, [open_envelope(a.frame) for a in adverts], (), now)

        def score(report: Report | None) -> None:
            for fault in () if report is None else report.faults:
                if (event := blame(fault.code)) is not None:
                    core.scores.record(fault.provider, event, now)

        actions, asked = [*lookup(), *buyer.wanted(now)], 0
        while actions:
            match actions.pop(0):
                case Ask(provider=provider, ad=ad, frame=frame):
                    asked += 1
                    actions += self._quote(buyer, provider, ad, frame, now)
                case Lookup():
                    actions += lookup()
                case Report() as report:
                    score(report)
                case Ready(quoted=quoted):
                    score(buyer.unreported())
                    core.scores.record(quoted.provider, Event.GOOD_DELIVERY, now)
                    return asked
                case Exhausted():
                    score(buyer.unreported())
                    return 0
        return 0

    def _quote(
        self, buyer: Purchase, provider: bytes, ad: Statement, request: bytes, now: float
    ) -> list[Action]:
        """A provider's answer to a QUOTE_REQUEST, fed to the buyer's purchase."""
        seller = self.index[ad.signer]
        if seller in self.hostile:
            return buyer.failed(provider, ErrorCode.NOT_FOUND, "it holds nothing", now)
        a = ad.message
        assert isinstance(a, Advertise)
        quote = Quote(
            re=open_envelope(request).header.seq,
            quote=hashlib.blake2b(request, digest_size=16).digest(),
            blocks=buyer.matched,
            stored=len(a.blocks),
            layout=a.layout,
            root=a.root,
            chunk=a.chunk,
            price=a.price,
            transport=a.data[0].t,
            data=a.data[0].addr,
            token=bytes(32),
        )
        frame = self.cores[seller].signer.seal(quote, now_ms=int(now * 1000), to=provider)
        return buyer.answered(provider, open_envelope(frame), now)
