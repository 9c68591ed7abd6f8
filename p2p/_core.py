"""The node's protocol logic, sans-I/O: what a kvx node does with each statement it
receives and at each timer, and nothing of how bytes move.

In the shape of aioquic's QuicConnection and h11's Connection: the driver (p2p/_node.py
over ZeroMQ, bench/sim.py over a simulated network) feeds it frames with `receive` and
the time with `handle_timer`, asks `next_timer` when to call again, and carries out what
`drain` returns — statements to send to a peer, answers on the connection a statement
came on, connections to drop, what happened. No asyncio, no socket and no clock of its
own live here: the time comes with each input, and storage (ledger, scores, store) comes
in as objects. Each part owns its state and acts through one Outbox (p2p/_outbox.py);
this module admits frames and dispatches them, and where one statement concerns two
parts (a HELLO brings a peer and its news) it hands it to both.
"""

from __future__ import annotations

import sqlite3
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvx.protocol import (
    RELAYABLE,
    DataAddress,
    Error,
    ErrorCode,
    MessageType,
    Peers,
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
    PeerScores,
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
    Accepted,
    ConnectFailed,
    Dropped,
    Happening,
    InternalError,
    PeerBack,
    PeerError,
    PeerLeft,
    Rejected,
    StoreDropped,
)
from ._fraud import Fraud, Judge
from ._gossip import Gossip
from ._index import Advert
from ._liveness import Liveness
from ._market import Authorize
from ._outbox import Disconnect, Outbox, Reply, Send
from ._pricing import PricePolicy
from ._rates import RateLimits
from ._store import Entry, LocalStore, Payload, PublishRequest
from ._trading import Trading

if TYPE_CHECKING:
    import random

DIRECT_LIFE = frozenset(MessageType) - RELAYABLE - {MessageType.LEAVE}
"""Statements whose arrival from their signer proves it lives: direct ones, but a LEAVE."""
FINISHING = frozenset({MessageType.ACCEPT, MessageType.RECEIPT, MessageType.REJECT})
"""What a leaving node still takes: the rest of the deals it quoted (§8.22)."""

Output = Connect | Send | Reply | Disconnect | Judge | Authorize | Happening

Handler = Callable[[Statement, bytes | None, bytes], None]
"""What a statement does: the statement, the connection to answer on, who relayed it."""


