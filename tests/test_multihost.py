"""A swarm on four hosts (network namespaces): partitions heal into one view, a seller
killed mid-transfer is replaced by another, a restarted node keeps its store and ledger."""

import json
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
from netns import Network, require_netns
from swarm import NodeProcess, eventually

from kvx.protocol import KVLayout
from kvx.trust import Ledger

pytestmark = pytest.mark.usefixtures("network")
FP = b"\x0f" * 32
SMALL = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)
TIMERS = {
    "heartbeat_s": 0.3,
    "suspect_after_s": 1.5,
    "dead_after_s": 3.0,
    "anti_entropy_s": 1.0,
    "metrics_port": -1,
}


@pytest.fixture
def network():
    require_netns()
    net = Network()
    yield net
    net.close()


@pytest.fixture
def swarm(network, tmp_path):
    nodes = []
    for i in range(1, 5):
        boot = [tmp_path / "h1" / "node.json"] if i > 1 else []
        node = network.node(i, tmp_path / f"h{i}", boot, **TIMERS)
        nodes.append(node.start())
        node.wait_ready()
    for node in nodes:
        eventually(
            lambda node=node: sum(p["state"] == "alive" for p in node.call("peers")["peers"]) == 3,
            30,
        )
    yield nodes
    for node in nodes:
        node.stop()


def publish(
    node: NodeProcess,
    label: str,
    layout: KVLayout = SMALL,
    blocks: int = 2,
    params: int = 1,
    chunk: int = 1 << 16,
) -> tuple[bytes, list[bytes]]:
    chain = [blake3.blake3(f"{label}/{i}".encode()).digest() for i in range(blocks)]
    payload = blake3.blake3(label.encode()).digest(length=layout.payload_bytes(blocks))
    root = node.call(
        "publish",
        fp=FP,
        layout=layout.__dict__,
        blocks=chain,
        payload=payload,
        chunk=chunk,
        params=params,
    )["root"]
    return root, chain


def roots(node: NodeProcess) -> set[bytes]:
    return {bytes.fromhex(a["root"]) for a in node.call("ads")["ads"]}


def states(node: NodeProcess) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in node.call("peers")["peers"]}


