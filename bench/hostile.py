"""An honest buyer keeps buying while hostile peers attack a three-node swarm.

    python bench/hostile.py [--seconds 60] [--json OUT]

Nodes (with the node's default timers): A sells one document (6 chunks, a payment
window of one chunk), B relays, C is the honest buyer's node. For `--seconds`, attacker
threads hit A and B with every attack class of the hardening issue, each validly signed
where it is a frame: addresses no socket can take, LOOKUP chains overlapping ads at
other positions, advertisements with ballast and beyond a signer's budget, many-part
messages, long-lived statements to fill the replay memory, a hundred-thousand-key body,
a table full of strangers that keep talking, PEERS lists aimed at a victim socket, slow
and idle data connections. Those of the paid-in-full issue: a hundred fresh identities
from one network that take what they can and never pay, a buyer that pays its first
window with a receipt for the whole delivery, and, beside them, newcomers from another
network buying with the reference stream code and paying. Beside them, the floods
of the flow-control issue, each within every per-peer limit: an honest node D holding
3,000 ads joins through B (anti-entropy), strangers' ads pushed through B, PROBEs about
A through B, twenty identities at 180 statements a second each at A, a CURVE connection
churn at A from another address, signers filling B's index and withdrawals, readers
of A's payload at 4 KiB a second, silent price-0 liars advertising A's chain at C, and
once, a 1,000-part message at B. Meanwhile a PeerClient on C buys the document again
and again, and a newcomer at yet another address says HELLO to A twice a second. The
baseline is the same buyer and newcomer with no attack, in the same run. It reports
the honest success rate under attack and without, the newcomer's HELLO p99 quiet and
under attack, honest peers banned by honest peers, the unpaid bytes a minute the
hundred identities took and what the receipt trick got past its window, connections a
minute at the reflection victim, every node's peak RSS and open file descriptors (B's under the
many-part message), and whether every node is alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import blake3
import torch
import zmq

from kvx.conformance.fuzz import signed_with
from kvx.p2p import Miss, PeerClient
from kvx.protocol import (
    Accept,
    Advertise,
    DataAddress,
    Error,
    FrameTag,
    Header,
    Hello,
    KVLayout,
    Lookup,
    PeerEntry,
    Peers,
    Probe,
    Quote,
    QuoteRequest,
    Receipt,
    RemoteProtocolError,
    Transfer,
    Withdraw,
    frame_header,
)
from kvx.testing import NodeProcess, wait_for
from kvx.transport import Destination, Expected, StreamVerifier, TcpReceiver
from kvx.trust import Identity, Signer, make_curve_client, open_envelope, seal

LAYOUT = KVLayout(dtype="float16", layers=4, kv_heads=4, head_dim=64, block=32)
FP = b"\x0f" * 32
CHAIN = [blake3.blake3(f"doc/{i}".encode()).digest() for i in range(3)]
PAYLOAD = blake3.blake3(b"doc").digest(length=LAYOUT.payload_bytes(3))
CHUNK = 1 << 16
SYBILS = 100
DEFAULT_TIMERS = {  # the node's own defaults, not the fast timers of the tests
    "heartbeat_s": 1.0,
    "suspect_after_s": 5.0,
    "dead_after_s": 12.0,
    "anti_entropy_s": 5.0,
}
NEWCOMER_PATIENCE_S = 10.0  # as long as an honest client waits (hedging aside)
SELLER = {**DEFAULT_TIMERS, "payment_window_bytes": CHUNK, "max_peers": 32, "data_header_s": 2.0}
RELAY = {**DEFAULT_TIMERS, "max_ads": 5000, "max_ads_per_signer": 1000}
CHURN_FROM, NEWCOMER_FROM = "127.0.0.3", "127.0.0.2"  # sources of their own (per-address limits)


def now() -> int:
    return time.time_ns() // 1_000_000


class Attacker:
    """One stranger (or many) with a CURVE connection to a node, from `source`."""

    def __init__(
        self,
        node: NodeProcess | SimpleNamespace,
        identity: Identity | None = None,
        source: str | None = None,
    ) -> None:
        self.identity = identity or Identity.generate()
        self.signer = Signer(self.identity)
        self.node_id = bytes.fromhex(node.info["node_id"])
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 100
        make_curve_client(self.sock, self.identity, bytes.fromhex(node.info["public_key"]))
        ctl = node.info["ctl"]
        self.sock.connect(ctl if source is None else ctl.replace("tcp://", f"tcp://{source}:0;"))

    def send(self, frame: bytes | list[bytes]) -> None:
        with contextlib.suppress(zmq.Again):
            if isinstance(frame, list):
                self.sock.send_multipart(frame, flags=zmq.NOBLOCK)
            else:
                self.sock.send(frame, flags=zmq.NOBLOCK)

    def drain(self) -> list:
        out = []
        while self.sock.poll(0):
            out.append(self.sock.recv())
        return out

    def direct(self, message, ttl: int = 60_000) -> bytes:
        return self.signer.seal(message, now_ms=now(), to=self.node_id, ttl_ms=ttl)

    def raw(self, message, fields: dict, to: bytes | None = None) -> bytes:
        t = now()
        ttl = 600_000 if to is None else 60_000  # relayable, or direct
        header = Header(iat=t, exp=t + ttl, seq=time.time_ns(), to=to)
        return signed_with(self.identity, message, fields, header)

    def close(self) -> None:
        self.sock.close()


def ad(root: bytes = b"\x01" * 32, blocks=CHAIN[:1]) -> Advertise:
    return Advertise(
        fp=FP,
        layout=LAYOUT,
        blocks=tuple(blocks),
        root=root,
        chunk=CHUNK,
        price=0,
        ctl="tcp://127.0.0.1:1",
        data=(DataAddress("tcp", "127.0.0.1:2"),),
    )


def hello() -> Hello:
    return Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)


# Each attack is one round, repeated until the run ends; it may keep state across rounds.


def bad_addresses(node: NodeProcess) -> None:
    a = Attacker(node)
    for ctl in ("x", "tcp://host", "tcp://127.0.0.1:99999", "udp://1.2.3.4:5"):
        a.send(a.raw(hello(), {"ctl": ctl}, to=a.node_id))
        a.send(a.raw(ad(), {"ctl": ctl}))
    a.send(a.direct(Lookup(fp=FP, blocks=(b"\x77" * 32, CHAIN[0]), limit=4)))
    time.sleep(0.2)
    a.close()


def memory(node: NodeProcess) -> None:
    a = Attacker(node)
    a.send(a.raw(ad(), {"pad": b"\0" * 5000}))  # ballast
    for i in range(50):  # many ads of one signer
        a.send(seal(a.identity, ad(root=os.urandom(32)), Header(now(), now() + 86_000_000, i)))
    a.send([b"\0" * (256 << 10)] * 40)  # a 10 MiB many-part message
    a.send(a.raw(hello(), {f"k{i}": 0 for i in range(100_000)}, to=a.node_id))
    time.sleep(0.2)
    a.close()


def replay_fill(node: NodeProcess) -> None:
    for _ in range(4):
        a = Attacker(node)
        for _ in range(150):
            a.send(a.direct(hello(), ttl=300_000))
        time.sleep(0.3)
        a.drain()
        a.close()


def sybils(node: NodeProcess, crowd: list[Attacker]) -> None:
    if not crowd:
        crowd.extend(Attacker(node) for _ in range(40))
    for a in crowd:
        a.send(a.direct(hello()))
        a.drain()
    time.sleep(0.3)


def reflection(node: NodeProcess, victim: socket.socket) -> None:
    a = Attacker(node)
    port = victim.getsockname()[1]
    entries = tuple(
        PeerEntry(Identity.generate().public_key, f"tcp://127.0.0.1:{port}", 1, 0)
        for _ in range(64)
    )
    a.send(a.direct(Peers(peers=entries)))
    time.sleep(1.0)
    a.close()


def data_port(node: NodeProcess, held: list[socket.socket]) -> None:
    host, port = node.info["data"][0]["addr"].rsplit(":", 1)
    for s in held:  # the slow ones trickle a byte
        with contextlib.suppress(OSError):
            s.send(b"\x01")
    for _ in range(50):  # and more idle ones arrive
        try:
            held.append(socket.create_connection((host, int(port)), timeout=1))
        except OSError:
            break
    del held[:-400]  # the attacker's own descriptors are finite too
    time.sleep(0.5)


def answered(a: Attacker, wait_s: float = 3.0) -> Quote | Error | None:
    """Ask for the document; the QUOTE, the ERROR that refused it, or None unanswered."""
    request = QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("tcp",), max_price=10**12)
    a.send(a.direct(request))
    while a.sock.poll(int(wait_s * 1000)):
        q = open_envelope(a.sock.recv()).message
        if isinstance(q, Quote | Error):
            return q
    return None


def quoted(a: Attacker) -> Quote | None:
    """Ask for the document; the QUOTE, or None when refused or unanswered."""
    q = answered(a)
    return q if isinstance(q, Quote) else None


def opened(a: Attacker, q: Quote) -> socket.socket:
    """The deal accepted and its stream opened."""
    a.send(a.direct(Accept(quote=q.quote, price=q.price, root=q.root)))
    host, port = q.data.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=2)
    frame = a.direct(Transfer(quote=q.quote, token=q.token, first=0))
    s.sendall(frame_header(FrameTag.CONTROL, len(frame)) + frame)
    return s


def chunk_bytes(s: socket.socket, limit: int = 1 << 30) -> int:
    """Bytes of chunks read off a stream until it stops, closes, or `limit` chunks."""
    got = chunks = 0
    with contextlib.suppress(OSError):
        while chunks < limit:
            head = s.recv(5, socket.MSG_WAITALL)
            if len(head) < 5:
                break
            tag, length = head[0], int.from_bytes(head[1:], "little")
            body = s.recv(length, socket.MSG_WAITALL) if length else b""
            if tag == FrameTag.CHUNK:
                got += len(body) - 4
                chunks += 1
    return got


def sybil_free_riders(
    node: NodeProcess, swarm: list[Attacker], taken: list[int], stop: threading.Event
) -> None:
    """SYBILS fresh identities from one network, asking again and again: each quote they
    get is accepted, its stream read as far as it goes, and never paid."""
    if not swarm:
        swarm.extend(Attacker(node) for _ in range(SYBILS))
        for a in swarm:
            a.send(a.direct(hello()))
        time.sleep(0.3)
        for a in swarm:
            a.drain()
    for a in swarm:
        if stop.is_set():
            return
        q = quoted(a)
        if q is not None:
            with opened(a, q) as s:
                taken[0] += chunk_bytes(s)


def receipt_trick(node: NodeProcess, beyond: list[int]) -> None:
    """A fresh identity from a network of its own pays its first window with a receipt
    for the whole delivery, and reads on: `beyond` counts chunk bytes it got past the
    first window."""
    a = Attacker(node, source="127.0.2.7")
    a.send(a.direct(hello()))
    time.sleep(0.1)
    a.drain()
    q = quoted(a)
    if q is not None:
        with opened(a, q) as s:
            first = chunk_bytes(s, limit=q.window // q.chunk)  # may time out under load
            lie = Receipt(
                quote=q.quote, seller=a.node_id, root=q.root, bytes=q.deliver, price=q.price
            )
            frame = a.direct(lie)
            with contextlib.suppress(OSError):
                s.sendall(frame_header(FrameTag.CONTROL, len(frame)) + frame)
            beyond[0] += max(0, first + chunk_bytes(s) - q.window)
    a.close()
    time.sleep(0.5)


def honest_newcomer(node: NodeProcess, outcomes: list[str | None]) -> None:
    """A fresh identity from another network than the swarm's buys the document with the
    reference client's own stream code, paying each window and then the whole; `outcomes`
    gets None for a purchase, else why it failed."""
    a = Attacker(node, source="127.0.1.9")
    a.send(a.direct(hello()))
    time.sleep(0.1)
    a.drain()
    q = answered(a, NEWCOMER_PATIENCE_S)
    why: str | None = f"no answer to QUOTE_REQUEST in {NEWCOMER_PATIENCE_S:.0f} s"
    if isinstance(q, Error):
        why = f"refused: {q.code.name}"
    if isinstance(q, Quote):
        a.send(a.direct(Accept(quote=q.quote, price=q.price, root=q.root)))
        expected = Expected.from_quote(q)
        dest = Destination(torch.zeros(q.deliver, dtype=torch.uint8), expected)

        def pay(paid: int) -> bytes:
            share = expected.paid_price(paid)
            return a.direct(
                Receipt(quote=q.quote, seller=a.node_id, root=q.root, bytes=paid, price=share)
            )

        transfer = a.direct(Transfer(quote=q.quote, token=q.token, first=0))
        try:
            receiver = TcpReceiver(
                q.data, transfer, StreamVerifier(expected), dest, NEWCOMER_PATIENCE_S, pay
            )
            asyncio.run(receiver.run())
            a.send(pay(q.deliver))
            why = None if bytes(dest.tensor.numpy()) == PAYLOAD[: q.deliver] else "wrong bytes"
        except RemoteProtocolError as exc:
            why = f"stream: {exc.code.name} {exc}"
    outcomes.append(why)
    time.sleep(0.5)
    a.close()


# ---- the floods of the flow-control issue, each within every per-peer limit -------------


def adverts(count: int, keys: list[Identity], price: int = 1, blocks=None) -> list[bytes]:
    """Valid relayable ADVERTISEs signed in turn by `keys`, each of its own chain."""
    frames = []
    for i in range(count):
        block = os.urandom(32)
        message = Advertise(
            fp=FP,
            layout=LAYOUT,
            blocks=tuple(blocks) if blocks else (block,),
            root=block,
            chunk=CHUNK,
            price=price,
            ctl="tcp://127.0.0.1:1",
            data=(DataAddress("tcp", "127.0.0.1:2"),),
        )
        t = now()
        frames.append(seal(keys[i % len(keys)], message, Header(t, t + 600_000, time.time_ns())))
    return frames


def paced(a: Attacker, frames: list[bytes], per_s: float, stop: threading.Event) -> None:
    start = time.monotonic()
    for i, frame in enumerate(frames):
        if stop.is_set():
            return
        a.send(frame)
        time.sleep(max(0.0, start + (i + 1) / per_s - time.monotonic()))


def relayed_ads(relay: NodeProcess, stop: threading.Event) -> None:
    """Strangers' valid ads handed to the relay at 150 a second, which pushes them on."""
    a = Attacker(relay)
    a.send(a.direct(hello()))
    paced(a, adverts(600, [Identity.generate() for _ in range(3)]), 150, stop)
    a.drain()
    a.close()


