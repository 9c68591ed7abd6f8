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

import contextlib
import logging
import random
import sqlite3
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from kvx.protocol import (
    ENDPOINT_TRANSPORTS,
    MAX_FRAME_BYTES,
    RELAYABLE,
    Advertise,
    DataAddress,
    Digest,
    DigestEntry,
    Error,
    ErrorCode,
    Hello,
    KVLayout,
    Lookup,
    LookupResult,
    Membership,
    Message,
    MessageType,
    Peers,
    Probe,
    ProbeAck,
    RawEnvelope,
    RemoteProtocolError,
    Withdraw,
    node_id,
    split_ctl,
    split_host_port,
)
from kvx.transport import Sessions
from kvx.trust import (
    Event,
    Identity,
    Inbox,
    Ledger,
    Memberships,
    PeerScores,
    ReplayGuard,
    Signer,
    Statement,
    curve_public_key,
    open_envelope,
    verify_envelope,
)

from ._clock import Clock
from ._config import NodeConfig
from ._index import AdId, AdIndex, Advert
from ._market import Market
from ._metrics import Metrics
from ._peers import Peer, PeerTable, State
from ._pricing import PricePolicy
from ._probing import IndirectProbes, Waiting
from ._rates import RateLimits
from ._store import Entry, LocalStore

log = logging.getLogger("kvx.node")

RECENT_S = 10.0
"""How long a relayable statement a node took counts as news it tells each prober of."""
RECENT_MAX = 64
PULL_EVERY_S = 1.0
"""The least time between two DIGESTs a node sends one peer for its `recent` news."""

LEDGER_RETRY_S = 10.0
"""After a failed ledger write (a full disk), the node quotes nothing for this long."""


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


Output = Send | Reply | Disconnect


def _seq_of(body: bytes) -> int | None:
    """The seq of a body that failed its checks, if it can be read at all (for `re`)."""
    with contextlib.suppress(Exception):
        seq = msgpack.unpackb(body, raw=False, max_ext_len=0).get("seq")
        if type(seq) is int and 0 <= seq < 2**64:
            return seq
    return None


