"""Hostile peers against live node processes, one attack class at a time (spec §12.6).

Each test sends a validly signed attack to a real node, then checks that the node is
alive, that an honest peer is still answered and not blamed, and what the node held.
The core's rules, case by case, are tested in memory in tests/test_attack_rules.py.
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import blake3
import msgpack
import pytest
import zmq
from swarm import NodeProcess, TestPeer, eventually

from kvx.conformance.fuzz import signed_with
from kvx.p2p import PeerClient
from kvx.protocol import (
    Accept,
    Advertise,
    DataAddress,
    Error,
    ErrorCode,
    Header,
    Hello,
    KVLayout,
    PeerEntry,
    Peers,
    Quote,
    QuoteRequest,
    Transfer,
    encode_envelope,
    frame_header,
)
from kvx.protocol._datachannel import FrameTag
from kvx.trust import Identity, Ledger, PeerScores, Signer

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32
CHAIN = [blake3.blake3(f"doc/{i}".encode()).digest() for i in range(3)]
PAYLOAD = blake3.blake3(b"doc").digest(length=LAYOUT.payload_bytes(3))
CHUNK = 1 << 16
BIG = KVLayout(dtype="float16", layers=4, kv_heads=4, head_dim=64, block=32)  # 6 chunks
BIG_PAYLOAD = blake3.blake3(b"big doc").digest(length=BIG.payload_bytes(3))


def now() -> int:
    return time.time_ns() // 1_000_000


def direct(peer: TestPeer, ttl: int = 60_000, seq: int | None = None) -> Header:
    t = now()
    return Header(iat=t, exp=t + ttl, seq=seq if seq is not None else t * 1000, to=peer.node_id)


def hello_ok(node: NodeProcess) -> bool:
    """An honest newcomer's HELLO is answered with PEERS."""
    peer = TestPeer(node, Identity.generate())
    try:
        peer.send(
            Signer(peer.identity).seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=peer.node_id
            )
        )
        answer = peer.recv(timeout=10)
        return answer is not None and isinstance(answer.message, Peers)
    finally:
        peer.close()


def alive_and_serving(node: NodeProcess) -> None:
    assert node.proc.poll() is None, (node.dir / "node.log").read_text()[-3000:]
    assert hello_ok(node)
    assert node.call("status")["internal_errors"] == 0


def publish(node: NodeProcess, layout: KVLayout = LAYOUT, payload: bytes = PAYLOAD) -> None:
    node.call(
        "publish",
        fp=FP,
        layout=layout.__dict__,
        blocks=CHAIN,
        payload=payload,
        chunk=CHUNK,
        params=10**9,
    )


def advert(ctl: str = "tcp://127.0.0.1:1", blocks=CHAIN[:1], root=b"\x01" * 32) -> Advertise:
    return Advertise(
        fp=FP,
        layout=LAYOUT,
        blocks=tuple(blocks),
        root=root,
        chunk=CHUNK,
        price=1,
        ctl=ctl,
        data=(DataAddress("tcp", "127.0.0.1:2"),),
    )


def relayable(t: int | None = None, ttl: int = 600_000) -> Header:
    t = t or now()
    return Header(iat=t, exp=t + ttl, seq=time.time_ns())


# ---- 1. one signed frame must not stop a node ---------------------------------------


def test_a_bad_address_in_a_signed_message_is_refused_at_decode(node, peers):
    ctl = "tcp://127.0.0.1:99999"  # every other bad address: tests/test_attack_rules.py
    n = node()
    peer, _signer = peers(n)
    peer.send(
        signed_with(
            peer.identity,
            Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1),
            {"ctl": ctl},
            direct(peer),
        )
    )
    answer = peer.recv()
    assert isinstance(answer.message, Error) and answer.message.code == ErrorCode.INVALID_FIELD
    # The same address in a PEERS entry and in a gossiped ADVERTISE: dropped, nothing dialed.
    entry = {"key": Identity.generate().public_key, "ctl": ctl, "inc": 1, "state": 0}
    peer.send(signed_with(peer.identity, Peers(peers=()), {"peers": [entry]}, direct(peer)))
    peer.send(signed_with(peer.identity, advert(), {"ctl": ctl}, relayable()))
    time.sleep(0.3)
    alive_and_serving(n)
    assert n.call("ads")["ads"] == []