def probes(helper: NodeProcess, target: NodeProcess, askers: list[Attacker]) -> None:
    """Four strangers asking the helper to probe the target, 50 a second each."""
    if not askers:
        askers.extend(Attacker(helper) for _ in range(4))
        for a in askers:
            a.send(a.direct(hello()))
    key = bytes.fromhex(target.info["public_key"])
    for _ in range(50):
        for a in askers:
            a.send(a.direct(Probe(target=key)))
        time.sleep(0.02)
    for a in askers:
        a.drain()


def loop_flood(node: NodeProcess, crowd: list[Attacker]) -> None:
    """Twenty identities at 180 statements a second each: within each one's limit,
    above what the node can serve."""
    if not crowd:
        crowd.extend(Attacker(node) for _ in range(20))
    frames = [[a.direct(hello()) for _ in range(18)] for a in crowd]
    for tick in range(18):  # a tenth of a second
        for a, own in zip(crowd, frames, strict=True):
            a.send(own[tick])
        time.sleep(1 / 180)
    for a in crowd:
        a.drain()


def churn(node: NodeProcess) -> None:
    """New CURVE connections from one address as fast as they can be made."""
    for _ in range(50):
        a = Attacker(node, source=CHURN_FROM)
        a.send(a.direct(hello()))
        a.close()
    time.sleep(0.02)  # libzmq closes sockets in its own thread: let descriptors come back


