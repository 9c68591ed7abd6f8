"""The node daemon: a thin asyncio adapter around the sans-I/O parts (peer table,
advertisement index, store, trust checks) and the ZeroMQ sockets.

One ROUTER (CURVE) receives everything peers send; one DEALER per peer carries what this
node sends and the answers to it. Each received frame passes the rate limit, the §6.4
checks, policy and bans, then goes to the handler for its type.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from kvx.protocol import (
    ENDPOINT_TRANSPORTS,
    MAX_FRAME_BYTES,
    RELAYABLE,
    Advertise,
    ConfigError,
    DataAddress,
    Digest,
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
    RawEnvelope,
    RemoteProtocolError,
    Withdraw,
    node_id,
    split_ctl,
    split_host_port,
)
from kvx.transport import Sessions, TcpDataServer
from kvx.trust import (
    AtRestCipher,
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
    make_curve_client,
    make_curve_server,
    open_envelope,
    peer_curve_key,
    start_authenticator,
    verify_envelope,
)

from ._admin import answer, pack, unpack
from ._config import ADMIN_SOCKET, INFO_FILE, LEDGER_FILE, SCORES_FILE, STORE_DIR, NodeConfig
from ._datadir import DataDirLock
from ._index import AdIndex, Advert
from ._logs import setup_logging
from ._market import Market
from ._peers import Peer, PeerTable, State
from ._pricing import PricePolicy
from ._rates import RateLimits
from ._store import Entry, LocalStore

log = logging.getLogger("kvx.node")

LEDGER_RETRY_S = 10.0
"""After a failed ledger write (a full disk), the node quotes nothing for this long."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _seq_of(body: bytes) -> int | None:
    """The seq of a body that failed its checks, if it can be read at all (for `re`)."""
    with contextlib.suppress(Exception):
        seq = msgpack.unpackb(body, raw=False, max_ext_len=0).get("seq")
        if type(seq) is int and 0 <= seq < 2**64:
            return seq
    return None


