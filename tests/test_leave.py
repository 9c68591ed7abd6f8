"""A node stopped on purpose says LEAVE (spec §8.22): its peers drop it and its
advertisements at once, take it back when it returns, and a rolling restart of every
seller under a steady buyer loses no purchase."""

import socket
import threading

import blake3
import pytest
from swarm import NodeProcess, eventually

from kvx.p2p import Miss, SyncPeerClient
from kvx.protocol import KVLayout
from kvx.trust import Identity

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0e" * 32
CHAIN = [blake3.blake3(f"leave/{i}".encode()).digest() for i in range(4)]
PAYLOAD = blake3.blake3(b"leave").digest(length=LAYOUT.payload_bytes(len(CHAIN)))
SLOW_TO_SUSPECT = {"suspect_after_s": 60.0, "dead_after_s": 120.0}  # only LEAVE can say it


def publish(node: NodeProcess) -> None:
    node.call(
        "publish",
        fp=FP,
        layout=LAYOUT.__dict__,
        blocks=CHAIN,
        payload=PAYLOAD,
        chunk=1 << 16,
        params=10**9,
    )


def view(node: NodeProcess, of: NodeProcess) -> tuple[str, int]:
    """`of`'s state in `node`'s peer table, and how many of its ads `node` holds."""
    key = Identity.load(of.dir / "node.key")
    state = next(
        (p["state"] for p in node.call("peers")["peers"] if p["node_id"] == key.node_id.hex()),
        "-",
    )
    ads = sum(a["signer"] == key.node_id.hex() for a in node.call("ads")["ads"])
    return state, ads


@pytest.fixture
def pair(tmp_path):
    a = NodeProcess(tmp_path / "a", **SLOW_TO_SUSPECT).start()
    a.wait_ready()
    b = NodeProcess(tmp_path / "b", [a.dir / "node.json"], **SLOW_TO_SUSPECT).start()
    b.wait_ready()
    yield a, b
    b.stop()
    a.stop()


def test_a_node_stopped_on_purpose_is_dropped_at_once_and_taken_back_when_it_returns(pair):
    a, b = pair
    publish(b)
    eventually(lambda: view(a, b) == ("alive", 1), 30)
    assert b.stop() == 0
    # Suspicion would take a minute here: only the LEAVE can have said it.
    eventually(lambda: view(a, b) == ("left", 0), 10)
    assert "peer_left" in (a.dir / "node.log").read_text()
    b.start()
    b.wait_ready()
    eventually(lambda: view(a, b) == ("alive", 1), 30)


def test_a_leaving_node_sends_no_sign_of_life_while_its_streams_finish(pair):
    a, b = pair
    eventually(lambda: view(a, b)[0] == "alive", 30)
    assert b.stop() == 0
    eventually(lambda: view(a, b)[0] == "left", 10)
    log = (a.dir / "node.log").read_text()
    after = log[log.index('"peer_left"') :]
    assert '"peer_back"' not in after and '"peer_joined"' not in after


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rolling_restart_of_every_seller_loses_no_purchase(tmp_path):
    # Fixed ports, as on a fleet: a node restarts where its peers knew it.
    first = NodeProcess(tmp_path / "s0", listen=f"tcp://127.0.0.1:{free_port()}").start()
    first.wait_ready()
    sellers = [first] + [
        NodeProcess(
            tmp_path / f"s{i}", [first.dir / "node.json"], listen=f"tcp://127.0.0.1:{free_port()}"
        ).start()
        for i in (1, 2)
    ]
    buyer_node = NodeProcess(tmp_path / "buyer", [first.dir / "node.json"]).start()
    for node in [*sellers, buyer_node]:
        node.wait_ready()
    for seller in sellers:
        publish(seller)
    bought: list[bytes] = []
    missed: list[str] = []
    stop = threading.Event()

    def providers() -> int:
        return len({a["signer"] for a in buyer_node.call("ads")["ads"]})

    def buy() -> None:
        client = SyncPeerClient(buyer_node.dir, timeout_s=10.0)
        try:
            while not stop.is_set():
                try:
                    got = client.fetch(FP, CHAIN, params=10**9)
                    bought.append(bytes(got.tensor.numpy()))
                except Miss as exc:
                    missed.append(str(exc))
        finally:
            client.close()

    try:
        eventually(lambda: providers() == 3, 30)
        buying = threading.Thread(target=buy)
        buying.start()
        try:
            for seller in sellers:
                before = len(bought)
                assert seller.stop() == 0
                seller.start()
                seller.wait_ready()
                eventually(lambda n=before: providers() == 3 and len(bought) > n + 2, 60)
        finally:
            stop.set()
            buying.join()
        assert missed == []
        assert len(bought) > 6 and set(bought) == {PAYLOAD}
    finally:
        for node in [buyer_node, *sellers]:
            node.stop()