def index_fill(relay: NodeProcess, stop: threading.Event) -> None:
    """Signers each within their budget filling the relay's index, then withdrawing."""
    a = Attacker(relay)
    keys = [Identity.generate() for _ in range(10)]
    paced(a, adverts(1000, keys), 150, stop)
    t = now()
    withdrawals = [
        seal(k, Withdraw(ad=i + 1), Header(t, t + 600_000, time.time_ns()))
        for i in range(100)
        for k in keys
    ]
    paced(a, withdrawals, 150, stop)
    a.close()


def slow_readers(node: NodeProcess, held: list[socket.socket], stop: threading.Event) -> None:
    """Four identities with two streams each, reading 4 KiB a second (once their network's
    unpaid allowance is spent, the seller quotes them no more)."""
    while len(held) < 8 and not stop.is_set():
        a = Attacker(node, source="127.0.3.1")  # a network whose allowance they have
        a.send(a.direct(hello()))
        for _ in range(2):
            q = quoted(a)
            if q is None:
                break
            a.send(a.direct(Accept(quote=q.quote, price=q.price, root=q.root)))
            host, port = q.data.rsplit(":", 1)
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((host, int(port)))
            frame = a.direct(Transfer(quote=q.quote, token=q.token, first=0))
            s.sendall(frame_header(FrameTag.CONTROL, len(frame)) + frame)
            s.setblocking(False)
            held.append(s)
        a.close()
    for s in list(held):
        try:
            if s.recv(4096) == b"":
                held.remove(s)  # cut by the seller: the next round opens another
                s.close()
        except BlockingIOError:
            pass
        except OSError:
            held.remove(s)
            s.close()
    time.sleep(1.0)


