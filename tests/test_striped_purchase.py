"""A striped purchase (spec §9.7) between real node processes: one buyer draws a payload
from several sellers at once, and each seller's ledger holds receipts for exactly the
bytes the buyer kept of it — with honest sellers, and with a liar and a staller among
them."""

import sqlite3
import sys
from pathlib import Path

import blake3
import pytest
from swarm import NodeProcess, eventually

from kvx.p2p import SyncPeerClient
from kvx.protocol import ErrorCode, KVLayout

LAYOUT = KVLayout(dtype="float16", layers=4, kv_heads=4, head_dim=64, block=32)  # 128 KiB
FP = b"\x5a" * 32
BLOCKS = 24  # 3 MiB: 48 chunks of 64 KiB
CHAIN = [blake3.blake3(f"striped/{i}".encode()).digest() for i in range(BLOCKS)]
PAYLOAD = blake3.blake3(b"striped payload").digest(length=LAYOUT.payload_bytes(BLOCKS))
FAULTY = Path(__file__).with_name("faulty.py")
WINDOW = 1 << 18  # four chunks: receipts move mid-stream


def seller(path: Path, fault: str | None = None) -> NodeProcess:
    prefix = () if fault is None else (sys.executable, str(FAULTY), fault, "--")
    node = NodeProcess(path, prefix=prefix, payment_window_bytes=WINDOW).start()
    node.wait_ready()
    node.call(
        "publish",
        fp=FP,
        layout=LAYOUT.__dict__,
        blocks=CHAIN,
        chunk=1 << 16,
        payload=PAYLOAD,
        params=10**9,
    )
    return node


def paid_bytes(node: NodeProcess) -> int:
    """Bytes the seller's ledger holds receipts for, over all its deals."""
    with sqlite3.connect(node.dir / "ledger.db") as db:
        return db.execute("SELECT COALESCE(SUM(bytes), 0) FROM receipts").fetchone()[0]


def buy(sellers: list[NodeProcess], tmp_path: Path):
    agent = NodeProcess(tmp_path / "agent", [s.dir / "node.json" for s in sellers]).start()
    agent.wait_ready()
    client = SyncPeerClient(agent.dir, timeout_s=20)
    try:
        eventually(lambda: len(client.lookup(FP, CHAIN, limit=8)[1]) == len(sellers), 30)
        bought = client.fetch(FP, CHAIN, params=10**9)
    finally:
        client.close()
        agent.stop()
    return bought


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


def test_three_sellers_each_stream_a_part_and_are_paid_exactly_for_it(tmp_path, nodes):
    nodes += [seller(tmp_path / f"s{i}") for i in range(3)]
    ids = {bytes.fromhex(n.info["node_id"]): n for n in nodes}
    bought = buy(nodes, tmp_path)
    assert bought.tensor.numpy().tobytes() == PAYLOAD and bought.faults == ()
    assert set(bought.delivered) == set(ids)  # every seller streamed a part
    assert sum(bought.delivered.values()) == len(PAYLOAD)
    for node in nodes:
        node.stop()
    for key, node in ids.items():
        assert paid_bytes(node) == bought.delivered[key]


def test_a_liar_and_a_staller_lose_their_parts_and_are_paid_nothing(tmp_path, nodes):
    nodes += [seller(tmp_path / "h1"), seller(tmp_path / "h2")]
    nodes += [seller(tmp_path / "liar", "lie"), seller(tmp_path / "staller", "stall")]
    honest, liar, staller = nodes[:2], nodes[2], nodes[3]
    ids = [bytes.fromhex(n.info["node_id"]) for n in nodes]
    bought = buy(nodes, tmp_path)
    assert bought.tensor.numpy().tobytes() == PAYLOAD
    faults = {(f.provider, f.code) for f in bought.faults}
    assert (ids[2], ErrorCode.CHUNK_HASH_MISMATCH) in faults
    assert (ids[3], ErrorCode.TIMEOUT) in faults
    assert set(bought.delivered) == set(ids[:2])
    assert sum(bought.delivered.values()) == len(PAYLOAD)
    for node in nodes:
        node.stop()
    for key, node in zip(ids, honest, strict=False):
        assert paid_bytes(node) == bought.delivered[key]
    assert paid_bytes(liar) == paid_bytes(staller) == 0