class Node:
    def __init__(self, config: NodeConfig, *, pricing: PricePolicy | None = None):
        from ._metrics import Metrics

        self.config = config
        data = config.data_dir
        _check_listen(config)
        self._lock = DataDirLock(data).acquire()  # before anything in the dir is touched
        if not config.key_file.exists():
            Identity.generate().save(config.key_file)
        self.identity = Identity.load(config.key_file)
        self.id = self.identity.node_id
        self.signer = Signer(self.identity)
        self.inbox = Inbox(
            self.id,
            ReplayGuard(max_per_signer=config.replay_per_signer, max_total=config.replay_total),
        )
        self.policy = config.policy
        self.scores = PeerScores(data / SCORES_FILE, self.policy.scores)
        self.ledger = Ledger(data / LEDGER_FILE, self.id)
        cipher = (
            AtRestCipher.from_key_file(data / "atrest.key") if self.policy.encrypt_at_rest else None
        )
        self.store = LocalStore(
            data / STORE_DIR,
            memory_bytes=config.memory_bytes,
            disk_bytes=config.disk_bytes,
            cipher=cipher,
        )
        self.peers = PeerTable(
            self.identity.public_key,
            suspect_after_s=config.suspect_after_s,
            dead_after_s=config.dead_after_s,
            max_peers=config.max_peers,
            keep=self._keeps,
        )
        self.index = AdIndex(config.index_budget)
        self.memberships = Memberships(self.id, self.policy)
        self.metrics = Metrics()
        self.pricing = pricing if pricing is not None else PricePolicy()
        self.incarnation = now_ms()
        self.sessions = Sessions()
        self.ctl = ""
        self.data: tuple[DataAddress, ...] = ()
        self._own: dict[bytes, Statement] = {}  # content root -> our ADVERTISE
        self._dealers: dict[bytes, zmq.asyncio.Socket] = {}
        self._dealer_ctl: dict[str, bytes] = {}  # address -> the key its dealer speaks to
        self._readers: dict[bytes, asyncio.Future[None]] = {}
        self._rates = RateLimits(config.rate_per_s, config.burst)
        self._curve_to_key: dict[bytes, bytes] = {}
        self._ledger_failed_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._crash: BaseException | None = None
        self._served = False
        self._handlers: dict[
            MessageType, Callable[[Statement, bytes | None, bytes], Awaitable[None]]
        ] = {
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
        }

    # ---- lifecycle -------------------------------------------------------------------

    def event(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        """One structured log line (p2p/_logs.py writes it as JSON)."""
        log.log(level, {"node": self.id.hex()[:12], "event": name, **fields})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        self._ctx = zmq.asyncio.Context()
        self._auth = start_authenticator(self._ctx)
        try:
            await self._start()
            await self._stop.wait()
        finally:
            await self._shutdown()
        if self._crash is not None:  # a broken loop of kvx's own: exit non-zero
            raise self._crash

    def stop(self) -> None:
        self._stop.set()

    async def _start(self) -> None:
        cfg = self.config
        (cfg.data_dir / INFO_FILE).unlink(missing_ok=True)
        self.router = self._ctx.socket(zmq.ROUTER)
        make_curve_server(self.router, self.identity)
        self.router.maxmsgsize = MAX_FRAME_BYTES
        self.router.linger = 0
        _bind(
            self.router, cfg.listen.replace(":0", ":*") if cfg.listen.endswith(":0") else cfg.listen
        )
        self.ctl = self.router.last_endpoint.decode()
        self.admin = self._ctx.socket(zmq.ROUTER)
        self.admin.linger = 0
        _bind(self.admin, cfg.admin_address)
        loop = asyncio.get_running_loop()
        self.tcp = TcpDataServer(
            self.sessions,
            self.inbox,
            self.signer,
            on_delivered=lambda o: self.market.delivered(o),
            on_receipt=lambda st: loop.call_soon_threadsafe(self._window_receipt, st),
            limits=cfg.data_limits,
        )
        try:
            await self.tcp.start(cfg.data_host)
        except OSError as exc:
            raise ConfigError(f"cannot serve data on {cfg.data_host}: {exc.strerror}") from None
        self.data = (DataAddress(t="tcp", addr=self.tcp.address),)
        if cfg.ucx:
            from kvx.transport._ucx import UcxDataServer  # the optional 'ucx' extra

            self.ucx = UcxDataServer(
                self.sessions,
                self.inbox,
                self.signer,
                on_delivered=lambda o: self.market.delivered(o),
                on_receipt=self._window_receipt,
            )
            await self.ucx.start(cfg.data_host)
            self.data = (DataAddress(t="ucx", addr=self.ucx.address), *self.data)
        self.market = Market(
            signer=self.signer,
            store=self.store,
            ledger=self.ledger,
            sessions=self.sessions,
            policy=self.policy,
            memberships=self.memberships,
            pricing=self.pricing,
            data={d.t: d.addr for d in self.data},
            window_bytes=cfg.payment_window_bytes,
            selling=self.selling,
        )
        for what in self.held():  # read when scraped, never stale
            self.metrics.held.labels(what).set_function(lambda what=what: self.held()[what])
        metrics_url = None
        if cfg.metrics_port is not None:
            try:
                port = self.metrics.serve(cfg.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on 127.0.0.1:{cfg.metrics_port}: {exc.strerror}"
                ) from None
            metrics_url = f"http://127.0.0.1:{port}/metrics"
        for coro in (
            self._receive(self.router, None),
            self._admin_loop(),
            self._every("heartbeat", lambda: cfg.heartbeat_s, self._heartbeat_round),
            self._every(
                "anti_entropy",
                lambda: cfg.anti_entropy_s * random.uniform(0.5, 1.5),
                self._anti_entropy_round,
            ),
            self._every("housekeeping", lambda: 1.0, self._housekeeping_round),
        ):
            self._spawn(coro)
        for entry in self.store.verify_all():  # never advertise what cannot be served
            self.event(
                "store_dropped",
                logging.WARNING,
                root=entry.root.hex()[:16],
                reason="failed its root",
            )
        for entry in self.store.entries():
            await self._advertise(entry)
        for boot in cfg.bootstrap:
            await self._send(boot.key, self._hello())
        info = {
            "node_id": self.id.hex(),
            "public_key": self.identity.public_key.hex(),
            "ctl": self.ctl,
            "data": [{"t": d.t, "addr": d.addr} for d in self.data],
            "admin": cfg.admin_address,
            "metrics": metrics_url,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
        }
        tmp = cfg.data_dir / (INFO_FILE + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(cfg.data_dir / INFO_FILE)
        self.event("ready", ctl=self.ctl, data=self.tcp.address, peers=len(cfg.bootstrap))
        self._served = True

    async def _shutdown(self) -> None:
        (self.config.data_dir / INFO_FILE).unlink(missing_ok=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if hasattr(self, "tcp"):
            await self.tcp.close()
        if hasattr(self, "ucx"):
            await self.ucx.close()
        for sock in [
            *self._dealers.values(),
            getattr(self, "router", None),
            getattr(self, "admin", None),
        ]:
            if sock is not None:
                sock.close(linger=0)
        self._auth.stop()
        self._ctx.term()
        (self.config.data_dir / ADMIN_SOCKET).unlink(missing_ok=True)
        self.store.close()
        self.ledger.close()
        self.scores.close()
        self._lock.release()
        if self._served:  # a node that never started did not stop either: its error says why
            self.event("stopped")

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._crashed)
        return task

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.event("task_failed", logging.ERROR, error=repr(task.exception()))
            self._crash = self._crash or task.exception()
            self._stop.set()  # a broken loop must not leave a half-working node

    def _internal_error(self, where: str) -> None:
        """A fault of kvx itself while handling one frame or one timer round: it costs that
        frame or round, is logged with its traceback and counted, and the node goes on."""
        log.exception("internal error in %s", where)
        self.metrics.internal_errors.labels(where).inc()

    def _keeps(self, key: bytes) -> bool:
        """Peers the table never evicts for a newcomer: bootstrap peers and proven sellers."""
        return any(b.key == key for b in self.config.bootstrap) or (
            self.scores.score(node_id(key), time.time()) > 0
        )

    def _allowed(self, ctl: str) -> bool:
        """Whether this node's policy lets it dial a (decoded, so well-formed) address."""
        try:
            self.policy.check_address(split_ctl(ctl)[0])
        except RemoteProtocolError:
            return False
        return True

    # ---- sending ---------------------------------------------------------------------

    def _dealer(self, key: bytes) -> zmq.asyncio.Socket | None:
        """The connection to a peer, made on first use.

        One connection per address: a second key claiming an address that another key's
        connection uses gets none until it has spoken for itself, so a listing of many
        keys at one victim's address costs the victim one connection, retried with
        backoff, not one per key (spec §12.6).
        """
        sock = self._dealers.get(key)
        if sock is None:
            peer = self.peers.get(key)
            ctl = (
                peer.ctl
                if peer
                else next((b.ctl for b in self.config.bootstrap if b.key == key), None)
            )
            if ctl is None:
                return None
            other = self._dealer_ctl.get(ctl)
            if other is not None and other != key:
                if peer is None or not peer.proven:
                    return None
                self._drop_dealer(other)
            sock = self._ctx.socket(zmq.DEALER)
            make_curve_client(sock, self.identity, key)
            sock.maxmsgsize = MAX_FRAME_BYTES
            sock.linger = 0
            sock.sndhwm = 1000
            sock.reconnect_ivl = int(self.config.reconnect_s * 1000)
            sock.reconnect_ivl_max = int(self.config.reconnect_max_s * 1000)
            try:
                sock.connect(ctl)
            except zmq.ZMQError as exc:  # decoded addresses connect; config ones may not
                sock.close(linger=0)
                self.event(
                    "connect_failed", logging.WARNING, peer=node_id(key).hex()[:12], error=str(exc)
                )
                return None
            self._dealers[key] = sock
            self._dealer_ctl[ctl] = key
            self._readers[key] = self._spawn(self._receive(sock, key))
        return sock

    def _drop_dealer(self, key: bytes) -> None:
        for ctl in [c for c, k in self._dealer_ctl.items() if k == key]:
            del self._dealer_ctl[ctl]
        sock = self._dealers.pop(key, None)
        reader = self._readers.pop(key, None)
        if reader is not None:
            reader.cancel()  # before the socket goes, or its pending recv fails the node
        if sock is not None:
            sock.close(linger=0)

    async def _send(self, key: bytes, message: Message) -> None:
        frame = self.signer.seal(message, now_ms=now_ms(), to=node_id(key))
        await self._send_frame(key, frame, message.TYPE)

    async def _send_frame(self, key: bytes, frame: bytes, mtype: MessageType) -> None:
        sock = self._dealer(key)
        if sock is None:
            return
        with contextlib.suppress(zmq.Again):
            await sock.send(frame, flags=zmq.NOBLOCK)
            self.metrics.sent.labels(mtype.name).inc()
            self.metrics.bytes_out.inc(len(frame))

    async def _push(
        self, frame: bytes, mtype: MessageType, exclude: set[bytes], ns: bytes | None
    ) -> None:
        """Gossip a relayable statement to `fanout` live peers that may see its namespace."""
        targets = [
            p.key for p in self.peers.alive() if p.key not in exclude and self._may_see(p.key, ns)
        ]
        for key in random.sample(targets, min(self.config.fanout, len(targets))):
            await self._send_frame(key, frame, mtype)

    def _may_see(self, key: bytes, ns: bytes | None) -> bool:
        """Private advertisements go only to peers that proved the namespace (spec §7.6)."""
        return self.memberships.is_member(node_id(key), ns, time.time())

    def _may_buy(self, peer: bytes, ns: bytes) -> bool:
        """A node id that proved `ns` and that the namespace's rules let buy."""
        try:
            self.policy.check_namespace(peer, ns, publish=False)
        except RemoteProtocolError:
            return False
        return self.memberships.is_member(peer, ns, time.time())

    def _hello(self) -> Hello:
        return Hello(ctl=self.ctl, data=self.data, inc=self.incarnation, agent="kvx/0.2")

    def _digest_for(self, key: bytes) -> Digest:
        """Our digest as `key` may see it: ids of a private namespace only for its members."""
        return Digest(have=self.index.digest(lambda ns: self._may_see(key, ns)))

    # ---- receiving -------------------------------------------------------------------

    async def _receive(self, sock: zmq.asyncio.Socket, server_key: bytes | None) -> None:
        """Read one socket forever: the ROUTER (server_key None) or a DEALER to a peer.

        Parts are read one at a time and those past the expected count dropped as they
        come, so a many-part message never sits in a list here (spec §4.2).
        """
        expected_curve = None if server_key is None else curve_public_key(server_key)
        wanted = 2 if server_key is None else 1  # the ROUTER prepends the routing id
        while not sock.closed:  # a dropped dealer's reader ends here, even from within
            try:
                parts = [await sock.recv(copy=False)]
                while sock.rcvmore:
                    part = await sock.recv(copy=False)
                    if len(parts) <= wanted:
                        parts.append(part)
            except zmq.ZMQError:
                if sock.closed:
                    return
                raise
            if len(parts) != wanted:
                self.metrics.rejections.labels(ErrorCode.MALFORMED.name).inc()
                continue
            if server_key is None:
                routing, frame = parts[0].bytes, parts[1]
                curve = peer_curve_key(frame)
            else:
                routing, frame, curve = None, parts[0], expected_curve
            try:
                await self._on_frame(frame.bytes, curve, routing, server_key)
            except Exception:
                self._internal_error("receive")

    async def _on_frame(
        self, frame: bytes, curve: bytes, routing: bytes | None, server_key: bytes | None
    ) -> None:
        self.metrics.bytes_in.inc(len(frame))
        if not self._rates.take(curve, time.monotonic()):
            self.metrics.rejections.labels(ErrorCode.RATE_LIMITED.name).inc()
            key = self._curve_to_key.get(curve)
            if key is not None and self._rates.should_score(curve, time.monotonic()):
                self.scores.record(node_id(key), Event.FLOOD, time.time())
            return
        try:
            st = self.inbox.receive(frame, now_ms=now_ms(), peer_curve_key=curve)
        except RemoteProtocolError as exc:
            await self._rejected(frame, curve, routing, exc)
            return
        signer_id = st.signer_id
        if st.type not in RELAYABLE:
            self._curve_to_key[curve] = st.signer
        if self.scores.is_banned(signer_id, time.time()):
            self.metrics.rejections.labels(ErrorCode.DENIED.name).inc()
            return
        try:
            self.policy.check_peer(signer_id)
        except RemoteProtocolError as exc:
            self.metrics.rejections.labels(exc.code.name).inc()
            await self._answer_error(st, routing, exc)
            return
        self.metrics.received.labels(st.type.name).inc()
        if st.type not in RELAYABLE and self.peers.alive_again(st.signer, time.monotonic()):
            # Only a statement the peer itself sent proves it lives (a relayed ad does not).
            self.event("peer_back", peer=signer_id.hex()[:12])
            self._drop_dealer(st.signer)
            await self._send(st.signer, self._digest_for(st.signer))
        relayer = server_key if server_key is not None else self._curve_to_key.get(curve, b"")
        handler = self._handlers.get(st.type)
        try:
            if handler is None:
                raise RemoteProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"this node does not serve {st.type.name}"
                )
            await handler(st, routing, relayer)
        except RemoteProtocolError as exc:
            self.metrics.rejections.labels(exc.code.name).inc()
            await self._answer_error(st, routing, exc)
        except sqlite3.Error as exc:  # the disk (full, failing): degrade, do not stop
            self._ledger_failed(exc)
            unavailable = RemoteProtocolError(ErrorCode.UNAVAILABLE, "this node cannot write now")
            await self._answer_error(st, routing, unavailable)
        except Exception:
            self._internal_error(st.type.name)
            await self._answer_error(
                st, routing, RemoteProtocolError(ErrorCode.INTERNAL, "the node failed")
            )

    def _ledger_failed(self, exc: sqlite3.Error) -> None:
        """Selling needs the ledger: for a while the node quotes nothing, and says why."""
        self._ledger_failed_at = time.monotonic()
        self.metrics.degraded.labels("ledger").set(1)
        self.event("degraded", logging.ERROR, what="ledger", error=str(exc)[:200])

    def _window_receipt(self, st: Statement) -> None:
        """A receipt a buyer paid mid-stream (§9.4), recorded as the stream goes on."""
        try:
            self.market.receipt(st, now_ms())
        except RemoteProtocolError as exc:
            self.event(
                "receipt_refused", logging.WARNING, code=exc.code.name, detail=exc.detail[:120]
            )
        except sqlite3.Error as exc:
            self._ledger_failed(exc)

    async def _rejected(
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
            self.scores.record(node_id(key), event, time.time())
        self.event("rejected", code=exc.code.name, detail=exc.detail[:120])
        # Answer (spec §6.5) only a direct frame whose signer is this connection's peer:
        # anyone else is nobody we can address.
        if raw is not None and curve_public_key(raw.signer) == curve:
            await self._send_error(routing, raw.type, raw.signer, _seq_of(raw.body), exc)

    async def _answer_error(
        self, st: Statement, routing: bytes | None, exc: RemoteProtocolError
    ) -> None:
        await self._send_error(routing, st.type, st.signer, st.header.seq, exc)

    async def _send_error(
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
        reply = self.signer.seal_error(exc, re=re, to=node_id(signer), now_ms=now_ms())
        await self._reply_frame(routing, reply, MessageType.ERROR)

    async def _reply(self, routing: bytes, st: Statement, message: Message) -> None:
        frame = self.signer.seal(message, now_ms=now_ms(), to=st.signer_id)
        await self._reply_frame(routing, frame, message.TYPE)

    async def _reply_frame(self, routing: bytes, frame: bytes, mtype: MessageType) -> None:
        await self.router.send_multipart([routing, frame])
        self.metrics.sent.labels(mtype.name).inc()
        self.metrics.bytes_out.inc(len(frame))

    # ---- handlers --------------------------------------------------------------------

    async def _on_hello(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        hello = st.message
        assert isinstance(hello, Hello)
        now = time.monotonic()
        self.policy.check_address(split_ctl(hello.ctl)[0])
        if self.peers.heard_from(st.signer, hello.ctl, hello.inc, now):
            self._drop_dealer(st.signer)  # it may have restarted on a new address
            self.event("peer_joined", peer=st.signer_id.hex()[:12], ctl=hello.ctl)
            await self._send(st.signer, self._digest_for(st.signer))
        if routing is not None:
            challenge = self.memberships.challenge(st.signer_id, time.time())
            await self._reply(
                routing,
                st,
                Peers(peers=self.peers.entries(), re=st.header.seq, challenge=challenge),
            )

    async def _on_peers(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        peers = st.message
        assert isinstance(peers, Peers)
        if st.signer not in self.peers:  # a bootstrap peer answering our first HELLO
            boot = next((b for b in self.config.bootstrap if b.key == st.signer), None)
            if boot is not None:
                self.peers.heard_from(st.signer, boot.ctl, 0, time.monotonic())
        for candidate in self.peers.learn(list(peers.peers)):
            if self._allowed(candidate.ctl) and self.peers.add_candidate(
                candidate, time.monotonic()
            ):
                await self._send(candidate.key, self._hello())
        if peers.challenge is not None and self.policy.namespaces:
            await self._send(st.signer, self.memberships.prove(st.signer_id, peers.challenge))

    async def _on_advertise(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
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
                Peer(st.signer, ad.ctl, 0, State.SUSPECT, 0.0), time.monotonic()
            )
        await self._push(st.frame, MessageType.ADVERTISE, {relayer, st.signer}, ad.ns)

    @staticmethod
    def _data_hosts(ad: Advertise) -> list:
        return [split_host_port(d.addr)[0] for d in ad.data if d.t in ENDPOINT_TRANSPORTS]

    async def _on_withdraw(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        new, ns = self.index.withdraw(st)
        if new:
            self.inbox.guard.remember(st.signer, st.header)
            self.metrics.ads.set(len(self.index))
            await self._push(st.frame, MessageType.WITHDRAW, {relayer, st.signer}, ns)

    async def _on_digest(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        digest = st.message
        assert isinstance(digest, Digest)
        # Answer on the connection the DIGEST came on: the asker may not listen itself.
        for frame in self.index.missing_from(digest.have, lambda ns: self._may_see(st.signer, ns)):
            if routing is not None:
                await self._reply_frame(routing, frame, MessageType.ADVERTISE)
            else:
                await self._send_frame(st.signer, frame, MessageType.ADVERTISE)
        if self.index.lacks_any(digest.have):
            if routing is not None:
                await self._reply(routing, st, self._digest_for(st.signer))
            else:
                await self._send(st.signer, self._digest_for(st.signer))

    async def _on_lookup(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
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
        await self._reply(
            routing,
            st,
            LookupResult(re=st.header.seq, matched=matched if frames else 0, ads=tuple(frames)),
        )

    async def _on_membership(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        assert isinstance(st.message, Membership)
        self.memberships.accept(st.signer_id, st.message, time.time())

    async def _on_quote_request(self, st: Statement, routing: bytes | None, relayer: bytes):
        if routing is not None:
            frame = self.market.quote_request(st, now_ms())
            await self._reply_frame(routing, frame, MessageType.QUOTE)

    async def _on_accept(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        self.market.accept(st, now_ms())

    async def _on_reject(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        frame = self.market.reject(st, now_ms())
        if frame is not None and routing is not None:
            await self._reply_frame(routing, frame, MessageType.QUOTE)

    async def _on_receipt(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        self.market.receipt(st, now_ms())
        self.event("sold", buyer=st.signer_id.hex()[:12], price=st.message.price)

    async def _on_error(self, st: Statement, routing: bytes | None, relayer: bytes) -> None:
        assert isinstance(st.message, Error)
        self.event(
            "peer_error", peer=st.signer_id.hex()[:12], code=st.message.code, msg=st.message.msg
        )

    # ---- the index, the store and our own advertisements -----------------------------

    def lookup(
        self, fp: bytes, ns: bytes | None, chain: tuple[bytes, ...], limit: int, *, asker: bytes
    ) -> tuple[int, list[Advert]]:
        """Longest prefix held by a usable provider, best first (price, then score).

        A peer that has not proved membership of a private namespace gets the answer of
        a namespace with nothing in it, whether or not this node is in it (§7.6).
        """
        if ns is not None:
            if asker == self.id:
                self.policy.check_namespace(asker, ns, publish=False)
            elif not self._may_buy(asker, ns):
                self.metrics.misses.inc()
                return 0, []
        now = time.time()

        def usable(advert: Advert) -> bool:
            if advert.signer == self.identity.public_key:
                return True
            peer = self.peers.get(advert.signer)
            signer_id = node_id(advert.signer)
            return (
                peer is not None
                and peer.state != State.DEAD
                and not self.scores.is_banned(signer_id, now)
            )

        def rank(advert: Advert) -> tuple:
            return (advert.message.price, -self.scores.score(node_id(advert.signer), now))

        matched, ads = self.index.lookup(fp, ns, chain, limit, usable=usable, rank=rank)
        (self.metrics.hits if matched else self.metrics.misses).inc()
        return matched, ads

    async def _advertise(self, entry: Entry) -> None:
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
        frame = self.signer.seal(ad, now_ms=now_ms(), ttl_ms=int(self.config.advert_ttl_s * 1000))
        st = open_envelope(frame)
        self.index.add(st)
        self._own[entry.root] = st
        self.metrics.ads.set(len(self.index))
        self.event(
            "ad_published", root=entry.root.hex()[:16], seq=st.header.seq, blocks=len(entry.blocks)
        )
        await self._push(frame, MessageType.ADVERTISE, set(), entry.ns)

    async def withdraw(self, root: bytes) -> None:
        """Withdraw our advertisement of a payload (evicted, or on request)."""
        st = self._own.pop(root, None)
        if st is None:
            return
        frame = self.signer.seal(
            Withdraw(ad=st.header.seq), now_ms=now_ms(), ttl_ms=int(self.config.advert_ttl_s * 1000)
        )
        self.index.withdraw(open_envelope(frame))
        self.metrics.ads.set(len(self.index))
        await self._push(frame, MessageType.WITHDRAW, set(), st.message.ns)

    async def publish(
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
            await self.withdraw(old.root)
        await self._advertise(entry)
        return entry

    # ---- periodic work ---------------------------------------------------------------

    async def _every(self, name: str, seconds: Callable[[], float], round_: Callable) -> None:
        """Run a timer's rounds forever; a round that fails is logged, not fatal."""
        while True:
            await asyncio.sleep(seconds())
            try:
                await round_()
            except sqlite3.Error as exc:
                self._ledger_failed(exc)
            except Exception:
                self._internal_error(name)

    async def _heartbeat_round(self) -> None:
        now = time.monotonic()
        suspect, dead = self.peers.tick(now)
        for peer in suspect:
            self.event("peer_suspect", logging.WARNING, peer=node_id(peer.key).hex()[:12])
        for peer in dead:
            self.event("peer_dead", logging.WARNING, peer=node_id(peer.key).hex()[:12])
            self.memberships.forget(node_id(peer.key))
            self._drop_dealer(peer.key)
        for key in [k for k in self._dealers if k not in self.peers and not self._keeps(k)]:
            self._drop_dealer(key)  # forgotten or evicted: its connection goes too
        for peer in self.peers.to_probe(self.config.probes_per_heartbeat, now):
            await self._send(peer.key, self._hello())
        if not self.peers.alive():
            for boot in self.config.bootstrap:
                self._drop_dealer(boot.key)  # reconnect: it may have moved
                await self._send(boot.key, self._hello())
        for state in State:
            self.metrics.peers.labels(state.name.lower()).set(
                sum(p.state == state for p in self.peers.all())
            )

    async def _anti_entropy_round(self) -> None:
        alive = self.peers.alive()
        if alive:
            key = random.choice(alive).key
            await self._send(key, self._digest_for(key))

    async def _housekeeping_round(self) -> None:
        self._forget_strangers()
        self.index.expire(now_ms())
        self.market.expire(now_ms())
        self.metrics.degraded.labels("scores").set(int(self.scores.write_failed))
        self.metrics.degraded.labels("ledger").set(int(not self.selling()))
        self.metrics.ads.set(len(self.index))
        self.metrics.credits.set(sum(self.ledger.balances().values()))
        half = self.config.advert_ttl_s * 500
        for root, st in list(self._own.items()):
            if st.header.exp - now_ms() < half:  # refresh before it expires
                entry = next((e for e in self.store.entries() if e.root == root), None)
                if entry is not None:
                    await self._advertise(entry)

    def _forget_strangers(self) -> None:
        """Per-identity state lives only as long as its use: buckets refilled to the
        brim, CURVE keys and membership sessions of peers no longer in the table go."""
        now = time.monotonic()
        self._rates.prune(now)
        known = {p.key for p in self.peers.all()} | {b.key for b in self.config.bootstrap}
        for curve in [c for c, k in self._curve_to_key.items() if k not in known]:
            del self._curve_to_key[curve]
        kept_ids = {node_id(k) for k in known}
        self.memberships.prune(lambda peer: peer in kept_ids, time.time())

    def held(self) -> dict[str, int]:
        """What the node holds for its peers, each against a budget (spec §13.1)."""
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
            "data_connections": self.tcp.connections,
            "data_accept_errors": self.tcp.accept_errors,
            "dealers": len(self._dealers),
        }

    def selling(self) -> bool:
        """Whether the ledger can record deals: not within a while of a failed write."""
        return time.monotonic() - self._ledger_failed_at > LEDGER_RETRY_S

    # ---- local admin API -------------------------------------------------------------

    async def _admin_loop(self) -> None:
        while True:
            parts = await self.admin.recv_multipart()
            if len(parts) != 3 or parts[1] != b"":
                continue  # not a REQ request: nobody to answer
            routing, _, request = parts
            try:
                req = unpack(request)
                if not isinstance(req, dict):
                    raise RemoteProtocolError(ErrorCode.MALFORMED, "a request is a map")
                reply = {"ok": True, **await answer(self, req)}
            except RemoteProtocolError as exc:
                reply = {"ok": False, "code": int(exc.code), "error": exc.detail}
            except Exception as exc:  # a bad local request must not stop the node
                reply = {"ok": False, "code": int(ErrorCode.INTERNAL), "error": repr(exc)}
            await self.admin.send_multipart([routing, b"", pack(reply)])


def _bind(sock: zmq.Socket, address: str) -> None:
    """Bind, or say in one line why not (a port in use is a user's mistake, not a crash)."""
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot listen on {address}: {zmq.strerror(exc.errno)}") from None


def _check_listen(config: NodeConfig) -> None:
    """Peers must be able to dial what a node advertises: no wildcard addresses."""
    listen = (
        config.listen.removesuffix(":0") + ":1" if config.listen.endswith(":0") else config.listen
    )
    host = f"[{config.data_host}]" if ":" in config.data_host else config.data_host
    try:
        split_ctl(listen)  # port 0 (any free port) is the node's own choice to make
        split_host_port(f"{host}:1")
    except RemoteProtocolError as exc:
        raise ConfigError(
            f"listen on an address peers can dial (tcp://IP:PORT, data_host an IP): {exc.detail}"
        ) from None


def run_node(config: NodeConfig, log_level: str = "info") -> None:
    """Run a node in the foreground until SIGTERM or SIGINT."""
    setup_logging(log_level)
    asyncio.run(Node(config).run())
