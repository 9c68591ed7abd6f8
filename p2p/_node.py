"""The node daemon: the asyncio and ZeroMQ driver around the sans-I/O core (p2p/_core.py).

It owns what the core must not: sockets, tasks, signals, files in the data dir. One
ROUTER (CURVE) receives everything peers send; one DEALER per peer carries what this
node sends and the answers to it. Every frame goes to `NodeCore.receive`, every timer
to `NodeCore.handle_timer`, and what the core drains is carried out here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import random
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from kvx.protocol import (
    MAX_FRAME_BYTES,
    ConfigError,
    DataAddress,
    ErrorCode,
    IntegrityError,
    RemoteProtocolError,
)
from kvx.transport import Offer, TcpDataServer
from kvx.trust import (
    AtRestCipher,
    Bound,
    Evidence,
    Identity,
    Ledger,
    PeerScores,
    Statement,
    bind,
    curve_public_key,
    make_curve_client,
    make_curve_server,
    peer_curve_key,
    start_authenticator,
)

from ._admin import answer, pack, unpack
from ._clock import Now
from ._config import ADMIN_SOCKET, INFO_FILE, LEDGER_FILE, SCORES_FILE, STORE_DIR, NodeConfig
from ._core import NodeCore
from ._datadir import DataDirLock
from ._dials import Connect
from ._events import Happening, Ready, Stopped, TaskFailed
from ._fraud import Judge
from ._market import Authorize
from ._metrics import Metrics
from ._outbox import Disconnect, Reply, Send
from ._pricing import PricePolicy
from ._rates import RateLimits
from ._reach import advertised, check_reach
from ._store import LocalStore

LEAVE_LINGER_MS = 1000
"""How long a leaving node's connections keep trying to deliver its LEAVEs at exit."""

Judgement = Callable[[Bound], object | None]
"""A holder of one fingerprint's weights: judges bound evidence, returning what refutes
the seller (kvx.integrations.verify.judge) or None when the weights compute its bytes."""

log = logging.getLogger("kvx.node")


