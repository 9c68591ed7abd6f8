"""A private namespace end to end: members prove themselves and trade; outsiders see and
buy nothing."""

import time

import blake3
import pytest
from swarm import NodeProcess, TestPeer, eventually

from kvx.p2p import PeerClient
from kvx.protocol import Error, ErrorCode, KVLayout, Namespace, QuoteRequest, prefix_chain
from kvx.trust import Identity, Signer, write_private

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32
SECRET = blake3.blake3(b"team secret").digest()
TEAM = Namespace(SECRET)
TOKENS = list(range(3 * LAYOUT.block))


@pytest.fixture
def nodes(tmp_path):
    write_private(tmp_path / "team.ns", SECRET.hex(), "namespace secret")
    member = f'\n[[namespace]]\nname = "team"\nsecret_file = "{tmp_path / "team.ns"}"\n'
    seller = NodeProcess(tmp_path / "seller", tables=member).start()
    seller.wait_ready()
    agent = NodeProcess(tmp_path / "agent", [seller.dir / "node.json"], tables=member).start()
    outsider = NodeProcess(tmp_path / "outsider", [seller.dir / "node.json"]).start()
    for node in (agent, outsider):
        node.wait_ready()
    yield seller, agent, outsider
    for node in (outsider, agent, seller):
        node.stop()


async def test_members_trade_and_outsiders_get_nothing(nodes):
    seller, agent, outsider = nodes
    chain = prefix_chain(FP, TOKENS, LAYOUT.block, TEAM)
    client = PeerClient(seller.dir)
    await client.publish(
        fp=FP,
        layout=LAYOUT,
        blocks=chain,
        ns=TEAM.id,
        params=10**6,
        payload=bytes(LAYOUT.payload_bytes(3)),
        chunk=1 << 16,
    )
    await client.close()

    eventually(lambda: len(agent.call("ads")["ads"]) == 1)  # gossiped to the member
    buyer = PeerClient(agent.dir)
    bought = await buyer.fetch(FP, chain, params=10**6, namespace=TEAM)
    await buyer.close()
    assert bought.blocks == 3

    # The outsider, though connected to the seller all along, never received the ad ...
    eventually(lambda: any(p["state"] == "alive" for p in outsider.call("peers")["peers"]))
    time.sleep(1.5)  # several gossip and anti-entropy rounds
    assert outsider.call("ads")["ads"] == []
    # ... and a request naming the namespace, without a proof, gets the answer a namespace
    # the seller is not in would get: no oracle for who belongs to it.
    peer = TestPeer(seller, Identity.generate())
    signer = Signer(peer.identity)
    peer.send(
        signer.seal(
            QuoteRequest(
                fp=FP, blocks=tuple(chain), transports=("tcp",), max_price=10**9, ns=TEAM.id
            ),
            now_ms=time.time_ns() // 1_000_000,
            to=peer.node_id,
        )
    )
    answer = peer.recv()
    assert isinstance(answer.message, Error) and answer.message.code == ErrorCode.NOT_FOUND
    peer.send(
        signer.seal(
            QuoteRequest(
                fp=FP, blocks=tuple(chain), transports=("tcp",), max_price=10**9, ns=b"\x99" * 32
            ),
            now_ms=time.time_ns() // 1_000_000,
            to=peer.node_id,
        )
    )
    other = peer.recv()
    peer.close()
    assert (other.message.code, other.message.msg) == (answer.message.code, answer.message.msg)