class NodeCore:
    """One node's protocol logic. This class admits each frame (rate limits, the receive
    checks of spec §6.4, bans, policy), dispatches it, runs the timer rounds and keeps
    the outputs; what each statement does is in the parts: membership and liveness
    (`liveness`, p2p/_liveness.py), gossip (`gossip`, p2p/_gossip.py), lookups and the
    seller's side of a deal (`trading`, p2p/_trading.py), fraud proofs (`fraud`,
    p2p/_fraud.py)."""

    liveness_kind = Liveness  # a simulated hostile node (kvx/testing/_sim.py) cheats in its
    gossip_kind = Gossip  # parts

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
        judges: frozenset[bytes] = frozenset(),
    ) -> None:
        self.config = config
        self.random = rng  # seeded in a simulation
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
        self.sessions = Sessions()
        self.connections = Connections()  # this node's own, to its peers (§8.1a)
        pricing = pricing or PricePolicy()
        self.out = Outbox(self.signer, self.connections, now)
        self.liveness = self.liveness_kind(
            self.out, config, identity, scores=scores, rng=rng, tokens=tokens
        )
        self.out.address = self.liveness.address
        guard = self.inbox.guard
        self.gossip = self.gossip_kind(
            self.out,
            config,
            self.liveness,
            guard=guard,
            store=store,
            pricing=pricing,
            rng=rng,
        )
        self.trading = Trading(
            self.out,
            config,
            self.liveness,
            self.gossip,
            scores=scores,
            ledger=ledger,
            store=store,
            sessions=self.sessions,
            pricing=pricing,
            tokens=tokens,
        )
        self.fraud = Fraud(
            self.out, self.liveness, self.gossip, scores=scores, guard=guard, judges=judges
        )
        self.source_network = ""  # of the frame being handled: what its sender spoke from
        self._rates = RateLimits(config.rate_per_s, config.burst)
        self._curve_to_key: dict[bytes, bytes] = {}
        self._due: dict[str, float] = {}
        self._rounds: dict[str, Callable[[], None]] = {
            "heartbeat": self.liveness.heartbeat_round,
            "anti_entropy": self.gossip.anti_entropy_round,
            "housekeeping": self._housekeeping_round,
        }
        lv, gs, tr, fr = self.liveness, self.gossip, self.trading, self.fraud
        self._handlers: dict[MessageType, Handler] = {
            MessageType.HELLO: self._on_hello,
            MessageType.PEERS: self._on_peers,
            MessageType.ADVERTISE: lambda st, routing, relayer: gs.on_advertise(st, relayer),
            MessageType.WITHDRAW: lambda st, routing, relayer: gs.on_withdraw(st, relayer),
            MessageType.DIGEST: lambda st, routing, relayer: gs.on_digest(st, routing),
            MessageType.LOOKUP: lambda st, routing, relayer: tr.on_lookup(st, routing),
            MessageType.MEMBERSHIP: lambda st, routing, relayer: lv.on_membership(st),
            MessageType.ERROR: self._on_error,
            MessageType.QUOTE_REQUEST: lambda st, routing, relayer: tr.on_quote_request(
                st, routing, self.source_network
            ),
            MessageType.ACCEPT: lambda st, routing, relayer: tr.on_accept(st, self.source_network),
            MessageType.REJECT: lambda st, routing, relayer: tr.on_reject(st, routing),
            MessageType.RECEIPT: lambda st, routing, relayer: tr.on_receipt(st),
            MessageType.PROBE: lambda st, routing, relayer: lv.on_probe(st, routing),
            MessageType.PROBE_ACK: lambda st, routing, relayer: lv.on_probe_ack(st),
            MessageType.ACCUSE: fr.on_accuse,
            MessageType.EVIDENCE_REQUEST: lambda st, routing, relayer: fr.on_evidence_request(
                st, routing
            ),
            MessageType.EVIDENCE: lambda st, routing, relayer: fr.on_evidence(st),
            MessageType.LEAVE: self._on_leave,
        }

    # ---- what the driver calls ---------------------------------------------------------

    def _at(self, now: Now) -> None:
        self.out.now = now

    def serve(self, ctl: str, data: tuple[DataAddress, ...], now: Now) -> None:
        """The driver listens at `ctl` and serves KV at `data`: sell, advertise, join."""
        self._at(now)
        self.liveness.ctl, self.liveness.data = ctl, data
        self.trading.serve(data)
        for entry in self.store.verify_all():  # never advertise what cannot be served
            self.out.event(StoreDropped(root=entry.root.hex()[:16], reason="failed its root"))
        self.gossip.advertise_stored()
        for boot in self.config.bootstrap:
            self.out.send(boot.key, self.liveness.hello())
        self._due = {name: now.mono + self._period(name) for name in self._rounds}

    def drain(self) -> list[Output]:
        """What to send and drop, in order, since the last call."""
        return self.out.drain()

    def next_timer(self) -> float:
        """The monotonic time at which handle_timer has work to do."""
        return min(self._due.values())

    def handle_timer(self, now: Now) -> None:
        """Run the rounds that are due; one that fails is logged and counted, not fatal."""
        self._at(now)
        for name, run in self._rounds.items():
            if self._due.get(name, float("inf")) > now.mono:
                continue
            self._due[name] = now.mono + self._period(name)
            if self.liveness.leaving and name != "housekeeping":  # probes, gossip: "it is back"
                continue
            try:
                run()
            except sqlite3.Error as exc:
                self.trading.ledger_failed(exc)
            except Exception:
                self.internal_error(name)
        self._sweep_connections()

    def _period(self, name: str) -> float:
        if name == "heartbeat":
            return self.config.heartbeat_s
        if name == "anti_entropy":  # jittered, so that rounds across the swarm spread out
            return self.config.anti_entropy_s * self.random.uniform(0.5, 1.5)
        return 1.0

    def _sweep_connections(self) -> None:
        """Drop the connections no longer of use: to a key neither in the peer table nor
        kept by it (bootstrap, proven sellers)."""
        for key in self.connections.connected():
            if key not in self.liveness.peers and not self.liveness.keeps(key):
                self.out.disconnect(key)
        self.connections.dials.prune(self.out.now.monotonic())

    def connect_failed(self, key: bytes, error: str, now: Now) -> None:
        """The driver could not open the connection a Connect asked for."""
        self._at(now)
        self.connections.forget(key)
        self.out.event(ConnectFailed(peer=node_id(key).hex()[:12], error=error))

    def internal_error(self, where: str) -> None:
        """A fault of kvx itself while handling one frame or one timer round: it costs that
        frame or round, is logged with its traceback and counted, and the node goes on."""
        self.out.event(InternalError(where=where, trace=traceback.format_exc()))

    def publish(self, request: PublishRequest, now: Now) -> Entry:
        self._at(now)
        return self.gossip.publish(request)

    def withdraw(self, root: bytes, now: Now) -> None:
        """Withdraw our advertisement of a payload, as asked (the admin socket)."""
        self._at(now)
        self.gossip.withdraw(root)

    def advertisement(self, root: bytes) -> Statement:
        """This node's live ADVERTISE of the payload with this content root."""
        return self.gossip.advertisement(root)

    def lookup(
        self,
        fp: bytes,
        ns: bytes | None,
        chain: tuple[bytes, ...],
        limit: int,
        *,
        asker: bytes,
        now: Now,
    ) -> tuple[int, list[Advert]]:
        """A local client's lookup (the admin socket)."""
        self._at(now)
        return self.trading.lookup(fp, ns, chain, limit, asker=asker)

    def leave(self, now: Now) -> set[bytes]:
        """This node stops serving (§8.22); returns the keys of the peers told so."""
        self._at(now)
        return self.liveness.leave()

    def accuse(self, data: bytes, now: Now) -> bytes:
        """Evidence from this node's own client (spec §8.19); returns the proof id."""
        self._at(now)
        return self.fraud.accuse(data)

    def judged(self, proof: bytes, verdict: str, detail: str, seller_key: bytes, now: Now) -> None:
        """The driver judged evidence a Judge named (p2p/_fraud.py)."""
        self._at(now)
        self.fraud.judged(proof, verdict, detail, seller_key)

    def verdict(self, peer: bytes) -> str:
        """What this node holds against a peer, with the proof's id (spec §8.19)."""
        return self.fraud.verdict(peer)

    def loaded(
        self,
        deal: Authorize,
        payload: Payload | None,
        data: bytes | memoryview,
        hashes: list[bytes],
        *,
        now: Now,
    ) -> None:
        """The driver loaded a sold payload: its stream may open."""
        self._at(now)
        self.trading.serve_deal(deal, payload, data, hashes)

    def unservable(self, deal: Authorize, why: str, now: Now) -> None:
        """A sold payload failed its root when the driver loaded it."""
        self._at(now)
        self.trading.unservable(deal, why)

    def window_receipt(self, st: Statement, now: Now) -> None:
        """A receipt a buyer paid mid-stream (§9.4); raises when it cannot be taken."""
        self._at(now)
        self.trading.window_receipt(st)

    def stream_finished(self, offer: Offer, sent: int, whole: bool, now: Now) -> None:
        """A stream of one of our deals ended: delivered, or the deal is over (§10.7)."""
        self._at(now)
        self.trading.stream_finished(offer, sent, whole)

    def stream_fault(self, buyer: bytes, exc: RemoteProtocolError, now: Now) -> None:
        """A seller's stream ended for what its buyer did (§9.4, §9.5)."""
        self._at(now)
        self.trading.stream_fault(buyer, exc)

    def held(self) -> dict[str, int]:
        """What the core holds for its peers, each against a budget (spec §13.1)."""
        index, peers, fraud = self.gossip.index, self.liveness.peers, self.fraud
        return {
            "replay_entries": len(self.inbox.guard),
            "replay_signers": self.inbox.guard.signers(),
            "replay_forgotten": self.inbox.guard.forgotten,
            "rate_buckets": len(self._rates) + len(self.gossip.sending),
            "curve_keys": len(self._curve_to_key),
            "sessions": len(self.liveness.memberships),
            "peers": len(peers.all()),
            "peers_evicted": peers.evicted,
            "dealers": len(self.connections),
            "dial_backoffs": len(self.connections.dials),
            "ads": len(index),
            "ad_bytes": index.held_bytes,
            "ad_signers": index.signers(),
            "ads_forgotten": index.forgotten,
            "withdrawals": index.withdrawals(),
            **self.liveness.probes.held(),
            "evidence_pulls": len(fraud.pulls),
            "accusations_unchecked": len(fraud.unchecked),
        }

    # ---- admission -------------------------------------------------------------------

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
        self._at(now)
        self.source_network = source_network(source) if source else ""
        if not self._rates.take(curve, now.monotonic()):
            # Flow control, not blame: an honest relay or a DIGEST answer may run over
            # too, so the excess is dropped and nobody is scored for volume (§12.6).
            self.out.event(Dropped(code=ErrorCode.RATE_LIMITED.name))
            return
        try:
            st = self.inbox.receive(frame, now_ms=now.now_ms(), peer_curve_key=curve)
        except RemoteProtocolError as exc:
            self._rejected(frame, curve, routing, exc)
            return
        signer_id = st.signer_id
        if st.type not in RELAYABLE:
            self._curve_to_key[curve] = st.signer
        if self.scores.is_banned(signer_id, now.time()):
            self.out.event(Dropped(code=ErrorCode.DENIED.name))
            return
        try:
            self.policy.check_peer(signer_id)
        except RemoteProtocolError as exc:
            self.out.event(Dropped(code=exc.code.name))
            self._answer_error(st, routing, exc)
            return
        self.out.event(Accepted(type=st.type.name))
        if self.liveness.leaving and st.type not in FINISHING:
            if st.type == MessageType.QUOTE_REQUEST:  # the buyer asks the next provider now
                self._answer_error(
                    st, routing, RemoteProtocolError(ErrorCode.UNAVAILABLE, "this node is leaving")
                )
            return
        if st.type in DIRECT_LIFE and self.liveness.peers.alive_again(st.signer, now.monotonic()):
            # Only a statement the peer itself sent proves it lives (a relayed ad does not).
            self.out.event(PeerBack(peer=signer_id.hex()[:12]))
            self.out.disconnect(st.signer)
            self.gossip.pull_news(st.signer)
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
            self.out.event(Dropped(code=exc.code.name))
            self._answer_error(st, routing, exc)
        except sqlite3.Error as exc:  # the disk (full, failing): degrade, do not stop
            self.trading.ledger_failed(exc)
            unavailable = RemoteProtocolError(ErrorCode.UNAVAILABLE, "this node cannot write now")
            self._answer_error(st, routing, unavailable)
        except Exception:
            self.internal_error(st.type.name)
            self._answer_error(
                st, routing, RemoteProtocolError(ErrorCode.INTERNAL, "the node failed")
            )

    def _rejected(
        self, frame: bytes, curve: bytes, routing: bytes | None, exc: RemoteProtocolError
    ) -> None:
        key = self._curve_to_key.get(curve)
        try:  # the signer, if the frame got as far as a verified signature (§6.4 step 7)
            raw: RawEnvelope | None = verify_envelope(frame)
        except RemoteProtocolError:
            raw = None
        if exc.code == ErrorCode.REPLAYED and raw and raw.type in RELAYABLE:
            self.out.event(Dropped(code=exc.code.name))
            return  # gossip delivered it twice: nobody's fault (spec §6.3)
        event = Event.for_code(exc.code)
        if key is not None and event is not None:
            self.scores.record(node_id(key), event, self.out.now.time())
        self.out.event(Rejected(code=exc.code.name, detail=exc.detail[:120]))
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
        now_ms = self.out.now.now_ms()
        reply = self.signer.seal_error(exc, re=re, to=node_id(signer), now_ms=now_ms)
        self.out.reply_frame(routing, reply, MessageType.ERROR)

    # ---- statements that concern two parts -------------------------------------------

    def _on_hello(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        if self.liveness.on_hello(st):  # new, or restarted: what news does it bring?
            self.gossip.pull_news(st.signer)
        if routing is not None:
            self.liveness.welcome(st, routing, self.gossip.recent_for(st.signer))

    def _on_peers(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        self.liveness.on_peers(st)
        assert isinstance(st.message, Peers)
        recent = st.message.recent
        if recent and not self.gossip.holds_all(recent):
            # News this node missed: pull it now (§8.3) rather than at the next
            # anti-entropy round, which push gossip's misses would otherwise wait for.
            self.gossip.pull_news(st.signer)

    def _vouch(self, st: Statement) -> None:
        """A peer spoke: its statement goes to whoever asked us to probe it, if nothing in
        it belongs to a private namespace, since the asker need not be a member (§8.17):
        a PEERS only when its news are public advertisements this node holds."""
        if isinstance(st.message, Peers) and not self.gossip.all_public(st.message.recent or ()):
            return  # the askers wait for the target's next words
        self.liveness.vouch(st)

    def _on_leave(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        """A peer stops serving (§8.22): dead now, and its advertisements gone."""
        if self.liveness.on_leave(st):
            gone = self.gossip.signer_left(st)
            self.out.event(PeerLeft(peer=st.signer_id.hex()[:12], ads=gone))

    def _on_error(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        assert isinstance(st.message, Error)
        self.out.event(
            PeerError(peer=st.signer_id.hex()[:12], code=st.message.code, msg=st.message.msg)
        )

    # ---- housekeeping ----------------------------------------------------------------

    def _housekeeping_round(self) -> None:
        self._forget_strangers()
        self.gossip.expire()
        self.trading.expire()
        self.fraud.expire()
        self.gossip.pull_news_due()
        self.gossip.refresh_own()

    def _forget_strangers(self) -> None:
        """Per-identity state lives only as long as its use: buckets refilled to the
        brim, CURVE keys, pull times and membership sessions of peers no longer in the
        table go."""
        self._rates.prune(self.out.now.monotonic())
        known = self.liveness.known()
        for curve in [c for c, k in self._curve_to_key.items() if k not in known]:
            del self._curve_to_key[curve]
        self.gossip.forget_strangers(known)
        self.liveness.forget_strangers(known)
