"""The node's protocol logic, sans-I/O: what a kvx node does with each statement it
receives and at each timer, and nothing of how bytes move.

In the shape of aioquic's QuicConnection and h11's Connection: the driver (p2p/_node.py
over ZeroMQ, bench/sim.py over a simulated network) feeds it frames with `receive` and
the time with `handle_timer`, asks `next_timer` when to call again, and carries out what
`drain` returns — statements to send to a peer, answers on the connection a statement
came on, connections to drop. No asyncio, no socket and no clock of its own live here;
the clock is injected, and storage (ledger, scores, store) comes in as objects.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvx.protocol import (
    RELAYABLE,
    DataAddress,
    Error,
    ErrorCode,
    Message,
    MessageType,
    RawEnvelope,
    RemoteProtocolError,
    body_seq,
    node_id,
)
from kvx.transport import Offer, Sessions
from kvx.trust import (
    Event,
    Identity,
    Inbox,
    Ledger,
    Memberships,
    PeerScores,
    Receipted,
    ReplayGuard,
    Signer,
    Statement,
    curve_public_key,
    source_network,
    verify_envelope,
)

from ._clock import Now
from ._config import NodeConfig
from ._dials import Connect, Connections
from ._events import (
    ConnectFailed,
    Degraded,
    Happening,
    PeerBack,
    PeerError,
    Rejected,
    StoreDropped,
    StreamCut,
)
from ._fraud import Fraud, Judge
from ._gossip import RECENT_MAX, SEND_BURST, SEND_RATE_PER_S, Gossip
from ._index import AdId, AdIndex
from ._liveness import Liveness
from ._market import Authorize, Market
from ._metrics import Metrics
from ._peers import PeerTable
from ._pricing import PricePolicy
from ._probing import IndirectProbes
from ._rates import RateLimits
from ._store import LocalStore
from ._trading import Trading

if TYPE_CHECKING:
    import random

log = logging.getLogger("kvx.node")

LEDGER_RETRY_S = 10.0
"""After a failed ledger write (a full disk), the node quotes nothing for this long."""
DIRECT_LIFE = frozenset(MessageType) - RELAYABLE - {MessageType.LEAVE}
"""Statements whose arrival from their signer proves it lives: direct ones, but a LEAVE."""
FINISHING = frozenset({MessageType.ACCEPT, MessageType.RECEIPT, MessageType.REJECT})
"""What a leaving node still takes: the rest of the deals it quoted (§8.22)."""


@dataclass(frozen=True)
class Send:
    """Send `frame` to the peer with Ed25519 key `key` (over this node's own connection)."""

    key: bytes
    frame: bytes
    mtype: MessageType


@dataclass(frozen=True)
class Reply:
    """Send `frame` back on the connection a statement arrived on (`routing` names it)."""

    routing: bytes
    frame: bytes
    mtype: MessageType


@dataclass(frozen=True)
class Disconnect:
    """Drop this node's connection to `key` (it died, restarted, or left the table)."""

    key: bytes


Output = Connect | Send | Reply | Disconnect | Judge | Authorize | Happening


class NodeCore(Liveness, Gossip, Trading, Fraud):
    """One node's protocol logic. This module admits each frame (rate limits, the
    receive checks of spec §6.4, bans, policy), dispatches it, runs the timer rounds
    and keeps the outputs; what each statement does is in the parts it is made of:
    membership and liveness (p2p/_liveness.py), gossip (p2p/_gossip.py), lookups and
    the seller's side of a deal (p2p/_trading.py)."""

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        *,
        scores: PeerScores,
        ledger: Ledger,
        store: LocalStore,
        now: Now,
        rng: random.Random,
        tokens: Callable[[int], bytes],
        seqs: Callable[[], int] | None = None,
        pricing: PricePolicy | None = None,
        metrics: Metrics | None = None,
        judges: frozenset[bytes] = frozenset(),
    ) -> None:
        self.config = config
        self.clock = now
        self.random = rng  # seeded in a simulation
        self.tokens = tokens  # session tokens, quote ids, challenges: unguessable in a node
        self.identity = identity
        self.id = identity.node_id
        self.signer = Signer(identity, seqs=seqs)
        self.inbox = Inbox(
            self.id,
            ReplayGuard(max_per_signer=config.replay_per_signer, max_total=config.replay_total),
        )
        self.policy = config.policy
        self.scores = scores
        self.ledger = ledger
        self.store = store
        self.peers = PeerTable(
            identity.public_key,
            suspect_after_s=config.suspect_after_s,
            dead_after_s=config.dead_after_s,
            max_peers=config.max_peers,
            keep=self._keeps,
            rng=self.random,  # a seeded run evicts the same peers
        )
        self.index = AdIndex(config.index_budget, standing=self._standing)
        self.memberships = Memberships(self.id, self.policy, tokens=tokens)
        self.metrics = metrics or Metrics()
        self.pricing = pricing or PricePolicy()
        self.incarnation = self.clock.now_ms()
        self.leaving = False
        self.sessions = Sessions()
        self.ctl = ""
        self.source_network = ""  # of the frame being handled: what its sender spoke from
        self.data: tuple[DataAddress, ...] = ()
        self._own: dict[bytes, Statement] = {}  # content root -> our ADVERTISE
        self._recent: deque[tuple[float, AdId, bytes | None]] = deque(maxlen=RECENT_MAX)
        self._pulled: dict[bytes, float] = {}  # peer -> when its news was last pulled
        self._pull_later: set[bytes] = set()
        self._sending = RateLimits(SEND_RATE_PER_S, SEND_BURST)
        self.probes = IndirectProbes()
        self._rates = RateLimits(config.rate_per_s, config.burst)
        self._curve_to_key: dict[bytes, bytes] = {}
        self.connections = Connections()  # this node's own, to its peers (§8.1a)
        self._ledger_failed_at = float("-inf")
        self._fraud_init(judges)
        self._out: list[Output] = []
        self._due: dict[str, float] = {}
        self._rounds: dict[str, Callable[[], None]] = {
            "heartbeat": self._heartbeat_round,
            "anti_entropy": self._anti_entropy_round,
            "housekeeping": self._housekeeping_round,
        }
        self._handlers: dict[MessageType, Callable[[Statement, bytes | None, bytes], None]] = {
            MessageType.HELLO: self._on_hello,
            MessageType.PEERS: self._on_peers,
            MessageType.ADVERTISE: self._on_advertise,
            MessageType.WITHDRAW: self._on_withdraw,
            MessageType.DIGEST: self._on_digest,
            MessageType.LOOKUP: self._on_lookup,
            MessageType.MEMBERSHIP: self._on_membership,
            MessageType.ERROR: self._on_error,
            MessageType.QUOTE_REQUEST: self._on_quote_request,
            MessageType.ACCEPT: self._on_accept,
            MessageType.REJECT: self._on_reject,
            MessageType.RECEIPT: self._on_receipt,
            MessageType.PROBE: self._on_probe,
            MessageType.PROBE_ACK: self._on_probe_ack,
            MessageType.ACCUSE: self._on_accuse,
            MessageType.EVIDENCE_REQUEST: self._on_evidence_request,
            MessageType.EVIDENCE: self._on_evidence,
            MessageType.LEAVE: self._on_leave,
        }

    # ---- what the driver calls ---------------------------------------------------------

    def serve(self, ctl: str, data: tuple[DataAddress, ...], now: Now) -> None:
        """The driver listens at `ctl` and serves KV at `data`: sell, advertise, join."""
        self.clock = now
        self.ctl, self.data = ctl, data
        self.market = Market(
            signer=self.signer,
            store=self.store,
            ledger=self.ledger,
            sessions=self.sessions,
            policy=self.policy,
            memberships=self.memberships,
            pricing=self.pricing,
            data={d.t: d.addr for d in data},
            window_bytes=self.config.payment_window_bytes,
            selling=self.selling,
            tokens=self.tokens,
            now_ms=now.now_ms(),
        )
        for entry in self.store.verify_all():  # never advertise what cannot be served
            self.event(StoreDropped(root=entry.root.hex()[:16], reason="failed its root"))
        for entry in self.store.entries():
            self._advertise(entry)
        for boot in self.config.bootstrap:
            self._send(boot.key, self._hello())
        self._due = {name: now.mono + self._period(name) for name in self._rounds}

    def drain(self) -> list[Output]:
        """What to send and drop, in order, since the last call."""
        out, self._out = self._out, []
        return out

    def next_timer(self) -> float:
        """The monotonic time at which handle_timer has work to do."""
        return min(self._due.values())

    def handle_timer(self, now: Now) -> None:
        """Run the rounds that are due; one that fails is logged and counted, not fatal."""
        self.clock = now
        for name, run in self._rounds.items():
            if self._due.get(name, float("inf")) > now.mono:
                continue
            self._due[name] = now.mono + self._period(name)
            if self.leaving and name != "housekeeping":  # probes, gossip: "it is back"
                continue
            try:
                run()
            except sqlite3.Error as exc:
                self._ledger_failed(exc)
            except Exception:
                self.internal_error(name)
        self._sweep_connections()

    def _period(self, name: str) -> float:
        if name == "heartbeat":
            return self.config.heartbeat_s
        if name == "anti_entropy":  # jittered, so that rounds across the swarm spread out
            return self.config.anti_entropy_s * self.random.uniform(0.5, 1.5)
        return 1.0

    def multipart_refused(self) -> None:
        """The driver dropped a ZeroMQ message of more than one frame (spec §4.2)."""
        self.metrics.rejections.labels(ErrorCode.MALFORMED.name).inc()

    def _sweep_connections(self) -> None:
        """Drop the connections no longer of use: to a key neither in the peer table nor
        kept by it (bootstrap, proven sellers)."""
        for key in self.connections.connected():
            if key not in self.peers and not self._keeps(key):
                self._disconnect(key)
        self.connections.dials.prune(self.clock.mono)

    def held(self) -> dict[str, int]:
        """What the core holds for its peers, each against a budget (spec §13.1)."""
        return {
            "replay_entries": len(self.inbox.guard),
            "replay_signers": self.inbox.guard.signers(),
            "replay_forgotten": self.inbox.guard.forgotten,
            "rate_buckets": len(self._rates) + len(self._sending),
            "curve_keys": len(self._curve_to_key),
            "sessions": len(self.memberships),
            "peers": len(self.peers.all()),
            "peers_evicted": self.peers.evicted,
            "dealers": len(self.connections),
            "dial_backoffs": len(self.connections.dials),
            "ads": len(self.index),
            "ad_bytes": self.index.held_bytes,
            "ad_signers": self.index.signers(),
            "ads_forgotten": self.index.forgotten,
            "withdrawals": self.index.withdrawals(),
            **self.probes.held(),
            "evidence_pulls": len(self._pulls),
            "accusations_unchecked": len(self.unchecked),
        }

    # ---- outputs ---------------------------------------------------------------------

    def _send_frame(self, key: bytes, frame: bytes, mtype: MessageType) -> None:
        """Send over this node's own connection to `key`, opening it if §8.1a allows;
        a statement to a key it may not dial now is dropped."""
        peer = self.peers.get(key)
        boot = next((b.ctl for b in self.config.bootstrap if b.key == key), None)
        proven = boot is not None or (peer is not None and peer.proven)
        ctl = peer.ctl if peer is not None else boot
        drop, connect, ok = self.connections.reach(key, ctl, proven, self.clock.mono)
        self._out.extend(Disconnect(k) for k in drop)
        if connect is not None:
            self._out.append(connect)
        if ok:
            self._out.append(Send(key, frame, mtype))

    def connect_failed(self, key: bytes, error: str, now: Now) -> None:
        """The driver could not open the connection a Connect asked for."""
        self.clock = now
        self.connections.forget(key)
        self.event(ConnectFailed(peer=node_id(key).hex()[:12], error=error))

    def _reply_frame(self, routing: bytes, frame: bytes, mtype: MessageType) -> None:
        self._out.append(Reply(routing, frame, mtype))

    def _disconnect(self, key: bytes) -> None:
        self.connections.forget(key)
        self._out.append(Disconnect(key))

    def event(self, happening: Happening) -> None:
        """Note what happened, for the driver to log."""
        self._out.append(happening)

    def internal_error(self, where: str) -> None:
        """A fault of kvx itself while handling one frame or one timer round: it costs that
        frame or round, is logged with its traceback and counted, and the node goes on."""
        log.exception("internal error in %s", where)
        self.metrics.internal_errors.labels(where).inc()

    def _send(self, key: bytes, message: Message) -> None:
        frame = self.signer.seal(message, now_ms=self.clock.now_ms(), to=node_id(key))
        self._send_frame(key, frame, message.TYPE)

    def receive(
        self,
        frame: bytes,
        curve: bytes,
        routing: bytes | None,
        server_key: bytes | None,
        source: str = "",
        *,
        now: Now,
    ) -> None:
        """One frame from a connection whose CURVE key is `curve`: on the ROUTER (answers
        go back by `routing`, `source` is the address it came from), or on this node's
        own connection to `server_key`."""
        self.clock = now
        self.source_network = source_network(source) if source else ""
        self.metrics.bytes_in.inc(len(frame))
        if not self._rates.take(curve, self.clock.monotonic()):
            # Flow control, not blame: an honest relay or a DIGEST answer may run over
            # too, so the excess is dropped and nobody is scored for volume (§12.6).
            self.metrics.rejections.labels(ErrorCode.RATE_LIMITED.name).inc()
            return
        try:
            st = self.inbox.receive(frame, now_ms=self.clock.now_ms(), peer_curve_key=curve)
        except RemoteProtocolError as exc:
            self._rejected(frame, curve, routing, exc)
            return
        signer_id = st.signer_id
        if st.type not in RELAYABLE:
            self._curve_to_key[curve] = st.signer
        if self.scores.is_banned(signer_id, self.clock.time()):
            self.metrics.rejections.labels(ErrorCode.DENIED.name).inc()
            return
        try:
            self.policy.check_peer(signer_id)
        except RemoteProtocolError as exc:
            self.metrics.rejections.labels(exc.code.name).inc()
            self._answer_error(st, routing, exc)
            return
        self.metrics.received.labels(st.type.name).inc()
        if self.leaving and st.type not in FINISHING:
            if st.type == MessageType.QUOTE_REQUEST:  # the buyer asks the next provider now
                self._answer_error(
                    st, routing, RemoteProtocolError(ErrorCode.UNAVAILABLE, "this node is leaving")
                )
            return
        if st.type in DIRECT_LIFE and self.peers.alive_again(st.signer, self.clock.monotonic()):
            # Only a statement the peer itself sent proves it lives (a relayed ad does not).
            self.event(PeerBack(peer=signer_id.hex()[:12]))
            self._disconnect(st.signer)
            self._pull_news(st.signer)
        if st.type not in RELAYABLE:
            self._vouch(st)
        relayer = server_key if server_key is not None else self._curve_to_key.get(curve, b"")
        handler = self._handlers.get(st.type)
        try:
            if handler is None:
                raise RemoteProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"this node does not serve {st.type.name}"
                )
            handler(st, routing, relayer)
        except RemoteProtocolError as exc:
            self.metrics.rejections.labels(exc.code.name).inc()
            self._answer_error(st, routing, exc)
        except sqlite3.Error as exc:  # the disk (full, failing): degrade, do not stop
            self._ledger_failed(exc)
            unavailable = RemoteProtocolError(ErrorCode.UNAVAILABLE, "this node cannot write now")
            self._answer_error(st, routing, unavailable)
        except Exception:
            self.internal_error(st.type.name)
            self._answer_error(
                st, routing, RemoteProtocolError(ErrorCode.INTERNAL, "the node failed")
            )

    def _ledger_failed(self, exc: sqlite3.Error) -> None:
        """Selling needs the ledger: for a while the node quotes nothing, and says why."""
        self._ledger_failed_at = self.clock.monotonic()
        self.metrics.degraded.labels("ledger").set(1)
        self.event(Degraded(what="ledger", error=str(exc)[:200]))

    def window_receipt(self, st: Statement, now: Now) -> None:
        """A receipt a buyer paid mid-stream (§9.4): the stream moves on only once it is
        recorded, so a refusal here (the ledger's code, or UNAVAILABLE) ends the stream."""
        self.clock = now
        try:
            self._earned(self.market.receipt(st, self.clock.now_ms(), window=True))
        except sqlite3.Error as exc:
            self._ledger_failed(exc)
            raise RemoteProtocolError(ErrorCode.UNAVAILABLE, "this node cannot write now") from None

    def _earned(self, paid: Receipted) -> None:
        self.metrics.credits_earned.inc(paid.credits)
        self.metrics.sold_tokens.inc(paid.tokens)

    def stream_finished(self, offer: Offer, sent: int, whole: bool, now: Now) -> None:
        """A stream of one of our deals ended: delivered, or the deal is over (§10.7)."""
        self.clock = now
        self.metrics.data_bytes_sent.inc(sent)
        try:
            self.market.finished(offer, sent, whole, now.now_ms())
        except sqlite3.Error as exc:
            self._ledger_failed(exc)

    def stream_fault(self, buyer: bytes, exc: RemoteProtocolError, now: Now) -> None:
        """A seller's stream ended for what its buyer did: read below the minimum rate
        (§9.5), holding a thread others needed, or sent a window receipt the seller could
        not take (§9.4). Either breaks a rule of the spec, so the buyer is scored for it;
        a ledger that cannot write is nobody's fault."""
        self.clock = now
        if exc.code == ErrorCode.UNAVAILABLE:
            return
        event = Event.TIMEOUT if exc.code == ErrorCode.TIMEOUT else Event.BAD_RECEIPT
        self.scores.record(node_id(buyer), event, self.clock.time())
        self.event(
            StreamCut(buyer=node_id(buyer).hex()[:12], code=exc.code.name, why=exc.detail[:120])
        )

    def _rejected(
        self, frame: bytes, curve: bytes, routing: bytes | None, exc: RemoteProtocolError
    ) -> None:
        self.metrics.rejections.labels(exc.code.name).inc()
        key = self._curve_to_key.get(curve)
        try:  # the signer, if the frame got as far as a verified signature (§6.4 step 7)
            raw: RawEnvelope | None = verify_envelope(frame)
        except RemoteProtocolError:
            raw = None
        if exc.code == ErrorCode.REPLAYED and raw and raw.type in RELAYABLE:
            return  # gossip delivered it twice: nobody's fault (spec §6.3)
        event = Event.for_code(exc.code)
        if key is not None and event is not None:
            self.scores.record(node_id(key), event, self.clock.time())
        self.event(Rejected(code=exc.code.name, detail=exc.detail[:120]))
        # Answer (spec §6.5) only a direct frame whose signer is this connection's peer:
        # anyone else is nobody we can address.
        if raw is not None and curve_public_key(raw.signer) == curve:
            self._send_error(routing, raw.type, raw.signer, body_seq(raw.body), exc)

    def _answer_error(self, st: Statement, routing: bytes | None, exc: RemoteProtocolError) -> None:
        self._send_error(routing, st.type, st.signer, st.header.seq, exc)

    def _send_error(
        self,
        routing: bytes | None,
        mtype: MessageType,
        signer: bytes,
        re: int | None,
        exc: RemoteProtocolError,
    ) -> None:
        """ERROR back on the connection a direct statement came on; never for an ERROR."""
        if routing is None or mtype in RELAYABLE or mtype == MessageType.ERROR:
            return
        reply = self.signer.seal_error(exc, re=re, to=node_id(signer), now_ms=self.clock.now_ms())
        self._reply_frame(routing, reply, MessageType.ERROR)

    def _reply(self, routing: bytes, st: Statement, message: Message) -> None:
        frame = self.signer.seal(message, now_ms=self.clock.now_ms(), to=st.signer_id)
        self._reply_frame(routing, frame, message.TYPE)

    def _on_error(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        assert isinstance(st.message, Error)
        self.event(
            PeerError(peer=st.signer_id.hex()[:12], code=st.message.code, msg=st.message.msg)
        )

    def _housekeeping_round(self) -> None:
        self._forget_strangers()
        self.index.expire(self.clock.now_ms())
        self.market.expire(self.clock.now_ms())
        self._expire_pulls()
        self._pull_news_due()
        self.metrics.degraded.labels("scores").set(int(self.scores.write_failed))
        self.metrics.degraded.labels("ledger").set(int(not self.selling()))
        self.metrics.ads.set(len(self.index))
        self.metrics.credits.set(sum(self.ledger.balances().values()))
        self._refresh_own()

    def _forget_strangers(self) -> None:
        """Per-identity state lives only as long as its use: buckets refilled to the
        brim, CURVE keys, pull times and membership sessions of peers no longer in the
        table go."""
        now = self.clock.monotonic()
        self._rates.prune(now)
        self._sending.prune(now)
        known = {p.key for p in self.peers.all()} | {b.key for b in self.config.bootstrap}
        for curve in [c for c, k in self._curve_to_key.items() if k not in known]:
            del self._curve_to_key[curve]
        for key in [k for k in self._pulled if k not in known]:
            del self._pulled[key]
        self.probes.expire(now, known)
        kept_ids = {node_id(k) for k in known}
        self.memberships.prune(lambda peer: peer in kept_ids, self.clock.time())

    def selling(self) -> bool:
        """Whether the ledger can record deals: not within a while of a failed write."""
        return self.clock.monotonic() - self._ledger_failed_at > LEDGER_RETRY_S