def test_one_advertise_with_a_bad_address_cannot_stop_a_swarm(tmp_path):
    a = NodeProcess(tmp_path / "a").start()
    a.wait_ready()
    b = NodeProcess(tmp_path / "b", [a.dir / "node.json"]).start()
    c = NodeProcess(tmp_path / "c", [a.dir / "node.json"]).start()
    try:
        b.wait_ready(), c.wait_ready()
        eventually(lambda: len(a.call("peers")["peers"]) == 2)
        liar = Identity.generate()
        peer = TestPeer(a, liar)
        body = {"ctl": "tcp://127.0.0.1:99999"}
        peer.send(signed_with(liar, advert(), body, relayable()))
        time.sleep(2)
        peer.close()
        for n in (a, b, c):
            alive_and_serving(n)
    finally:
        for n in (c, b, a):
            n.stop()


async def test_a_crash_of_the_nodes_own_loops_is_no_clean_exit(tmp_path):
    import asyncio

    from kvx.p2p import Node, NodeConfig

    node = Node(NodeConfig(tmp_path / "n", metrics_port=None))
    running = asyncio.ensure_future(node.run())
    while not (tmp_path / "n" / "node.json").exists():
        await asyncio.sleep(0.02)

    async def broken() -> None:
        raise RuntimeError("a bug in kvx")

    node._spawn(broken())  # a loop of the node's own dies: the node stops and says why
    with pytest.raises(RuntimeError, match="a bug in kvx"):
        await asyncio.wait_for(running, 10)
    assert not (tmp_path / "n" / "node.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_degrades_the_node_instead_of_stopping_it(tmp_path, peers):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    n = None
    try:
        n = NodeProcess(disk / "node", memory_bytes=1 << 20).start()
        n.wait_ready()
        publish(n)
        # Fill the disk to the last byte.
        with open(disk / "filler", "wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        # Frames that make the node write: forged signatures (scores), a purchase (ledger).
        for _ in range(5):
            bad, _ = peers(n)
            bad.send(encode_envelope(Hello.TYPE, b"\x80", bad.identity.public_key, bytes(64)))
        buyer, signer = peers(n)
        buyer.send(
            signer.seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=buyer.node_id
            )
        )
        assert isinstance(buyer.recv().message, Peers)
        request = QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("tcp",), max_price=10**12)
        buyer.send(signer.seal(request, now_ms=now(), to=buyer.node_id))
        quote = buyer.recv()
        if isinstance(quote.message, Quote):  # the quote is not written; its ACCEPT is
            q = quote.message
            buyer.send(
                signer.seal(
                    Accept(quote=q.quote, price=q.price, root=q.root),
                    now_ms=now(),
                    to=buyer.node_id,
                )
            )
            answer = buyer.recv()
            assert answer.message.code == ErrorCode.UNAVAILABLE
        eventually(lambda: n.call("status")["degraded"])
        assert n.proc.poll() is None
        assert hello_ok(n)
        (disk / "filler").unlink()
    finally:
        if n is not None:
            n.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---- 2. memory is budgeted per signer and in total ----------------------------------


def test_a_many_part_message_is_dropped_part_by_part(node):
    n = node()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    from kvx.trust import make_curve_client

    make_curve_client(sock, Identity.generate(), bytes.fromhex(n.info["public_key"]))
    sock.connect(n.info["ctl"])
    part = b"\0" * (256 << 10)
    for _ in range(3):
        sock.send_multipart([part] * 200)  # 50 MiB in one message
    time.sleep(1.0)
    sock.close(linger=0)
    ctx.term()
    alive_and_serving(n)


def test_state_for_identities_that_came_and_went_is_freed(node):
    n = node(max_peers=8, rate_per_s=5.0, burst=5)
    for _ in range(60):
        peer = TestPeer(n, Identity.generate())
        peer.send(
            Signer(peer.identity).seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=peer.node_id
            )
        )
        peer.recv()
        peer.close()
    eventually(lambda: n.call("status")["held"]["rate_buckets"] == 0, timeout=10)
    held = n.call("status")["held"]
    assert held["peers"] <= 8 and held["curve_keys"] <= 8 and held["sessions"] <= 60
    alive_and_serving(n)


# ---- 3. no stranger can starve honest peers ------------------------------------------


def _buy(seller: NodeProcess, buyer_dir) -> bytes:
    import asyncio

    async def go():
        client = PeerClient(buyer_dir, timeout_s=10)
        try:
            return bytes((await client.fetch(FP, CHAIN, params=10**9)).tensor.numpy())
        finally:
            await client.close()

    return asyncio.run(go())