def silent_liars(buyer_node: NodeProcess, liars: list[Attacker]) -> None:
    """Eight price-0 ads for the seller's chain whose signers never answer a quote."""
    if not liars:
        liars.extend(Attacker(buyer_node) for _ in range(8))
    for a in liars:
        a.send(a.direct(hello()))
        a.send(adverts(1, [a.identity], price=0, blocks=CHAIN)[0])
        a.drain()
    time.sleep(5.0)


def many_parts(node: NodeProcess) -> None:
    """Once: a message of 1,000 parts of (nearly) 1 MiB each."""
    a = Attacker(node)
    part = b"\0" * ((1 << 20) - 64)
    a.sock.sndhwm = 0
    for _ in range(999):
        a.sock.send(part, zmq.SNDMORE)
    a.sock.send(part)
    time.sleep(5.0)
    a.close()


def honest_joiner(root: Path, relay: NodeProcess) -> NodeProcess:
    """An honest node holding 3,000 ads, which will join through the relay."""
    busy = {**DEFAULT_TIMERS, "rate_per_s": 1e6, "burst": 10**6}
    d = NodeProcess(root / "d", [relay.dir / "node.json"], **busy)
    d.start().wait_ready()
    a = Attacker(d)
    a.send(a.direct(hello()))
    for frame in adverts(3000, [Identity.generate() for _ in range(3)]):
        a.sock.send(frame)
    wait_for(lambda: d.call("status")["ads"] >= 3000, 60)
    a.close()
    return d