def streaming(network: Network, host: int, node: NodeProcess) -> bool:
    """Whether a connection to one of `node`'s data ports is open on `host`: a buyer's
    stream has begun (the throttle keeps it going for seconds)."""
    ports = {d["addr"].rsplit(":", 1)[1] for d in node.info["data"]}
    out = subprocess.run(
        [*network.prefix(host), "ss", "-Htn", "state", "established"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return any(line.split()[2].rsplit(":", 1)[1] in ports for line in out.splitlines())


def test_a_partition_heals_into_one_view(network, swarm):
    ids = [n.info["node_id"] for n in swarm]
    network.cut()
    for mine, theirs in ((swarm[0], ids[2:]), (swarm[2], ids[:2])):
        eventually(
            lambda mine=mine, theirs=theirs: all(states(mine).get(i) == "dead" for i in theirs), 30
        )
    left, _ = publish(swarm[0], "left side")
    right, _ = publish(swarm[2], "right side")
    eventually(lambda: left in roots(swarm[1]) and right in roots(swarm[3]), 30)
    assert left not in roots(swarm[3]) and right not in roots(swarm[0])  # the cut holds

    network.heal()
    for node in swarm:  # everyone alive again and holding the same advertisements
        eventually(lambda node=node: roots(node) == {left, right}, 60)
        eventually(lambda node=node: sum(s == "alive" for s in states(node).values()) == 3, 60)


def test_a_seller_killed_mid_transfer_is_replaced_and_a_restart_keeps_store_and_ledger(
    network, swarm
):
    big = KVLayout(dtype="float16", layers=4, kv_heads=4, head_dim=64, block=128)  # 512 KiB
    slow, other = swarm[0], swarm[1]
    # The same payload on two hosts; the first is cheaper, so the buyer tries it first.
    root, chain = publish(slow, "shared", big, blocks=32, params=10**6, chunk=1 << 20)
    assert publish(other, "shared", big, blocks=32, params=10**9, chunk=1 << 20)[0] == root
    eventually(lambda: root in roots(swarm[3]) and len(swarm[3].call("ads")["ads"]) == 2, 30)
    # Throttle both sellers so that the buyer, streaming half from each (§9.7), takes
    # seconds over it; then kill the cheap one mid-stream.
    for host in (1, 2):
        throttle = subprocess.run(
            [
                *network.prefix(host),
                "tc",
                "qdisc",
                "add",
                "dev",
                f"{network.tag}e{host}",
                "root",
                "tbf",
                "rate",
                "30mbit",
                "burst",
                "64kb",
                "latency",
                "400ms",
            ],
            capture_output=True,
            text=True,
        )
        if throttle.returncode != 0:
            pytest.skip(f"tc tbf is not available here: {throttle.stderr.strip()}")
    buyer = subprocess.Popen(
        [
            *network.prefix(4),
            sys.executable,
            str(Path(__file__).with_name("mh_buyer.py")),
            str(swarm[3].dir),
            FP.hex(),
            ",".join(c.hex() for c in chain),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Kill it once its data port streams to the buyer: not after a fixed wait, which a
    # loaded machine can spend before the buyer has even reached this seller.
    eventually(lambda: streaming(network, 1, slow), 30)
    slow.kill()  # SIGKILL, in the middle of the stream
    out, err = buyer.communicate(timeout=60)
    assert buyer.returncode == 0, err
    result = json.loads(out)
    expected = blake3.blake3(blake3.blake3(b"shared").digest(length=big.payload_bytes(32)))
    assert result["digest"] == expected.hexdigest()  # whole and verified
    assert result["seller"] == other.info["node_id"]
    assert result["faults"] and result["faults"][0] in ("STREAM_TRUNCATED", "TIMEOUT")

    # Kill and restart the seller that completed the sale: its store and ledger survive.
    other_id = bytes.fromhex(other.info["node_id"])
    buyer_id = bytes.fromhex(swarm[3].info["node_id"])
    eventually(lambda: "sold" in (other.dir / "node.log").read_text(), 20)
    other.kill()
    other.start()
    other.wait_ready()
    ledger = Ledger(other.dir / "ledger.db", other_id)
    ledger.verify()
    assert ledger.balances() == {buyer_id: result["price"]}
    ledger.close()
    assert root in roots(other)
    eventually(lambda: root in roots(swarm[3]), 30)


def test_a_node_bound_to_every_interface_is_dialed_at_the_address_it_advertises(network, tmp_path):
    """docs/DEPLOY.md's two-host walkthrough: host 1 binds 0.0.0.0 and advertises its
    own address; host 2 joins through it and buys."""
    seller = NodeProcess(
        tmp_path / "h1",
        prefix=network.prefix(1),
        listen="tcp://0.0.0.0:7000",
        data_host="0.0.0.0",
        advertise=network.address(1),
        **TIMERS,
    ).start()
    buyer = network.node(2, tmp_path / "h2", [tmp_path / "h1" / "node.json"], **TIMERS)
    try:
        info = seller.wait_ready()
        assert info["ctl"] == f"tcp://{network.address(1)}:7000"
        assert [d["addr"].rsplit(":", 1)[0] for d in info["data"]] == [network.address(1)]
        buyer.start().wait_ready()
        root, chain = publish(seller, "everywhere")
        eventually(lambda: root in roots(buyer), 30)
        run = subprocess.run(
            [
                *network.prefix(2),
                sys.executable,
                str(Path(__file__).with_name("mh_buyer.py")),
                str(buyer.dir),
                FP.hex(),
                ",".join(c.hex() for c in chain),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["seller"] == info["node_id"]
    finally:
        buyer.stop()
        seller.stop()