class Node:
    def __init__(
        self,
        config: NodeConfig,
        *,
        pricing: PricePolicy | None = None,
        judges: Mapping[bytes, Judgement] | None = None,
    ):
        self.config = config
        self.judges = dict(judges or {})
        data = config.data_dir
        check_reach(config)
        self._lock = DataDirLock(data).acquire()  # before anything in the dir is touched
        if not config.key_file.exists():
            Identity.generate().save(config.key_file)
        identity = Identity.load(config.key_file)
        policy = config.policy
        cipher = AtRestCipher.from_key_file(data / "atrest.key") if policy.encrypt_at_rest else None
        self.core = NodeCore(
            config,
            identity,
            scores=PeerScores(data / SCORES_FILE, policy.scores),
            ledger=Ledger(data / LEDGER_FILE, identity.node_id),
            store=LocalStore(
                data / STORE_DIR,
                memory_bytes=config.memory_bytes,
                disk_bytes=config.disk_bytes,
                cipher=cipher,
            ),
            now=now(),
            rng=random.Random(),
            tokens=secrets.token_bytes,
            pricing=pricing,
            judges=frozenset(self.judges),
        )
        self.identity = identity
        self.id = identity.node_id
        self.metrics = Metrics()
        self._dealers: dict[bytes, zmq.asyncio.Socket] = {}
        self._readers: dict[bytes, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._crash: BaseException | None = None
        self._served = False
        self._told: set[bytes] = set()  # peers sent LEAVE (§8.22)

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        self._ctx = zmq.asyncio.Context()
        rate = self.config.handshakes_per_s
        self._handshakes = RateLimits(rate, 4 * rate)  # per source address
        self._auth = start_authenticator(self._ctx, self._admit)
        try:
            await self._start()
            await self._stop.wait()
            if self._crash is None:
                await self._leave()
        finally:
            await self._shutdown()
        if self._crash is not None:  # a broken loop of kvx's own: exit non-zero
            raise self._crash

    def stop(self) -> None:
        self._stop.set()

    async def _start(self) -> None:
        cfg, core = self.config, self.core
        (cfg.data_dir / INFO_FILE).unlink(missing_ok=True)
        self.router = self._ctx.socket(zmq.ROUTER)
        make_curve_server(self.router, self.identity)
        self.router.maxmsgsize = MAX_FRAME_BYTES
        self.router.linger = 0
        _bind(
            self.router, cfg.listen.replace(":0", ":*") if cfg.listen.endswith(":0") else cfg.listen
        )
        ctl = advertised(self.router.getsockopt_string(zmq.LAST_ENDPOINT), cfg.advertise)
        self.admin = self._ctx.socket(zmq.ROUTER)
        self.admin.linger = 0
        _bind(self.admin, cfg.admin_address)
        os.chmod(cfg.data_dir / ADMIN_SOCKET, 0o600)  # the local API is its owner's only
        self.tcp = TcpDataServer(
            core.sessions, core.inbox, core.signer, limits=cfg.data_limits, **self._told_by_ports()
        )
        try:
            await self.tcp.start(cfg.data_host, cfg.data_port)
        except OSError as exc:
            raise ConfigError(f"cannot serve data on {cfg.data_host}: {exc.strerror}") from None
        data: tuple[DataAddress, ...] = (
            DataAddress(t="tcp", addr=advertised(self.tcp.address, cfg.advertise)),
        )
        if cfg.ucx:
            from kvx.transport._ucx import UcxDataServer  # the optional 'ucx' extra

            self.ucx = UcxDataServer(
                core.sessions,
                core.inbox,
                core.signer,
                limits=cfg.data_limits,
                **self._told_by_ports(),
            )
            await self.ucx.start(cfg.data_host, cfg.ucx_port)
            ucx = DataAddress(t="ucx", addr=advertised(self.ucx.address, cfg.advertise))
            data = (ucx, *data)
        self._gauges()
        metrics_url = None
        if cfg.metrics_port is not None:
            try:
                port = self.metrics.serve(cfg.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on 127.0.0.1:{cfg.metrics_port}: {exc.strerror}"
                ) from None
            metrics_url = f"http://127.0.0.1:{port}/metrics"
        core.serve(ctl, data, now())
        for coro in (self._receive(self.router, None), self._admin_loop(), self._timers()):
            self._spawn(coro)
        await self._flush()
        info = {
            "node_id": self.id.hex(),
            "public_key": self.identity.public_key.hex(),
            "ctl": ctl,
            "data": [{"t": d.t, "addr": d.addr} for d in data],
            "admin": cfg.admin_address,
            "metrics": metrics_url,
            "pid": os.getpid(),
            "incarnation": core.liveness.incarnation,
            "verify": str(cfg.policy.verify),  # what its clients check of bought KV
            "seal_public": cfg.policy.seal_public,  # whether they ask for sealed streams
        }
        tmp = cfg.data_dir / (INFO_FILE + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(json.dumps(info, indent=1))
        tmp.replace(cfg.data_dir / INFO_FILE)
        self.happened(Ready(ctl=ctl, data=self.tcp.address, peers=len(cfg.bootstrap)))
        self._served = True

    async def _leave(self) -> None:
        """Tell the peers (§8.22), then give the streams of deals already made up to
        `leave_grace_s` to finish; the receive loops run meanwhile, so their receipts
        are still taken. Peers then drop this node at once, not after seconds of
        suspicion while their buyers try it."""
        self._told = self.core.leave(now())
        await self._flush()
        servers = [s for s in (getattr(self, "tcp", None), getattr(self, "ucx", None)) if s]
        deadline = time.monotonic() + self.config.leave_grace_s
        while any(s.streams for s in servers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._flush()

    async def _shutdown(self) -> None:
        (self.config.data_dir / INFO_FILE).unlink(missing_ok=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if hasattr(self, "tcp"):
            await self.tcp.close()
        if hasattr(self, "ucx"):
            await self.ucx.close()
        for key, dealer in self._dealers.items():  # a LEAVE still queued goes out first
            dealer.close(linger=LEAVE_LINGER_MS if key in self._told else 0)
        for sock in [getattr(self, "router", None), getattr(self, "admin", None)]:
            if sock is not None:
                sock.close(linger=0)
        self._auth.stop()
        self._ctx.term()
        (self.config.data_dir / ADMIN_SOCKET).unlink(missing_ok=True)
        self.core.store.close()
        self.core.ledger.close()
        self.core.scores.close()
        self._lock.release()
        if self._served:  # a node that never started did not stop either: its error says why
            self.happened(Stopped())

    def _told_by_ports(self) -> dict[str, Callable[..., object]]:
        """What a data port tells the core, each with the time it happens: streams run on
        worker threads, and a window receipt is booked on the loop before the stream goes
        on (the ledger belongs to the loop's thread)."""
        loop, core = asyncio.get_running_loop(), self.core

        def told(what: Callable[[], None]) -> None:
            try:
                what()
            finally:
                self._flush_from(loop)  # what the core emitted for it (a StreamCut, say)

        def receipt(st: Statement) -> None:
            told(lambda: core.window_receipt(st, now()))

        return {
            "on_finished": lambda offer, sent, whole: told(
                lambda: self._stream_finished(offer, sent, whole)
            ),
            "on_receipt": lambda st: on_loop(loop, lambda: receipt(st)),
            "on_fault": lambda buyer, exc: told(lambda: core.stream_fault(buyer, exc, now())),
        }

    def _stream_finished(self, offer: Offer, sent: int, whole: bool) -> None:
        self.metrics.data_bytes_sent.inc(sent)
        self.core.stream_finished(offer, sent, whole, now())

    def _flush_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """Carry out the core's outputs on the loop, soon, from whichever thread told the
        core something; a loop already closed has nobody left to tell."""
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: self._spawn(self._flush()))

    def _admit(self, address: str) -> bool:
        """Whether a new CURVE connection from `address` is admitted (spec §12.6)."""
        if self._handshakes.take(address.encode(), time.monotonic()):
            return True
        self.metrics.shed.labels("handshake").inc()
        return False

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._crashed)
        return task

    def _crashed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.happened(TaskFailed(error=repr(task.exception())))
            self._crash = self._crash or task.exception()
            self._stop.set()  # a broken loop must not leave a half-working node

    # ---- carrying out what the core decided --------------------------------------------

    async def _flush(self) -> None:
        """Carry out what the core decided, and what it decided meanwhile (a connection
        that could not be made is the core's to hear of): until it has nothing left."""
        while outputs := self.core.drain():
            for out in outputs:
                if isinstance(out, Connect):
                    self._connect(out)
                elif isinstance(out, Send):
                    sock = self._dealers.get(out.key)
                    if sock is None:  # its connection could not be made
                        continue
                    with contextlib.suppress(zmq.Again):
                        await sock.send(out.frame, flags=zmq.NOBLOCK)
                        self._sent(out.mtype.name, len(out.frame))
                elif isinstance(out, Reply):
                    await self.router.send_multipart([out.routing, out.frame])
                    self._sent(out.mtype.name, len(out.frame))
                elif isinstance(out, Disconnect):
                    self._drop_dealer(out.key)
                elif isinstance(out, Judge):
                    self._spawn(self._judge(out))
                elif isinstance(out, Authorize):
                    self._spawn(self._authorize(out))
                elif isinstance(out, Happening):
                    self.happened(out)

    def happened(self, happening: Happening) -> None:
        """Counted in the metrics, and one JSON line in the log (p2p/_logs.py) unless it
        is one of those too frequent for a line."""
        self.metrics.note(happening)
        if happening.level is not None:
            fields = {"node": self.id.hex()[:12], "event": happening.name, **happening.fields()}
            log.log(happening.level, fields)

    def _gauges(self) -> None:
        """What the metrics read off the core: the table and the index when scraped (never
        stale), the rest after each timer round (the ledger is the loop's to read)."""
        core, metrics = self.core, self.metrics
        for what in self.held():
            metrics.held.labels(what).set_function(functools.partial(self._held_of, what))
        for state in core.liveness.counts():
            metrics.peers.labels(state).set_function(functools.partial(self._peers_in, state))
        metrics.ads.set_function(lambda: len(core.gossip.index))

    def _peers_in(self, state: str) -> int:
        return self.core.liveness.counts()[state]

    def _timed_gauges(self) -> None:
        core, metrics = self.core, self.metrics
        metrics.degraded.labels("scores").set(int(core.scores.write_failed))
        metrics.degraded.labels("ledger").set(int(not core.trading.selling()))
        metrics.credits.set(sum(core.ledger.balances().values()))

    async def _authorize(self, deal: Authorize) -> None:
        """Load a sold payload off the loop — read from disk, hashed against its root,
        perhaps converted — then let its stream open; the buyer's TRANSFER waits for it
        (§9.2)."""
        try:
            loaded = await asyncio.to_thread(self.core.trading.market.load, deal)
        except IntegrityError as exc:
            self.core.unservable(deal, str(exc), now())
        else:
            self.core.loaded(deal, *loaded, now=now())
        await self._flush()

    async def _judge(self, out: Judge) -> None:
        """Judge evidence with the weights, off the loop (a forward of the model)."""
        try:
            verdict, detail, seller_key = await asyncio.to_thread(self._verdict, out)
        except Exception:
            self.core.internal_error("judge")
            return
        self.core.judged(out.evidence, verdict, detail, seller_key, now())
        await self._flush()

    def _verdict(self, out: Judge) -> tuple[str, str, bytes]:
        """(verdict, why, the bound seller's public key): evidence that binds another
        seller, root or fingerprint than its ACCUSE names accuses nobody it names."""
        try:
            bound = bind(Evidence.decode(out.data))
        except RemoteProtocolError as exc:
            return "invalid", exc.detail, b""
        if (bound.seller, bound.root, bound.fp) != (out.seller, out.root, out.fp):
            return "invalid", "the evidence binds another seller, root or fingerprint", b""
        finding = self.judges[out.fp](bound)
        if finding is None:
            return "honest", "the weights agree", b""
        return "lie", str(finding), bound.signer

    def _sent(self, mtype: str, size: int) -> None:
        self.metrics.sent.labels(mtype).inc()
        self.metrics.bytes_out.inc(size)

    def _connect(self, out: Connect) -> None:
        """Open the connection the core decided on (spec §8.1a): to a proven key one that
        libzmq keeps reconnecting, to any other one attempt."""
        sock = self._ctx.socket(zmq.DEALER)
        make_curve_client(sock, self.identity, out.key)
        sock.maxmsgsize = MAX_FRAME_BYTES
        sock.linger = 0
        sock.sndhwm = 1000
        if out.proven:
            sock.reconnect_ivl = int(self.config.reconnect_s * 1000)
            sock.reconnect_ivl_max = int(self.config.reconnect_max_s * 1000)
        else:
            sock.reconnect_ivl = -1  # one attempt: the next is the core's to allow
        try:
            sock.connect(out.ctl)
        except zmq.ZMQError as exc:  # decoded addresses connect; config ones may not
            sock.close(linger=0)
            self.core.connect_failed(out.key, str(exc), now())
            return
        self._dealers[out.key] = sock
        self._readers[out.key] = self._spawn(self._receive(sock, out.key))

    def _drop_dealer(self, key: bytes) -> None:
        sock = self._dealers.pop(key, None)
        reader = self._readers.pop(key, None)
        if reader is not None:
            reader.cancel()  # before the socket goes, or its pending recv fails the node
        if sock is not None:
            sock.close(linger=0)

    async def _receive(self, sock: zmq.asyncio.Socket, server_key: bytes | None) -> None:
        """Serve one socket: the ROUTER (server_key None) or this node's DEALER to a peer.

        One message at a time, yielding to the loop after each: a pyzmq receive that
        finds data queued completes at once, so without the yield a busy socket would keep
        timers, the admin API and every other socket waiting. Between connections the
        ROUTER is fair itself (libzmq queues each connection's messages apart and takes
        them in turn), so a newcomer's HELLO is read within one round of the peers with
        messages waiting, and a connection whose queue is full is pushed back by TCP, not
        served ahead of others (spec §12.6).
        """
        expected_curve = b"" if server_key is None else curve_public_key(server_key)
        wanted = 2 if server_key is None else 1  # the ROUTER prepends the routing id
        shadow: zmq.Socket[bytes] = zmq.Socket.shadow(
            sock.underlying
        )  # non-blocking reads of whole messages
        while not sock.closed:  # a dropped dealer's reader ends here, even from within
            try:
                await sock.poll()  # until a message can be read
            except zmq.ZMQError:
                if sock.closed:
                    return
                raise
            while not sock.closed and (parts := self._read(shadow, wanted)) is not None:
                if parts:
                    source = ""
                    if server_key is None:
                        routing, frame = parts[0].bytes, parts[1]
                        curve = peer_curve_key(frame)
                        source = str(frame.get("Peer-Address"))
                    else:
                        routing, frame, curve = None, parts[0], expected_curve
                    self.metrics.bytes_in.inc(len(frame))
                    try:
                        self.core.receive(
                            frame.bytes, curve, routing, server_key, source, now=now()
                        )
                    except Exception:
                        self.core.internal_error("receive")
                    await self._flush()
                await asyncio.sleep(0)

    def _read(self, sock: zmq.Socket[bytes], wanted: int) -> list[zmq.Frame] | None:
        """One whole message if one is ready (None if not), as its parts — or [] for one
        of another number of parts, refused (spec §4.2). Parts past the expected count
        are dropped as they are read, so a many-part message never sits in a list here."""
        try:
            parts = [sock.recv(zmq.NOBLOCK, copy=False)]
            while sock.rcvmore:
                part = sock.recv(copy=False)
                if len(parts) <= wanted:
                    parts.append(part)
        except zmq.Again:
            return None
        if len(parts) != wanted:  # refused (spec §4.2)
            self.metrics.rejections.labels(ErrorCode.MALFORMED.name).inc()
            return []
        return parts

    async def _timers(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.core.next_timer() - time.monotonic()))
            self.core.handle_timer(now())
            self._timed_gauges()
            self._handshakes.prune(time.monotonic())
            await self._flush()

    def held(self) -> dict[str, int]:
        """What the node holds for its peers, each against a budget (spec §13.1)."""
        return {
            **self.core.held(),
            "data_connections": self.tcp.connections,
            "data_accept_errors": self.tcp.accept_errors,
        }

    def _held_of(self, what: str) -> int:
        return self.held()[what]

    def budgets(self) -> dict[str, dict[str, int]]:
        """Each bounded holding beside its limit, so an operator sees how full it is."""
        cfg, core = self.config, self.core
        index = core.gossip.index
        pairs = {
            "store_disk_bytes": (core.store.disk_used(), cfg.disk_bytes),
            "store_memory_bytes": (core.store.memory_used(), cfg.memory_bytes),
            "ads": (len(index), cfg.max_ads),
            "ad_bytes": (index.held_bytes, cfg.max_ad_bytes),
            "withdrawals": (index.withdrawals(), cfg.max_ads),
            "replay_entries": (len(core.inbox.guard), cfg.replay_total),
            "peers": (len(core.liveness.peers.all()), cfg.max_peers),
            "data_connections": (self.tcp.connections, cfg.data_connections),
            "data_streams": (self.tcp.streams, cfg.data_streams),
        }
        return {name: {"used": used, "limit": limit} for name, (used, limit) in pairs.items()}

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
                reply = {"ok": True, **answer(self, req, now())}
            except RemoteProtocolError as exc:
                reply = {"ok": False, "code": int(exc.code), "error": exc.detail}
            except Exception as exc:  # a bad local request must not stop the node
                reply = {"ok": False, "code": int(ErrorCode.INTERNAL), "error": repr(exc)}
            await self.admin.send_multipart([routing, b"", pack(reply)])
            await self._flush()


_T = TypeVar("_T")


def now() -> Now:
    """The host's time, which the driver passes to the core with every input."""
    return Now(time.monotonic(), time.time())


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], _T]) -> _T:
    """Run `fn` on the node's loop from a data-channel worker thread and wait for it: the
    ledger and the scores belong to the loop's thread, and the stream waits on the answer."""
    done: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the waiting thread, which raises it
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done.result()


def _bind(sock: zmq.Socket[Any], address: str) -> None:
    """Bind, or say in one line why not (a port in use is a user's mistake, not a crash)."""
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from None


def run_node(config: NodeConfig, judges: Mapping[bytes, Judgement] | None = None) -> None:
    """Run a node in the foreground until SIGTERM or SIGINT."""
    asyncio.run(Node(config, judges=judges).run())