def newcomer_hello(node: NodeProcess | SimpleNamespace) -> float | None:
    """Seconds until a newcomer's first HELLO is answered, from an address of its own."""
    a = Attacker(node, source=NEWCOMER_FROM)
    try:
        start = time.perf_counter()
        a.send(a.direct(hello()))
        return time.perf_counter() - start if a.sock.poll(10_000) else None
    finally:
        a.close()


def hellos_for(node: NodeProcess, seconds: float, out: list[float | None]) -> None:
    """Newcomers' HELLO latencies, measured in a process of their own: the attackers'
    threads in this one would hold the GIL, and the figure would be this process's."""
    run = subprocess.run(
        [sys.executable, __file__, "--newcomer", str(node.dir), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    out.extend(json.loads(run.stdout))


def newcomers(data_dir: Path, seconds: float) -> list[float | None]:
    """A newcomer says HELLO twice a second (the --newcomer mode of this script)."""
    node = SimpleNamespace(info=json.loads((data_dir / "node.json").read_text()))
    samples: list[float | None] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(newcomer_hello(node))
        time.sleep(0.5)
    return samples


def p99(samples: list[float | None]) -> float:
    """The 99th percentile; an unanswered HELLO counts as 10 s."""
    values = sorted(10.0 if s is None else s for s in samples)
    return values[min(len(values) - 1, int(0.99 * len(values)))] if values else 0.0


def honest_bans(nodes: dict[str, NodeProcess]) -> int:
    """Honest nodes banned by honest nodes."""
    ids = {n.info["node_id"] for n in nodes.values()}
    banned = 0
    for n in nodes.values():
        with contextlib.suppress(Exception):
            banned += sum(p["banned"] for p in n.call("peers")["peers"] if p["node_id"] in ids)
    return banned


def proc_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def buy_for(
    buyer_dir: Path, seconds: float, failures: list[str]
) -> tuple[int, int, list[float]]:
    """Buy the document again and again; (attempts, successes, seconds per purchase)."""
    attempts = successes = 0
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        attempts += 1
        client = PeerClient(buyer_dir, timeout_s=10)
        start = time.perf_counter()
        try:
            bought = await client.fetch(FP, CHAIN, params=10**9)
            if bytes(bought.tensor.numpy()) == PAYLOAD:
                successes += 1
                times.append(time.perf_counter() - start)
        except Miss as miss:
            failures.append(f"{miss}: {[(f.code.name, f.detail) for f in miss.faults]}")
        finally:
            await client.close()
        await asyncio.sleep(0.2)
    return attempts, successes, times


def run(seconds: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="kvx-hostile-"))
    a = NodeProcess(root / "a", **SELLER).start()
    a.wait_ready()
    b = NodeProcess(root / "b", [a.dir / "node.json"], **RELAY).start()
    c = NodeProcess(root / "c", [a.dir / "node.json"], **DEFAULT_TIMERS).start()
    nodes = {"A (seller)": a, "B (relay)": b, "C (buyer)": c}
    joiner = NodeProcess(root / "e", **DEFAULT_TIMERS)
    victim = socket.create_server(("127.0.0.1", 0))
    victim.settimeout(0.1)
    reflected = [0]
    stop = threading.Event()
    peaks = {name: [0, 0] for name in nodes}
    try:
        b.wait_ready(), c.wait_ready()
        a.call(
            "publish",
            fp=FP,
            layout=LAYOUT.__dict__,
            blocks=CHAIN,
            payload=PAYLOAD,
            chunk=CHUNK,
            params=10**9,
        )
        wait_for(lambda: len(c.call("ads")["ads"]) == 1)
        nodes["D (holds 3,000 ads)"] = d = honest_joiner(root, b)
        joiner = NodeProcess(root / "e", [d.dir / "node.json"], **DEFAULT_TIMERS)
        failures: list[str] = []
        quiet: list[float | None] = []
        hellos = threading.Thread(target=hellos_for, args=(a, min(10.0, seconds / 4), quiet))
        hellos.start()
        base = asyncio.run(buy_for(c.dir, min(10.0, seconds / 4), failures))
        hellos.join()

        crowd: list[Attacker] = []
        held: list[socket.socket] = []
        askers: list[Attacker] = []
        flooders: list[Attacker] = []
        readers: list[socket.socket] = []
        liars: list[Attacker] = []
        swarm: list[Attacker] = []
        taken, beyond = [0], [0]
        newcomers_served: list[str | None] = []
        attacks: list[tuple[str, Callable[[], None]]] = [
            ("relayed ads", lambda: relayed_ads(b, stop)),
            ("probes", lambda: probes(b, a, askers)),
            ("loop flood", lambda: loop_flood(a, flooders)),
            ("churn", lambda: churn(a)),
            ("index fill", lambda: index_fill(b, stop)),
            ("slow readers", lambda: slow_readers(a, readers, stop)),
            ("silent liars", lambda: silent_liars(c, liars)),
            ("bad addresses", lambda: bad_addresses(a)),
            ("bad addresses (relay)", lambda: bad_addresses(b)),
            ("memory", lambda: memory(a)),
            ("replay fill", lambda: replay_fill(a)),
            ("sybils", lambda: sybils(a, crowd)),
            ("reflection", lambda: reflection(b, victim)),
            ("data port", lambda: data_port(a, held)),
            ("sybil free riders", lambda: sybil_free_riders(a, swarm, taken, stop)),
            ("receipt trick", lambda: receipt_trick(a, beyond)),
            ("honest newcomer", lambda: honest_newcomer(a, newcomers_served)),
        ]
        rounds = dict.fromkeys((name for name, _ in attacks), 0)

        def loop(name: str, attack: Callable[[], None]) -> None:
            while not stop.is_set():
                try:
                    attack()
                except (OSError, zmq.ZMQError):  # the attacker's own sockets: try again
                    time.sleep(0.1)
                rounds[name] += 1

        def watch() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(OSError):
                    conn, _ = victim.accept()
                    reflected[0] += 1
                    conn.close()
                for name, n in nodes.items():
                    with contextlib.suppress(OSError, StopIteration):
                        rss, fds = proc_figures(n.proc.pid)
                        peak = peaks.setdefault(name, [0, 0])
                        peaks[name] = [max(peak[0], rss), max(peak[1], fds)]

        threads = [threading.Thread(target=loop, args=pair) for pair in attacks]
        threads.append(threading.Thread(target=watch))
        threads.append(threading.Thread(target=many_parts, args=(b,)))
        attacked: list[float | None] = []
        threads.append(threading.Thread(target=hellos_for, args=(a, seconds, attacked)))
        for t in threads:
            t.start()
        joiner.start().wait_ready()  # joins D, which answers its DIGEST with 3,000 ads
        nodes["E (joins D)"] = joiner
        under = asyncio.run(buy_for(c.dir, seconds, failures))
        stop.set()
        for t in threads:
            t.join()
        for s in held + readers:
            s.close()
        for x in crowd + askers + flooders + liars + swarm:
            x.close()
        banned = honest_bans(nodes)
        joined = joiner.call("status")["ads"]
        alive = {name: n.proc.poll() is None for name, n in nodes.items()}
        errors = {
            name: n.call("status")["internal_errors"] if alive[name] else None
            for name, n in nodes.items()
        }
    finally:
        stop.set()
        victim.close()
        for n in reversed(list(nodes.values())):
            n.stop()
        shutil.rmtree(root, ignore_errors=True)

    def rate(result: tuple[int, int, list[float]]) -> float:
        return result[1] / result[0] if result[0] else 0.0

    return {
        "seconds": seconds,
        "baseline": {
            "attempts": base[0],
            "successes": base[1],
            "success_rate": rate(base),
            "median_s": sorted(base[2])[len(base[2]) // 2] if base[2] else None,
        },
        "under_attack": {
            "attempts": under[0],
            "successes": under[1],
            "median_s": sorted(under[2])[len(under[2]) // 2] if under[2] else None,
        },
        "honest_success_rate": rate(under),
        "newcomer_hello_p99_s": {"quiet": p99(quiet), "under_attack": p99(attacked)},
        "newcomer_hello_samples_s": {"quiet": quiet, "under_attack": attacked},
        "honest_peers_banned": banned,
        "joiner_ads": joined,
        "reflection_connections_per_min": reflected[0] / (seconds / 60),
        "unpaid_bytes_per_min_100_sybils": taken[0] / (seconds / 60),
        "receipt_trick_bytes_beyond_window": beyond[0],
        "newcomer_purchases": {
            "attempts": len(newcomers_served),
            "successes": newcomers_served.count(None),
            "failures": [why for why in newcomers_served if why],
        },
        "relay_peak_rss_mib_many_parts": peaks["B (relay)"][0] / 1024,
        "failures": failures,
        "attack_rounds": rounds,
        "reflected_connections": reflected[0],
        "nodes": {
            name: {
                "alive": alive[name],
                "internal_errors": errors[name],
                "peak_rss_kib": peaks[name][0],
                "peak_fds": peaks[name][1],
            }
            for name in nodes
        },
        "all_alive": all(alive.values()),
        "ratios": {
            "honest_success_under_attack": rate(under),
            "newcomer_success_under_attack": (
                newcomers_served.count(None) / len(newcomers_served) if newcomers_served else 0.0
            ),
            "quiet_vs_attacked_newcomer_hello_p99": (
                p99(quiet) / p99(attacked) if p99(attacked) else 1.0
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--newcomer", nargs=2, metavar=("DATA_DIR", "SECONDS"), help="internal")
    args = parser.parse_args()
    if args.newcomer:
        print(json.dumps(newcomers(Path(args.newcomer[0]), float(args.newcomer[1]))))
        return
    from rich.console import Console
    from rich.table import Table

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the attackers' own sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    figures = run(args.seconds)
    console = Console()
    table = Table(title=f"honest buyer, {figures['seconds']:.0f} s of attacks on a 3-node swarm")
    for column in ("", "attempts", "bought", "success rate", "median s"):
        table.add_column(column, justify="right")
    base, under = figures["baseline"], figures["under_attack"]
    table.add_row(
        "no attack (baseline)",
        str(base["attempts"]),
        str(base["successes"]),
        f"{base['success_rate']:.3f}",
        f"{base['median_s'] or 0:.3f}",
    )
    table.add_row(
        "under attack",
        str(under["attempts"]),
        str(under["successes"]),
        f"{figures['honest_success_rate']:.3f}",
        f"{under['median_s'] or 0:.3f}",
    )
    console.print(table)
    nodes = Table(title="nodes")
    for column in ("node", "alive", "internal errors", "peak RSS MiB", "peak FDs"):
        nodes.add_column(column, justify="right")
    for name, n in figures["nodes"].items():
        nodes.add_row(
            name,
            str(n["alive"]),
            str(n["internal_errors"]),
            f"{n['peak_rss_kib'] / 1024:.0f}",
            str(n["peak_fds"]),
        )
    console.print(nodes)
    console.print(f"attack rounds: {figures['attack_rounds']}")
    for failure in figures["failures"]:
        console.print(f"failed purchase: {failure}")
    console.print(
        f"reflection victim: {figures['reflected_connections']} connections,"
        f" {figures['reflection_connections_per_min']:.1f} a minute"
    )
    hello = figures["newcomer_hello_p99_s"]
    samples = figures["newcomer_hello_samples_s"]
    console.print(
        f"newcomer HELLO p99: quiet {hello['quiet'] * 1000:.1f} ms ({len(samples['quiet'])}"
        f" HELLOs), under attack {hello['under_attack'] * 1000:.1f} ms"
        f" ({len(samples['under_attack'])})"
    )
    console.print(f"honest peers banned by honest peers: {figures['honest_peers_banned']}")
    newcomer = figures["newcomer_purchases"]
    console.print(
        f"{SYBILS} fresh identities from one network took"
        f" {figures['unpaid_bytes_per_min_100_sybils'] / 1024:.0f} KiB a minute unpaid"
        f" (windows of {CHUNK >> 10} KiB); the receipt trick got"
        f" {figures['receipt_trick_bytes_beyond_window']} bytes past its window;"
        f" newcomers from another network bought {newcomer['successes']} of"
        f" {newcomer['attempts']}"
    )
    for why in sorted(set(newcomer["failures"])):
        console.print(f"newcomer failed {newcomer['failures'].count(why)}x: {why}")
    console.print(f"ads the joiner E took from D: {figures['joiner_ads']}")
    console.print(
        f"relay B peak RSS (a 1,000-part message among the attacks):"
        f" {figures['relay_peak_rss_mib_many_parts']:.0f} MiB"
    )
    console.print(f"ratios: {figures['ratios']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
