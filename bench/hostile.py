"""An honest buyer keeps buying while hostile peers attack a three-node swarm.

    python bench/hostile.py [--seconds 60] [--json OUT]

Nodes (with the node's default timers): A sells one document (6 chunks, a payment
window of one chunk), B relays, C is the honest buyer's node. For `--seconds`, attacker
threads hit A and B with every attack class of the hardening issue, each validly signed
where it is a frame: addresses no socket can take, LOOKUP chains overlapping ads at
other positions, advertisements with ballast and beyond a signer's budget, many-part
messages, long-lived statements to fill the replay memory, a hundred-thousand-key body,
a table full of strangers that keep talking, PEERS lists aimed at a victim socket, slow
and idle data connections, and a free rider that never pays. Meanwhile a PeerClient on
C buys the document again and again. The baseline is the same buyer on the same swarm
with no attack, in the same run. It reports the honest success rate under attack and
without, every node's peak RSS and open file descriptors, and whether every node is
alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import zmq

from kvx.conformance.fuzz import signed_with
from kvx.p2p import Miss, NodeProcess, PeerClient, wait_for
from kvx.protocol import (
    Accept,
    Advertise,
    DataAddress,
    FrameTag,
    Header,
    Hello,
    KVLayout,
    Lookup,
    PeerEntry,
    Peers,
    Quote,
    QuoteRequest,
    Transfer,
    frame_header,
)
from kvx.trust import Identity, Signer, make_curve_client, open_envelope, seal

LAYOUT = KVLayout(dtype="float16", layers=4, kv_heads=4, head_dim=64, block=32)
FP = b"\x0f" * 32
CHAIN = [blake3.blake3(f"doc/{i}".encode()).digest() for i in range(3)]
PAYLOAD = blake3.blake3(b"doc").digest(length=LAYOUT.payload_bytes(3))
CHUNK = 1 << 16
DEFAULT_TIMERS = {  # the node's own defaults, not the fast timers of the tests
    "heartbeat_s": 1.0,
    "suspect_after_s": 5.0,
    "dead_after_s": 12.0,
    "anti_entropy_s": 5.0,
}
SELLER = {**DEFAULT_TIMERS, "payment_window_bytes": CHUNK, "max_peers": 32, "data_header_s": 2.0}


def now() -> int:
    return time.time_ns() // 1_000_000


class Attacker:
    """One stranger (or many) with a CURVE connection to a node."""

    def __init__(self, node: NodeProcess, identity: Identity | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.signer = Signer(self.identity)
        self.node_id = bytes.fromhex(node.info["node_id"])
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 100
        make_curve_client(self.sock, self.identity, bytes.fromhex(node.info["public_key"]))
        self.sock.connect(node.info["ctl"])

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


def free_rider(node: NodeProcess) -> None:
    a = Attacker(node)
    a.send(a.direct(hello()))
    time.sleep(0.1)
    a.drain()
    request = QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("tcp",), max_price=10**12)
    a.send(a.direct(request))
    if not a.sock.poll(3000):
        a.close()
        return
    st = open_envelope(a.sock.recv())
    q = st.message
    if isinstance(q, Quote):
        a.send(a.direct(Accept(quote=q.quote, price=q.price, root=q.root)))
        host, port = q.data.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            frame = a.direct(Transfer(quote=q.quote, token=q.token, first=0))
            s.sendall(frame_header(FrameTag.CONTROL, len(frame)) + frame)
            with contextlib.suppress(OSError):
                while s.recv(1 << 20):
                    pass  # takes what it gets and never pays
    a.close()


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
    b = NodeProcess(root / "b", [a.dir / "node.json"], **DEFAULT_TIMERS).start()
    c = NodeProcess(root / "c", [a.dir / "node.json"], **DEFAULT_TIMERS).start()
    nodes = {"A (seller)": a, "B (relay)": b, "C (buyer)": c}
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
        failures: list[str] = []
        base = asyncio.run(buy_for(c.dir, min(10.0, seconds / 4), failures))

        crowd: list[Attacker] = []
        held: list[socket.socket] = []
        attacks: list[tuple[str, Callable[[], None]]] = [
            ("bad addresses", lambda: bad_addresses(a)),
            ("bad addresses (relay)", lambda: bad_addresses(b)),
            ("memory", lambda: memory(a)),
            ("replay fill", lambda: replay_fill(a)),
            ("sybils", lambda: sybils(a, crowd)),
            ("reflection", lambda: reflection(b, victim)),
            ("data port", lambda: data_port(a, held)),
            ("free rider", lambda: free_rider(a)),
        ]
        rounds = dict.fromkeys((name for name, _ in attacks), 0)

        def loop(name: str, attack: Callable[[], None]) -> None:
            while not stop.is_set():
                try:
                    attack()
                except OSError:  # the attacker's own sockets: try again
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
                        peaks[name] = [max(peaks[name][0], rss), max(peaks[name][1], fds)]

        threads = [threading.Thread(target=loop, args=pair) for pair in attacks]
        threads.append(threading.Thread(target=watch))
        for t in threads:
            t.start()
        under = asyncio.run(buy_for(c.dir, seconds, failures))
        stop.set()
        for t in threads:
            t.join()
        for s in held:
            s.close()
        for x in crowd:
            x.close()
        alive = {name: n.proc.poll() is None for name, n in nodes.items()}
        errors = {
            name: n.call("status")["internal_errors"] if alive[name] else None
            for name, n in nodes.items()
        }
    finally:
        stop.set()
        victim.close()
        for n in (c, b, a):
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
        "ratios": {"honest_success_under_attack": rate(under)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

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
    console.print(f"connections reflected at the victim: {figures['reflected_connections']}")
    console.print(f"ratios: {figures['ratios']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
