"""A private namespace end to end: members prove themselves and trade; outsiders see and
buy nothing."""

import time

import blake3
import pytest
from swarm import NodeProcess, TestPeer, eventually
from tap import Tap, can_tap, pieces

from kvx.p2p import PeerClient
from kvx.protocol import (
    Error,
    ErrorCode,
    KVLayout,
    Namespace,
    QuoteRequest,
    prefix_chain,
)
from kvx.trust import Identity, Signer, write_private

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32
SECRET = blake3.blake3(b"team secret").digest()
TEAM = Namespace(SECRET)
TOKENS = list(range(3 * LAYOUT.block))


def now() -> int:
    return time.time_ns() // 1_000_000


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

    # The outsider, though connected to the seller all along, never received the ad: a
    # public one published after it reaches the outsider, and it alone ...
    client = PeerClient(seller.dir)
    other_fp = b"\x0e" * 32  # nothing the private ad's checks below could meet
    public = await client.publish(
        fp=other_fp,
        layout=LAYOUT,
        blocks=prefix_chain(other_fp, TOKENS, LAYOUT.block),
        params=10**6,
        payload=b"\x01" * LAYOUT.payload_bytes(3),
        chunk=1 << 16,
    )
    await client.close()
    eventually(lambda: len(outsider.call("ads")["ads"]) == 1)
    assert [a["root"] for a in outsider.call("ads")["ads"]] == [public.hex()]
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
    assert (other.message.code, other.message.msg) == (answer.message.code, answer.message.msg)
    # A public request for the private KV's fingerprint is answered as for a fingerprint
    # nobody holds: what a namespace holds does not show through another (§10.2).
    codes = []
    for fp in (FP, b"\x77" * 32):
        peer.send(
            signer.seal(
                QuoteRequest(fp=fp, blocks=tuple(chain), transports=("tcp",), max_price=10**9),
                now_ms=time.time_ns() // 1_000_000,
                to=peer.node_id,
            )
        )
        codes.append(peer.recv().message.code)
    peer.close()
    assert codes == [ErrorCode.FINGERPRINT_MISMATCH] * 2


BIG_LAYOUT = KVLayout(dtype="float16", layers=4, kv_heads=4, head_dim=64, block=32)
BIG_TOKENS = list(range(3 * BIG_LAYOUT.block))


@pytest.mark.skipif(not can_tap(), reason="a tap on loopback needs root (AF_PACKET)")
@pytest.mark.parametrize(
    ("private", "seal_public", "in_clear"),
    [(True, False, False), (False, True, False), (False, False, True)],
    ids=["private", "public, sealed on request", "public, in clear: the tap sees it"],
)
async def test_a_sealed_payload_never_crosses_the_wire_in_clear(
    nodes, private, seal_public, in_clear
):
    seller, agent, _ = nodes
    ns = TEAM if private else None
    chain = prefix_chain(FP, BIG_TOKENS, BIG_LAYOUT.block, *([ns] if private else []))
    payload = blake3.blake3(b"a team document's KV").digest(length=BIG_LAYOUT.payload_bytes(3))
    client = PeerClient(seller.dir)
    await client.publish(
        fp=FP,
        layout=BIG_LAYOUT,
        blocks=chain,
        ns=None if ns is None else ns.id,
        params=10**6,
        payload=payload,
        chunk=1 << 16,
    )
    await client.close()
    eventually(lambda: len(agent.call("ads")["ads"]) == 1)
    buyer = PeerClient(agent.dir, seal=seal_public)
    with Tap() as tap:
        bought = await buyer.fetch(FP, chain, params=10**6, namespace=ns)
        seen = tap.close()
    await buyer.close()
    assert bytes(bought.tensor.numpy()) == payload
    found = [piece for piece in pieces(payload) if piece in seen]
    if in_clear:  # the tap sees the data path: so the cases above can fail
        assert len(found) > len(pieces(payload)) // 2
    else:
        assert found == []
