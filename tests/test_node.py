"""Node daemons as real processes on loopback: membership, gossip, death, rejoin, restart."""

import blake3
import pytest
from swarm import NodeProcess, eventually

from kvx.protocol import ErrorCode, FrameTag, KVLayout
from kvx.trust import Ledger

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32


def doc(label: str, blocks: int = 3) -> dict:
    """A publishable payload: a chain of `blocks` hashes and that many blocks of bytes."""
    chain = [blake3.blake3(f"{label}/{i}".encode()).digest() for i in range(blocks)]
    payload = blake3.blake3(label.encode()).digest(length=LAYOUT.payload_bytes(blocks))
    return {
        "fp": FP,
        "layout": LAYOUT.__dict__,
        "blocks": chain,
        "payload": payload,
        "chunk": 1 << 16,
    }


def roots(node: NodeProcess) -> set[bytes]:
    return {bytes.fromhex(a["root"]) for a in node.call("ads")["ads"]}


def states(node: NodeProcess) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in node.call("peers")["peers"]}


def lookup(node: NodeProcess, d: dict) -> int:
    return node.call("lookup", fp=FP, blocks=d["blocks"], limit=4)["matched"]


@pytest.fixture
def swarm(tmp_path):
    nodes: list[NodeProcess] = []

    def start(n: int) -> list[NodeProcess]:
        first = NodeProcess(tmp_path / "n0").start()
        first.wait_ready()
        nodes.append(first)
        for i in range(1, n):
            nodes.append(NodeProcess(tmp_path / f"n{i}", [first.dir / "node.json"]).start())
        for node in nodes:
            node.wait_ready()
        return nodes

    yield start
    for node in nodes:
        node.stop()


def test_five_nodes_gossip_lose_and_regain_a_member(swarm):
    nodes = swarm(5)
    ids = [n.info["node_id"] for n in nodes]
    for node in nodes:  # everyone finds everyone through peer exchange
        eventually(lambda node=node: sum(s == "alive" for s in states(node).values()) == 4)

    published = doc("on node 0")
    root0 = nodes[0].call("publish", **published)["root"]
    for node in nodes[1:]:
        eventually(lambda node=node: root0 in roots(node))

    victim = nodes[3]
    stored = doc("held by node 3")
    root3 = victim.call("publish", **stored)["root"]
    for node in nodes:
        eventually(lambda node=node: lookup(node, stored) == 3)

    victim.kill()  # no warning: SIGKILL
    others = [n for n in nodes if n is not victim]
    for node in others:
        eventually(lambda node=node: states(node).get(ids[3]) == "dead", timeout=30)
        # Its advertisement is no longer returned by lookups.
        assert lookup(node, stored) == 0
    assert lookup(nodes[0], published) == 3  # everyone else still serves

    victim.start()
    info = victim.wait_ready()
    assert info["node_id"] == ids[3]  # same identity, same data dir
    for node in others:
        eventually(lambda node=node: states(node).get(ids[3]) == "alive", timeout=30)
        # Its store came back from disk, verified, and is advertised again.
        eventually(lambda node=node: lookup(node, stored) == 3, timeout=30)
    assert root3 in roots(victim)


def test_a_clean_stop_removes_node_json_and_keeps_the_store(tmp_path):
    node = NodeProcess(tmp_path / "solo").start()
    node.wait_ready()
    root = node.call("publish", **doc("kept"))["root"]
    assert node.stop() == 0
    assert not (node.dir / "node.json").exists()
    node.start()
    node.wait_ready()
    assert root in roots(node)
    node.stop()


def test_a_corrupted_stored_payload_is_not_advertised_after_restart(tmp_path):
    node = NodeProcess(tmp_path / "solo").start()
    node.wait_ready()
    good = node.call("publish", **doc("good"))["root"]
    bad = node.call("publish", **doc("bad"))["root"]
    node.stop()
    path = node.dir / "store" / f"{bad.hex()}.kv"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    node.start()
    node.wait_ready()
    assert roots(node) == {good}
    assert "store_dropped" in (node.dir / "node.log").read_text()
    node.stop()


def test_a_sold_payload_that_fails_its_root_on_disk_ends_its_deal_and_its_ad(tmp_path):
    """The payload is read for a sale off the event loop; one that fails its root there is
    not streamed: the buyer's TRANSFER is refused at once, the deal ends undelivered, and
    the payload is dropped and its advertisement withdrawn."""
    from rawbuy import RawBuyer, error_of, read_frame

    node = NodeProcess(tmp_path / "seller", memory_bytes=1).start()  # nothing kept in memory
    node.wait_ready()
    d = doc("rotting")
    root = node.call("publish", **d)["root"]
    path = node.dir / "store" / f"{root.hex()}.kv"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    buyer = RawBuyer(node)
    try:
        q = buyer.quote(FP, d["blocks"])
        buyer.accept(q)
        stream = buyer.open(q)
        tag, body = read_frame(stream)
        refusal = error_of(body)
        assert tag == FrameTag.CONTROL and refusal.code == ErrorCode.BAD_TOKEN
        assert "content root" in refusal.msg  # told why, not left to wait for an ACCEPT
        stream.close()
        eventually(lambda: root not in roots(node))
        assert not path.exists()
        (dropped,) = node.events("store_dropped")
        assert "content root" in dropped["reason"]
        ledger = Ledger(node.dir / "ledger.db", bytes.fromhex(node.info["node_id"]))
        (deal,) = ledger.audit()
        ledger.close()
        assert "content root" in deal.ended and not deal.receipted
    finally:
        buyer.close()
        node.stop()


def test_metrics_endpoint_and_cli_tables_of_a_running_node(tmp_path):
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    node = NodeProcess(tmp_path / "solo", metrics_port=0).start()
    info = node.wait_ready()
    node.call("publish", **doc("metered"))
    node.call("lookup", fp=FP, blocks=doc("metered")["blocks"], limit=1)
    node.call("lookup", fp=FP, blocks=doc("absent")["blocks"], limit=1)
    with urllib.request.urlopen(info["metrics"], timeout=5) as response:  # 127.0.0.1 only
        text = response.read().decode()
    assert "kvx_ads_known 1.0" in text
    assert "kvx_lookup_hits_total 1.0" in text and "kvx_lookup_misses_total 1.0" in text
    assert 'kvx_peers{state="alive"}' in text
    assert 'kvx_degraded{what="ledger"} 0.0' in text and 'kvx_held{what="replay_entries"}' in text
    kvx = Path(sys.executable).with_name("kvx")
    for verb, expect in (
        ("status", info["node_id"][:16]),
        ("status", "held for peers"),
        ("peers", "peers"),
        ("ads", "advertisements"),
    ):
        out = subprocess.run(
            [str(kvx), verb, "--data-dir", str(node.dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0 and expect in out.stdout, out.stderr
    node.stop()
    gone = subprocess.run(
        [str(kvx), "status", "--data-dir", str(node.dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 2 and "no node is running" in gone.stderr
