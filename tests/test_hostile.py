"""A peer that advertises content it does not hold: buyers still get verified KV from an
honest provider, score the liar down, and from then on try the provider that delivered
first and the liar last, however cheap its lie."""

import time

import blake3
from swarm import NodeProcess, TestPeer, eventually

from kvx.p2p import PeerClient
from kvx.protocol import Advertise, DataAddress, Header, Hello, KVLayout
from kvx.trust import Identity, Signer, seal

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32
CHAIN = [blake3.blake3(f"doc/{i}".encode()).digest() for i in range(3)]
PAYLOAD = blake3.blake3(b"doc").digest(length=LAYOUT.payload_bytes(3))


async def test_a_liar_is_scored_down_and_ignored_while_buyers_get_honest_kv(tmp_path):
    honest = NodeProcess(tmp_path / "honest").start()
    honest.wait_ready()
    liar = NodeProcess(tmp_path / "liar", [honest.dir / "node.json"]).start()
    buyer = NodeProcess(tmp_path / "buyer", [honest.dir / "node.json"]).start()
    for node in (liar, buyer):
        node.wait_ready()
    try:
        honest.call(
            "publish",
            fp=FP,
            layout=LAYOUT.__dict__,
            blocks=CHAIN,
            payload=PAYLOAD,
            chunk=1 << 16,
            params=10**9,
        )
        # The liar signs, with its own key, an ad for that chain at price 0: always first.
        liar_key = Identity.load(liar.dir / "node.key")
        now = time.time_ns() // 1_000_000
        lie = Advertise(
            fp=FP,
            layout=LAYOUT,
            blocks=tuple(CHAIN),
            root=bytes(32),
            chunk=1 << 16,
            price=0,
            ctl=liar.info["ctl"],
            data=(DataAddress("tcp", liar.info["data"][0]["addr"]),),
        )
        relay = TestPeer(buyer, Identity.generate())
        relay.send(
            Signer(relay.identity).seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now, to=relay.node_id
            )
        )
        assert relay.recv() is not None  # connected: what follows is not lost on close
        relay.send(seal(liar_key, lie, Header(iat=now, exp=now + 600_000, seq=now * 1000)))
        time.sleep(0.2)
        relay.close()
        eventually(lambda: len(buyer.call("ads")["ads"]) == 2)

        liar_id = liar.info["node_id"]
        honest_id = bytes.fromhex(honest.info["node_id"])
        client = PeerClient(buyer.dir, timeout_s=5)
        faults = []
        for _ in range(3):
            bought = await client.fetch(FP, CHAIN, params=10**9)
            assert bytes(bought.tensor.numpy()) == PAYLOAD  # always the honest bytes
            assert bought.seller == honest_id
            faults.append([f.provider.hex() for f in bought.faults])
        assert faults == [[liar_id], [], []]  # tried once, then no more
        assert peer(buyer, liar_id)["score"] < 0 < peer(buyer, honest.info["node_id"])["score"]
        matched, ads = await client.lookup(FP, CHAIN)
        await client.close()
        assert matched == 3 and ads[0].signer_id == honest_id  # the liar: last
    finally:
        for node in (buyer, liar, honest):
            node.stop()


def peer(node: NodeProcess, node_id: str) -> dict:
    return next(p for p in node.call("peers")["peers"] if p["node_id"] == node_id)
