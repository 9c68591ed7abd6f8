"""A node process against unknown, banned, flooding and lying peers."""

import time

import msgpack
import pytest
from swarm import NodeProcess, TestPeer, eventually

from kvx.protocol import (
    MAX_CHAIN_BLOCKS,
    MAX_FRAME_BYTES,
    Advertise,
    DataAddress,
    ErrorCode,
    Header,
    Hello,
    KVLayout,
    Lookup,
    LookupResult,
    Peers,
    encode_body,
    encode_envelope,
    signing_input,
)
from kvx.trust import Identity, Signer, seal

LAYOUT = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)


def now() -> int:
    return time.time_ns() // 1_000_000


def hello(peer: TestPeer) -> Hello:
    return Hello(ctl="tcp://127.0.0.1:1", data=(), inc=1)


def advert(blocks: int = 1, tag: bytes = b"\x01") -> Advertise:
    return Advertise(
        fp=b"\x0f" * 32,
        layout=LAYOUT,
        blocks=tuple([tag * 32] * blocks),
        root=tag * 32,
        chunk=1 << 16,
        price=1,
        ctl="tcp://127.0.0.1:1",
        data=(DataAddress("tcp", "127.0.0.1:2"),),
    )


def lookup(peer: TestPeer, signer: Signer):
    peer.send(
        signer.seal(
            Lookup(fp=b"\x0f" * 32, blocks=(b"\x01" * 32,), limit=1), now_ms=now(), to=peer.node_id
        )
    )
    return peer.recv()


def join(peer: TestPeer, signer: Signer) -> None:
    peer.send(signer.seal(hello(peer), now_ms=now(), to=peer.node_id))
    answer = peer.recv()
    assert isinstance(answer.message, Peers)


def score_of(node: NodeProcess, identity: Identity) -> float:
    rows = {p["node_id"]: p["score"] for p in node.call("peers")["peers"]}
    return rows.get(identity.node_id.hex(), 0.0)


def test_a_peer_not_on_the_allow_list_is_denied(node, peers, tmp_path):
    friend = Identity.generate()
    n = node()
    (n.dir / "node.toml").write_text(
        (n.dir / "node.toml").read_text() + f'\n[policy]\nallow = ["{friend.node_id.hex()}"]\n'
    )
    n.stop()
    n.start()
    n.wait_ready()
    stranger, signer = peers(n)
    stranger.send(signer.seal(hello(stranger), now_ms=now(), to=stranger.node_id))
    answer = stranger.recv()
    assert answer.message.code == ErrorCode.DENIED
    good, good_signer = peers(n, friend)
    join(good, good_signer)


def test_a_banned_peer_is_ignored_and_others_are_served(node, peers):
    n = node()
    bad, bad_signer = peers(n)
    join(bad, bad_signer)
    env = encode_envelope  # forge: a valid body under a signature of zeros
    body = encode_body(Header(iat=now(), exp=now() + 10_000, seq=1, to=bad.node_id), hello(bad))
    for _ in range(4):  # four forgeries: -80, below the -50 threshold
        bad.send(env(hello(bad).TYPE, body, bad.identity.public_key, bytes(64)))
        time.sleep(0.05)
    eventually(lambda: score_of(n, bad.identity) <= -50)
    assert lookup(bad, bad_signer) is None  # silence for the banned
    good, good_signer = peers(n)
    join(good, good_signer)
    assert isinstance(lookup(good, good_signer).message, LookupResult)


def test_a_flood_is_dropped_and_others_are_still_served(node, peers):
    n = node(rate_per_s=50.0, burst=50)
    flooder, flood_signer = peers(n)
    join(flooder, flood_signer)
    good, good_signer = peers(n)
    join(good, good_signer)
    for _ in range(1000):
        flooder.send(flood_signer.seal(hello(flooder), now_ms=now(), to=flooder.node_id))
    answers = 0
    while flooder.recv(timeout=1.0) is not None:
        answers += 1
    assert answers < 200  # most of the flood was dropped unanswered
    assert isinstance(lookup(good, good_signer).message, LookupResult)
    # Flow control, not blame (§12.6): valid statements over the rate are dropped, and
    # their sender is not scored, since an honest relay may run over as well.
    assert n.call("status")["rejected"]["RATE_LIMITED"] > 800
    assert score_of(n, flooder.identity) == 0


@pytest.mark.parametrize("lie", ["bad signature", "expired", "replayed", "too many blocks"])
def test_a_lying_advertisement_is_dropped_and_a_faulty_one_scored_down(node, peers, lie):
    n = node()
    peer, signer = peers(n)
    join(peer, signer)
    ad = advert(tag=b"\x07")
    if lie == "bad signature":
        body = encode_body(Header(iat=now(), exp=now() + 60_000, seq=5), ad)
        frames = [encode_envelope(ad.TYPE, body, peer.identity.public_key, bytes(64))]
    elif lie == "expired":
        frames = [seal(peer.identity, ad, Header(iat=now() - 200_000, exp=now() - 100_000, seq=5))]
    elif lie == "replayed":
        frame = signer.seal(ad, now_ms=now(), ttl_ms=60_000)
        frames = [frame, frame]  # the first is accepted, the second is a replay
    else:  # one block over MAX_CHAIN_BLOCKS, correctly signed
        fields = msgpack.unpackb(encode_body(Header(iat=now(), exp=now() + 60_000, seq=5), ad))
        fields["blocks"] = [b"\x07" * 32] * (MAX_CHAIN_BLOCKS + 1)
        body = msgpack.packb(fields, use_bin_type=True)
        sig = peer.identity.sign(signing_input(ad.TYPE, body))
        frames = [encode_envelope(ad.TYPE, body, peer.identity.public_key, sig)]
    for frame in frames:
        peer.send(frame)
    if lie == "replayed":
        # A relayed statement seen twice is a duplicate whoever sends it (spec §6.3):
        # indexed once, and counted against nobody.
        eventually(lambda: len(n.call("ads")["ads"]) == 1)
        time.sleep(0.3)
        assert len(n.call("ads")["ads"]) == 1 and score_of(n, peer.identity) == 0
        return
    eventually(lambda: score_of(n, peer.identity) < 0)
    assert n.call("ads")["ads"] == []


def test_an_oversized_frame_is_never_read_and_the_node_keeps_serving(node, peers):
    n = node()
    peer, signer = peers(n)
    join(peer, signer)
    peer.send(b"\x00" * (MAX_FRAME_BYTES + 1))
    time.sleep(0.3)
    # libzmq dropped that connection; the DEALER reconnects and is served again.
    assert isinstance(eventually(lambda: lookup(peer, signer), timeout=10).message, LookupResult)