def test_slow_and_idle_data_connections_do_not_stop_sales(tmp_path):
    seller = NodeProcess(
        tmp_path / "seller",
        data_header_s=1.0,
        data_connections=32,
        prefix=("prlimit", "--nofile=160:160"),
    ).start()
    seller.wait_ready()
    buyer = NodeProcess(tmp_path / "buyer", [seller.dir / "node.json"]).start()
    buyer.wait_ready()
    host, port = seller.info["data"][0]["addr"].rsplit(":", 1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def slowloris() -> None:  # one byte of a header every half second, on six sockets
        socks = [socket.create_connection((host, int(port))) for _ in range(6)]
        while not stop.wait(0.5):
            for s in socks:
                with contextlib.suppress(OSError):
                    s.send(b"\x01")
        for s in socks:
            s.close()

    thread = threading.Thread(target=slowloris)
    try:
        publish(seller)
        eventually(lambda: len(buyer.call("ads")["ads"]) == 1)
        thread.start()
        for _ in range(300):  # idle connections: past the budget, and past the FD limit
            try:
                held.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break
        time.sleep(1.5)
        assert _buy(seller, buyer.dir) == PAYLOAD  # served while under attack
        assert seller.call("status")["held"]["data_connections"] <= 32
        alive_and_serving(seller)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        for s in held:
            s.close()
        buyer.stop()
        seller.stop()


# ---- 4. eclipse and reflection ------------------------------------------------------


def test_strangers_filling_the_peer_table_do_not_keep_an_honest_node_out(tmp_path):
    target = NodeProcess(tmp_path / "target", max_peers=16).start()
    target.wait_ready()
    sybils = [TestPeer(target, Identity.generate()) for _ in range(16)]
    stop = threading.Event()

    def keep_talking() -> None:  # every stranger stays alive and says so, again and again
        while not stop.is_set():
            for peer in sybils:
                hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
                peer.send(Signer(peer.identity).seal(hello, now_ms=now(), to=peer.node_id))
            stop.wait(0.2)

    thread = threading.Thread(target=keep_talking)
    thread.start()
    try:
        eventually(lambda: len(target.call("peers")["peers"]) == 16)
        honest = NodeProcess(tmp_path / "honest", [target.dir / "node.json"]).start()
        honest.wait_ready()
        try:
            honest_id = honest.info["node_id"]
            eventually(lambda: honest_id in {p["node_id"] for p in target.call("peers")["peers"]})
        finally:
            honest.stop()
        assert len(target.call("peers")["peers"]) <= 16
    finally:
        stop.set()
        thread.join()
        for peer in sybils:
            peer.close()
        target.stop()


def test_a_peers_list_aimed_at_a_victim_costs_it_a_few_connections(node, peers):
    victim = socket.create_server(("127.0.0.1", 0))
    victim.settimeout(0.2)
    accepted = 0
    n = node()
    peer, signer = peers(n)
    port = victim.getsockname()[1]
    entries = tuple(
        PeerEntry(key=Identity.generate().public_key, ctl=f"tcp://127.0.0.1:{port}", inc=1, state=0)
        for _ in range(64)
    )
    peer.send(signer.seal(Peers(peers=entries), now_ms=now(), to=peer.node_id))
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            conn, _ = victim.accept()
            accepted += 1
            conn.close()
        except TimeoutError:
            pass
    victim.close()
    assert accepted <= 8, f"{accepted} connections to the victim in 6 s"
    alive_and_serving(n)


# ---- 5. blame and payment -----------------------------------------------------------


def test_a_buyer_that_never_pays_gets_one_window(tmp_path, node, peers):
    seller = node(payment_window_bytes=CHUNK)
    publish(seller, BIG, BIG_PAYLOAD)
    buyer, signer = peers(seller)
    buyer.send(
        signer.seal(Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=buyer.node_id)
    )
    buyer.recv()
    request = QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("tcp",), max_price=10**12)
    buyer.send(signer.seal(request, now_ms=now(), to=buyer.node_id))
    q = buyer.recv().message
    assert isinstance(q, Quote) and q.window == CHUNK and q.deliver > 2 * CHUNK
    buyer.send(
        signer.seal(
            Accept(quote=q.quote, price=q.price, root=q.root), now_ms=now(), to=buyer.node_id
        )
    )
    host, port = q.data.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        transfer = signer.seal(
            Transfer(quote=q.quote, token=q.token, first=0), now_ms=now(), to=buyer.node_id
        )
        s.sendall(frame_header(FrameTag.CONTROL, len(transfer)) + transfer)
        s.settimeout(3)
        got = b""
        try:
            while chunk := s.recv(1 << 20):
                got += chunk
        except TimeoutError:
            pass
    # The chunk list, then exactly one chunk: the seller waits for a receipt that never comes.
    listing = 5 + 32 * -(-q.size // q.chunk)
    assert len(got) == listing + 5 + 4 + CHUNK
    alive_and_serving(seller)


def test_honest_buyers_pay_window_by_window_and_the_seller_records_it(tmp_path):
    seller = NodeProcess(tmp_path / "seller", payment_window_bytes=CHUNK).start()
    seller.wait_ready()
    buyer = NodeProcess(tmp_path / "buyer", [seller.dir / "node.json"]).start()
    buyer.wait_ready()
    try:
        publish(seller, BIG, BIG_PAYLOAD)
        eventually(lambda: len(buyer.call("ads")["ads"]) == 1)
        assert _buy(seller, buyer.dir) == BIG_PAYLOAD
        from kvx.trust import Ledger

        ledger = Ledger(seller.dir / "ledger.db", bytes.fromhex(seller.info["node_id"]))
        eventually(lambda: [e.receipted for e in ledger.audit()] == [True])
        entry = ledger.audit()[0]
        assert entry.paid == entry.price
        ledger.close()
    finally:
        buyer.stop()
        seller.stop()


# ---- 6. private means private -------------------------------------------------------
# Node processes: tests/test_private_namespace.py; an outsider's frames, in memory:
# tests/test_attack_rules.py.


# ---- 7. local faults ----------------------------------------------------------------


def test_a_second_node_on_a_data_dir_in_use_is_refused_and_harms_nothing(node):
    first = node()
    second = subprocess.run(
        [sys.executable, "-m", "kvx.cli", "node", "--config", str(first.dir / "node.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert f"PID {first.proc.pid}" in second.stderr
    assert (first.dir / "node.json").exists() and (first.dir / "admin.sock").exists()
    alive_and_serving(first)


def test_the_data_dir_mode_is_left_alone_and_a_world_writable_one_refused(tmp_path):
    import stat

    shared = tmp_path / "open"
    shared.mkdir(mode=0o755)
    n = NodeProcess(shared).start()
    n.wait_ready()
    n.stop()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    bad = NodeProcess(loose).start()
    with pytest.raises(RuntimeError, match="writable by every user"):
        bad.wait_ready()


def test_every_file_a_node_writes_is_its_owners_alone(tmp_path):
    """Deals, scores, KV and the local API of a private namespace's member included,
    whatever the data dir's mode (left alone) and the umask."""
    import stat

    shared = tmp_path / "open"
    shared.mkdir(mode=0o755)
    old = os.umask(0o022)  # the usual one: files the node does not narrow are world-readable
    seller = NodeProcess(shared, payment_window_bytes=CHUNK).start()
    buyer = NodeProcess(tmp_path / "buyer", [seller.dir / "node.json"])
    os.umask(old)
    try:
        seller.wait_ready()
        buyer.start().wait_ready()
        publish(seller, BIG, BIG_PAYLOAD)
        eventually(lambda: len(buyer.call("ads")["ads"]) == 1)
        assert _buy(seller, buyer.dir) == BIG_PAYLOAD
        written = [p for p in shared.rglob("*") if not p.is_dir()]
        launcher = {shared / "node.toml", shared / "node.log"}  # the test's, not the node's
        loose = {
            str(p.relative_to(shared)): oct(stat.S_IMODE(p.stat().st_mode))
            for p in written
            if p not in launcher and stat.S_IMODE(p.stat().st_mode) & 0o077
        }
        assert {p.name for p in written} >= {"ledger.db", "node.json", "admin.sock"}
        assert loose == {}
    finally:
        buyer.stop()
        seller.stop()


def test_malformed_admin_requests_do_not_stop_the_node(node):
    n = node()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"ipc://{n.dir / 'admin.sock'}")
    sock.send(b"one frame")
    sock.send_multipart([b"", b"\xc1"])
    sock.send_multipart([b"", msgpack.packb([1, 2])])
    time.sleep(0.3)
    sock.close(linger=0)
    ctx.term()
    alive_and_serving(n)


def test_in_memory_books_leave_no_file_behind(tmp_path, monkeypatch):
    """The simulator keeps its ledgers and scores in SQLite's memory: making them
    owner-only must not create a file named ":memory:" wherever it runs."""
    monkeypatch.chdir(tmp_path)
    Ledger(":memory:", Identity.generate().node_id).close()
    PeerScores(":memory:").close()
    assert list(tmp_path.iterdir()) == []