class NodeCore:
    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        *,
        scores: PeerScores,
        ledger: Ledger,
        store: LocalStore,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        pricing: PricePolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.random = rng or random.Random()
        self.identity = identity
        self.id = identity.node_id
        self.signer = Signer(identity)
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
        self.index = AdIndex(config.index_budget)
        self.memberships = Memberships(self.id, self.policy)
        self.metrics = metrics or Metrics()
        self.pricing = pricing or PricePolicy()
        self.incarnation = self.clock.now_ms()
        self.sessions = Sessions()
        self.ctl = ""
        self.data: tuple[DataAddress, ...] = ()
        self.market: Market | None = None
        self._own: dict[bytes, Statement] = {}  # content root -> our ADVERTISE
        self._recent: deque[tuple[float, AdId, bytes | None]] = deque(maxlen=RECENT_MAX)
        self._pulled: dict[bytes, float] = {}  # peer -> when its news was last pulled
        self.probes = IndirectProbes()
        self._rates = RateLimits(config.rate_per_s, config.burst)
        self._curve_to_key: dict[bytes, bytes] = {}
        self._ledger_failed_at = float("-inf")
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
        }

    # ---- what the driver calls ---------------------------------------------------------

    def serve(self, ctl: str, data: tuple[DataAddress, ...]) -> None:
        """The driver listens at `ctl` and serves KV at `data`: sell, advertise, join."""
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
            clock=self.clock,
        )
        for entry in self.store.verify_all():  # never advertise what cannot be served
            self.event(
                "store_dropped",
                logging.WARNING,
                root=entry.root.hex()[:16],
                reason="failed its root",
            )
        for entry in self.store.entries():
            self._advertise(entry)
        for boot in self.config.bootstrap:
            self._send(boot.key, self._hello())
        now = self.clock.monotonic()
        self._due = {name: now + self._period(name) for name in self._rounds}

    def drain(self) -> list[Output]:
        """What to send and drop, in order, since the last call."""
        out, self._out = self._out, []
        return out

    def next_timer(self) -> float:
        """The monotonic time at which handle_timer has work to do."""
        return min(self._due.values())

    def handle_timer(self, now: float) -> None:
        """Run the rounds that are due; one that fails is logged and counted, not fatal."""
        for name, run in self._rounds.items():
            if self._due.get(name, float("inf")) > now:
                continue
            self._due[name] = now + self._period(name)
            try:
                run()
            except sqlite3.Error as exc:
                self._ledger_failed(exc)
            except Exception:
                self.internal_error(name)

    def _period(self, name: str) -> float:
        if name == "heartbeat":
            return self.config.heartbeat_s
        if name == "anti_entropy":  # jittered, so that rounds across the swarm spread out
            return self.config.anti_entropy_s * self.random.uniform(0.5, 1.5)
        return 1.0

    def advertisement(self, root: bytes) -> Statement:
        """This node's live ADVERTISE of the payload with this content root."""
        return self._own[root]

    def multipart_refused(self) -> None:
        """The driver dropped a ZeroMQ message of more than one frame (spec §4.2)."""
        self.metrics.rejections.labels(ErrorCode.MALFORMED.name).inc()

    def wants_connection(self, key: bytes) -> bool:
        """Whether a connection to `key` is still of use: a peer in the table, or one the
        table keeps (bootstrap, proven sellers). The driver drops the others."""
        return key in self.peers or self._keeps(key)

    def held(self) -> dict[str, int]:
        """What the core holds for its peers, each against a budget (spec §13.1)."""
        return {
            "replay_entries": len(self.inbox.guard),
            "replay_signers": self.inbox.guard.signers(),
            "replay_forgotten": self.inbox.guard.forgotten,
            "rate_buckets": len(self._rates),
            "curve_keys": len(self._curve_to_key),
            "sessions": len(self.memberships),
            "peers": len(self.peers.all()),
            "peers_evicted": self.peers.evicted,
            "ads": len(self.index),
            "ad_bytes": self.index.bytes,
            "ad_signers": self.index.signers(),
            **self.probes.held(),
        }

    # ---- outputs ---------------------------------------------------------------------

    def _send_frame(self, key: bytes, frame: bytes, mtype: MessageType) -> None:
        self._out.append(Send(key, frame, mtype))

    def _reply_frame(self, routing: bytes, frame: bytes, mtype: MessageType) -> None:
        self._out.append(Reply(routing, frame, mtype))

    def _disconnect(self, key: bytes) -> None:
        self._out.append(Disconnect(key))

    def event(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        """One structured log line (p2p/_logs.py writes it as JSON)."""
        log.log(level, {"node": self.id.hex()[:12], "event": name, **fields})

    def internal_error(self, where: str) -> None:
        """A fault of kvx itself while handling one frame or one timer round: it costs that
        frame or round, is logged with its traceback and counted, and the node goes on."""
        log.exception("internal error in %s", where)
        self.metrics.internal_errors.labels(where).inc()

    def _keeps(self, key: bytes) -> bool:
        """Peers the table never evicts for a newcomer: bootstrap peers and proven sellers."""
        return any(b.key == key for b in self.config.bootstrap) or (
            self.scores.score(node_id(key), self.clock.time()) > 0
        )

    def _allowed(self, ctl: str) -> bool:
        """Whether this node's policy lets it dial a (decoded, so well-formed) address."""
        try:
            self.policy.check_address(split_ctl(ctl)[0])
        except RemoteProtocolError:
            return False
        return True

    def _send(self, key: bytes, message: Message) -> None:
        frame = self.signer.seal(message, now_ms=self.clock.now_ms(), to=node_id(key))
        self._send_frame(key, frame, message.TYPE)

    def _push(
        self, frame: bytes, mtype: MessageType, exclude: set[bytes], ns: bytes | None
    ) -> None:
        """Gossip a relayable statement to `fanout` live peers that may see its namespace."""
        targets = [
            p.key for p in self.peers.alive() if p.key not in exclude and self._may_see(p.key, ns)
        ]
        for key in self.random.sample(targets, min(self.config.fanout, len(targets))):
            self._send_frame(key, frame, mtype)

    def _may_see(self, key: bytes, ns: bytes | None) -> bool:
        """Private advertisements go only to peers that proved the namespace (spec §7.6)."""
        return self.memberships.is_member(node_id(key), ns, self.clock.time())

    def _may_buy(self, peer: bytes, ns: bytes) -> bool:
        """A node id that proved `ns` and that the namespace's rules let buy."""
        try:
            self.policy.check_namespace(peer, ns, publish=False)
        except RemoteProtocolError:
            return False
        return self.memberships.is_member(peer, ns, self.clock.time())

    def _hello(self) -> Hello:
        return Hello(ctl=self.ctl, data=self.data, inc=self.incarnation, agent="kvx/0.2")

    def _took(self, st: Statement, ns: bytes | None) -> None:
        """A relayable statement was just indexed or applied: recent news, for PEERS."""
        self._recent.append((self.clock.monotonic(), (st.signer, st.header.seq), ns))

    def _recent_for(self, key: bytes) -> tuple[DigestEntry, ...]:
        """The recent news `key` may see, newest first (§8.3 `recent`)."""
        since = self.clock.monotonic() - RECENT_S
        return tuple(
            DigestEntry(key=signer, seq=seq)
            for at, (signer, seq), ns in reversed(self._recent)
            if at >= since and self._may_see(key, ns)
        )

    def _digest_for(self, key: bytes) -> Digest:
        """Our digest as `key` may see it: ids of a private namespace only for its members."""
        return Digest(have=self.index.digest(lambda ns: self._may_see(key, ns)))

    def receive(
        self, frame: bytes, curve: bytes, routing: bytes | None, server_key: bytes | None
    ) -> None:
        """One frame from a connection whose CURVE key is `curve`: on the ROUTER (answers
        go back by `routing`), or on this node's own connection to `server_key`."""
        self.metrics.bytes_in.inc(len(frame))
        if not self._rates.take(curve, self.clock.monotonic()):
            self.metrics.rejections.labels(ErrorCode.RATE_LIMITED.name).inc()
            key = self._curve_to_key.get(curve)
            if key is not None and self._rates.should_score(curve, self.clock.monotonic()):
                self.scores.record(node_id(key), Event.FLOOD, self.clock.time())
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
        if st.type not in RELAYABLE and self.peers.alive_again(st.signer, self.clock.monotonic()):
            # Only a statement the peer itself sent proves it lives (a relayed ad does not).
            self.event("peer_back", peer=signer_id.hex()[:12])
            self._disconnect(st.signer)
            self._send(st.signer, self._digest_for(st.signer))
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
        self.event("degraded", logging.ERROR, what="ledger", error=str(exc)[:200])

    def window_receipt(self, st: Statement) -> None:
        """A receipt a buyer paid mid-stream (§9.4), recorded as the stream goes on."""
        try:
            self.market.receipt(st, self.clock.now_ms())
        except RemoteProtocolError as exc:
            self.event(
                "receipt_refused", logging.WARNING, code=exc.code.name, detail=exc.detail[:120]
            )
        except sqlite3.Error as exc:
            self._ledger_failed(exc)

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
        self.event("rejected", code=exc.code.name, detail=exc.detail[:120])
        # Answer (spec §6.5) only a direct frame whose signer is this connection's peer:
        # anyone else is nobody we can address.
        if raw is not None and curve_public_key(raw.signer) == curve:
            self._send_error(routing, raw.type, raw.signer, _seq_of(raw.body), exc)

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

    def _on_hello(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        hello = st.message
        assert isinstance(hello, Hello)
        now = self.clock.monotonic()
        self.policy.check_address(split_ctl(hello.ctl)[0])
        if self.peers.heard_from(st.signer, hello.ctl, hello.inc, now):
            self._disconnect(st.signer)  # it may have restarted on a new address
            self.event("peer_joined", peer=st.signer_id.hex()[:12], ctl=hello.ctl)
            self._send(st.signer, self._digest_for(st.signer))
        if routing is not None:
            challenge = self.memberships.challenge(st.signer_id, self.clock.time())
            recent = self._recent_for(st.signer)
            self._reply(
                routing,
                st,
                Peers(
                    peers=self.peers.entries(),
                    re=st.header.seq,
                    challenge=challenge,
                    recent=recent or None,
                ),
            )

    def _on_peers(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        peers = st.message
        assert isinstance(peers, Peers)
        if st.signer not in self.peers:  # a bootstrap peer answering our first HELLO
            boot = next((b for b in self.config.bootstrap if b.key == st.signer), None)
            if boot is not None:
                self.peers.heard_from(st.signer, boot.ctl, 0, self.clock.monotonic())
        for candidate in self.peers.learn(list(peers.peers)):
            if self._allowed(candidate.ctl) and self.peers.add_candidate(
                candidate, self.clock.monotonic()
            ):
                self._send(candidate.key, self._hello())
        if peers.challenge is not None and self.policy.namespaces:
            self._send(st.signer, self.memberships.prove(st.signer_id, peers.challenge))
        if peers.recent and not all(self.index.holds((e.key, e.seq)) for e in peers.recent):
            # News this node missed: pull it now (§8.3) rather than at the next
            # anti-entropy round, which push gossip's misses would otherwise wait for;
            # at most once a second per peer, since a DIGEST may be 4,096 entries long
            # and a PEERS naming made-up news costs its sender a kilobyte.
            now = self.clock.monotonic()
            if now - self._pulled.get(st.signer, float("-inf")) >= PULL_EVERY_S:
                self._pulled[st.signer] = now
                self._send(st.signer, self._digest_for(st.signer))

    def _on_advertise(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        ad = st.message
        assert isinstance(ad, Advertise)
        if ad.ns is not None:
            if self.policy.namespace(ad.ns) is None:
                return  # a private namespace we are not in: nothing to do with it
            # Only a member may publish into it: the signer proved it to us, or the
            # member that relays it did (members relay only what their members sign).
            if not (self._may_see(st.signer, ad.ns) or (relayer and self._may_see(relayer, ad.ns))):
                return
        self.policy.check_namespace(st.signer_id, ad.ns, publish=True)
        for address in (split_ctl(ad.ctl)[0], *self._data_hosts(ad)):
            self.policy.check_address(address)
        if not self.index.add(st):
            return
        self.inbox.guard.remember(st.signer, st.header)
        self._took(st, ad.ns)
        self.event(
            "ad_received",
            signer=st.signer_id.hex()[:12],
            seq=st.header.seq,
            via=node_id(relayer).hex()[:12] if relayer else "",
        )
        self.metrics.ads.set(len(self.index))
        if st.signer not in self.peers:
            # The provider may be news to us; we will need to reach it to buy.
            self.peers.add_candidate(
                Peer(st.signer, ad.ctl, 0, State.SUSPECT, 0.0), self.clock.monotonic()
            )
        self._push(st.frame, MessageType.ADVERTISE, {relayer, st.signer}, ad.ns)

    @staticmethod
    def _data_hosts(ad: Advertise) -> list:
        return [split_host_port(d.addr)[0] for d in ad.data if d.t in ENDPOINT_TRANSPORTS]

    def _on_withdraw(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        new, ns = self.index.withdraw(st)
        if new:
            self.inbox.guard.remember(st.signer, st.header)
            self._took(st, ns)
            self.metrics.ads.set(len(self.index))
            self._push(st.frame, MessageType.WITHDRAW, {relayer, st.signer}, ns)

    def _on_digest(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        digest = st.message
        assert isinstance(digest, Digest)
        # Answer on the connection the DIGEST came on: the asker may not listen itself.
        for frame in self.index.missing_from(digest.have, lambda ns: self._may_see(st.signer, ns)):
            if routing is not None:
                self._reply_frame(routing, frame, MessageType.ADVERTISE)
            else:
                self._send_frame(st.signer, frame, MessageType.ADVERTISE)
        if self.index.lacks_any(digest.have):
            if routing is not None:
                self._reply(routing, st, self._digest_for(st.signer))
            else:
                self._send(st.signer, self._digest_for(st.signer))

    def _on_lookup(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        lookup = st.message
        assert isinstance(lookup, Lookup)
        if routing is None:
            return
        matched, ads = self.lookup(
            lookup.fp, lookup.ns, lookup.blocks, lookup.limit, asker=st.signer_id
        )
        frames, total = [], 0
        for advert in ads:  # stay well inside one frame
            if total + len(advert.frame) > MAX_FRAME_BYTES // 2:
                break
            frames.append(advert.frame)
            total += len(advert.frame)
        self._reply(
            routing,
            st,
            LookupResult(re=st.header.seq, matched=matched if frames else 0, ads=tuple(frames)),
        )

    def _on_membership(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        assert isinstance(st.message, Membership)
        self.memberships.accept(st.signer_id, st.message, self.clock.time())

    def _on_quote_request(self, st: Statement, routing: bytes | None, relayer: bytes):
        if routing is not None:
            frame = self.market.quote_request(st, self.clock.now_ms())
            self._reply_frame(routing, frame, MessageType.QUOTE)

    def _on_accept(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        self.market.accept(st, self.clock.now_ms())

    def _on_reject(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        frame = self.market.reject(st, self.clock.now_ms())
        if frame is not None and routing is not None:
            self._reply_frame(routing, frame, MessageType.QUOTE)

    def _on_receipt(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        self.market.receipt(st, self.clock.now_ms())
        self.event("sold", buyer=st.signer_id.hex()[:12], price=st.message.price)

    def _on_probe(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        """Probe a peer for someone whose own probes it does not answer (§8.17): only a
        peer of our table, at the address we know, so a stranger cannot aim us elsewhere."""
        assert isinstance(st.message, Probe)
        target = st.message.target
        peer = self.peers.get(target)
        if peer is None or not peer.proven or peer.state == State.DEAD or target == st.signer:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node knows no live peer so keyed")
        until = self.clock.monotonic() + self.config.suspect_after_s / 2
        if self.probes.help(Waiting(st.signer, routing, st.header.seq, until), target):
            self._send(target, self._hello())

    def _vouch(self, st: Statement) -> None:
        """A peer spoke: send its statement to whoever asked us to probe it."""
        for waiting in self.probes.vouch(st):
            ack = ProbeAck(re=waiting.seq, target=st.signer, proof=st.frame)
            frame = self.signer.seal(ack, now_ms=self.clock.now_ms(), to=node_id(waiting.asker))
            if waiting.routing is not None:
                self._reply_frame(waiting.routing, frame, MessageType.PROBE_ACK)
            else:
                self._send_frame(waiting.asker, frame, MessageType.PROBE_ACK)

    def _on_probe_ack(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        target = self.probes.take_ack(st)
        if target is not None and self.peers.vouched(target):
            self.event("peer_vouched", peer=node_id(target).hex()[:12], by=st.signer_id.hex()[:12])

    def _ask_help(self, target: bytes) -> None:
        """Our probe of `target` went unanswered for half the suspicion time: ask
        `indirect_probes` other live peers to probe it (SWIM's ping-req)."""
        now_ms = self.clock.now_ms()
        until = self.clock.monotonic() + self.config.dead_after_s
        helpers = [p.key for p in self.peers.alive() if p.key != target]
        for key in self.random.sample(helpers, min(self.config.indirect_probes, len(helpers))):
            frame = self.signer.seal(Probe(target=target), now_ms=now_ms, to=node_id(key))
            self.probes.asked(key, open_envelope(frame).header.seq, target, now_ms, until)
            self._send_frame(key, frame, MessageType.PROBE)

    def _on_error(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        assert isinstance(st.message, Error)
        self.event(
            "peer_error", peer=st.signer_id.hex()[:12], code=st.message.code, msg=st.message.msg
        )

    def lookup(
        self, fp: bytes, ns: bytes | None, chain: tuple[bytes, ...], limit: int, *, asker: bytes
    ) -> tuple[int, list[Advert]]:
        """Longest prefix held by a usable provider, best first: those that delivered
        to this node, then strangers, then those that failed it; the cheapest first in each.

        A peer that has not proved membership of a private namespace gets the answer of
        a namespace with nothing in it, whether or not this node is in it (§7.6).
        """
        if ns is not None:
            if asker == self.id:
                self.policy.check_namespace(asker, ns, publish=False)
            elif not self._may_buy(asker, ns):
                self.metrics.misses.inc()
                return 0, []
        now = self.clock.time()

        def usable(advert: Advert) -> bool:
            # A provider outside our table of 64 peers is no sign of trouble: in a swarm
            # of thousands nearly every provider is. Only a dead or banned one is skipped.
            peer = self.peers.get(advert.signer)
            return (peer is None or peer.state != State.DEAD) and not self.scores.is_banned(
                node_id(advert.signer), now
            )

        def rank(advert: Advert) -> tuple:
            # Standing before price: a provider that delivered to us comes first and one
            # that failed us last, since a price is the one thing a liar sets for free.
            score = self.scores.score(node_id(advert.signer), now)
            return (0 if score > 0 else 1 if score == 0 else 2, advert.message.price, -score)

        matched, ads = self.index.lookup(fp, ns, chain, limit, usable=usable, rank=rank)
        (self.metrics.hits if matched else self.metrics.misses).inc()
        return matched, ads

    def _advertise(self, entry: Entry) -> None:
        ad = Advertise(
            fp=entry.fp,
            layout=entry.layout,
            blocks=entry.blocks,
            root=entry.root,
            chunk=entry.chunk,
            price=self.pricing.ask(
                entry.params, entry.layout, len(entry.blocks) * entry.layout.block, entry.size
            ),
            ctl=self.ctl,
            data=self.data,
            ns=entry.ns,
        )
        frame = self.signer.seal(
            ad, now_ms=self.clock.now_ms(), ttl_ms=int(self.config.advert_ttl_s * 1000)
        )
        st = open_envelope(frame)
        self.index.add(st)
        self._took(st, entry.ns)
        self._own[entry.root] = st
        self.metrics.ads.set(len(self.index))
        self.event(
            "ad_published", root=entry.root.hex()[:16], seq=st.header.seq, blocks=len(entry.blocks)
        )
        self._push(frame, MessageType.ADVERTISE, set(), entry.ns)

    def withdraw(self, root: bytes) -> None:
        """Withdraw our advertisement of a payload (evicted, or on request)."""
        st = self._own.pop(root, None)
        if st is None:
            return
        frame = self.signer.seal(
            Withdraw(ad=st.header.seq),
            now_ms=self.clock.now_ms(),
            ttl_ms=int(self.config.advert_ttl_s * 1000),
        )
        withdrawal = open_envelope(frame)
        self.index.withdraw(withdrawal)
        self._took(withdrawal, st.message.ns)
        self.metrics.ads.set(len(self.index))
        self._push(frame, MessageType.WITHDRAW, set(), st.message.ns)

    def publish(
        self,
        *,
        fp: bytes,
        ns: bytes | None,
        layout: KVLayout,
        blocks: tuple[bytes, ...],
        payload: object,
        chunk: int,
        params: int = 0,
    ) -> Entry:
        if ns is not None and self.policy.namespace(ns) is None:
            raise RemoteProtocolError(ErrorCode.NOT_FOUND, "this node is not in that namespace")
        entry, evicted = self.store.put(
            fp=fp, ns=ns, layout=layout, blocks=blocks, payload=payload, chunk=chunk, params=params
        )
        for old in evicted:
            self.withdraw(old.root)
        self._advertise(entry)
        return entry

    def _heartbeat_round(self) -> None:
        now = self.clock.monotonic()
        suspect, dead = self.peers.tick(now)
        for peer in suspect:
            self.event("peer_suspect", logging.WARNING, peer=node_id(peer.key).hex()[:12])
        for peer in dead:
            self.event("peer_dead", logging.WARNING, peer=node_id(peer.key).hex()[:12])
            self.memberships.forget(node_id(peer.key))
            self._disconnect(peer.key)
        for peer in self.peers.to_probe(self.config.probes_per_heartbeat, now):
            self._send(peer.key, self._hello())
        for peer in self.peers.need_help(now):
            self._ask_help(peer.key)
        if not self.peers.alive():
            for boot in self.config.bootstrap:
                self._disconnect(boot.key)  # reconnect: it may have moved
                self._send(boot.key, self._hello())
        for state in State:
            self.metrics.peers.labels(state.name.lower()).set(
                sum(p.state == state for p in self.peers.all())
            )

    def _anti_entropy_round(self) -> None:
        alive = self.peers.alive()
        if alive:
            key = self.random.choice(alive).key
            self._send(key, self._digest_for(key))

    def _housekeeping_round(self) -> None:
        self._forget_strangers()
        self.index.expire(self.clock.now_ms())
        self.market.expire(self.clock.now_ms())
        self.metrics.degraded.labels("scores").set(int(self.scores.write_failed))
        self.metrics.degraded.labels("ledger").set(int(not self.selling()))
        self.metrics.ads.set(len(self.index))
        self.metrics.credits.set(sum(self.ledger.balances().values()))
        half = self.config.advert_ttl_s * 500
        for root, st in list(self._own.items()):
            if st.header.exp - self.clock.now_ms() < half:  # refresh before it expires
                entry = next((e for e in self.store.entries() if e.root == root), None)
                if entry is not None:
                    self._advertise(entry)

    def _forget_strangers(self) -> None:
        """Per-identity state lives only as long as its use: buckets refilled to the
        brim, CURVE keys, pull times and membership sessions of peers no longer in the
        table go."""
        now = self.clock.monotonic()
        self._rates.prune(now)
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
