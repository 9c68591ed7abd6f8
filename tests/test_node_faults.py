"""A node core against unknown, banned, flooding and lying peers (in memory, tests/pair.py),
and a node process against a frame too large to read."""

import time

import msgpack
import pytest
from pair import Pair
from swarm import eventually

from kvx.protocol import (
    MAX_CHAIN_BLOCKS,
    MAX_FRAME_BYTES,
    Advertise,
    DataAddress,
    Error,
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
from kvx.trust import Identity, Policy, seal

LAYOUT = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)


def hello() -> Hello:
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


LOOKUP = Lookup(fp=b"\x0f" * 32, blocks=(b"\x01" * 32,), limit=1)


def rejected(pair: Pair, code: ErrorCode) -> float:
    return pair.metrics[0].value("kvx_rejections_total", code=code.name)


def test_a_peer_not_on_the_allow_list_is_denied():
    friend = Identity.generate()
    with Pair(policy=Policy(allow=frozenset({friend.node_id}))) as pair:
        [answer] = pair.roundtrip(pair.stranger(), hello())
        assert isinstance(answer, Error) and answer.code == ErrorCode.DENIED
        assert pair.welcomed(pair.stranger(friend))


def test_a_banned_peer_is_ignored_and_others_are_served():
    with Pair() as pair:
        bad = pair.stranger()
        assert pair.welcomed(bad)
        now = pair.now_ms()
        # Forged: a valid body under a signature of zeros.
        body = encode_body(Header(iat=now, exp=now + 10_000, seq=1, to=pair.core().id), hello())
        for _ in range(4):  # four forgeries: -80, below the -50 threshold
            pair.send(bad, encode_envelope(Hello.TYPE, body, bad.identity.public_key, bytes(64)))
        assert pair.score(bad.node_id) <= -50
        assert pair.roundtrip(bad, LOOKUP) == []  # silence for the banned
        good = pair.stranger()
        assert pair.welcomed(good)
        assert isinstance(pair.ask(good, LOOKUP), LookupResult)


def test_a_flood_is_dropped_and_others_are_still_served():
    with Pair(rate_per_s=50.0, burst=50) as pair:
        flooder, good = pair.stranger(), pair.stranger()
        assert pair.welcomed(flooder) and pair.welcomed(good)
        answers = sum(len(pair.roundtrip(flooder, hello())) for _ in range(1000))
        assert answers <= 50  # the burst, and then nothing: the clock stands still
        assert isinstance(pair.ask(good, LOOKUP), LookupResult)
        # Flow control, not blame (§12.6): valid statements over the rate are dropped, and
        # their sender is not scored, since an honest relay may run over as well.
        assert rejected(pair, ErrorCode.RATE_LIMITED) >= 950
        assert pair.score(flooder.node_id) == 0
        pair.advance(1.0)  # the bucket refills at the rate
        assert pair.welcomed(flooder)


@pytest.mark.parametrize("lie", ["bad signature", "expired", "replayed", "too many blocks"])
def test_a_lying_advertisement_is_dropped_and_a_faulty_one_scored_down(lie):
    with Pair() as pair:
        peer = pair.stranger()
        assert pair.welcomed(peer)
        ad, now = advert(tag=b"\x07"), pair.now_ms()
        if lie == "bad signature":
            body = encode_body(Header(iat=now, exp=now + 60_000, seq=5), ad)
            frames = [encode_envelope(ad.TYPE, body, peer.identity.public_key, bytes(64))]
        elif lie == "expired":
            header = Header(iat=now - 200_000, exp=now - 100_000, seq=5)
            frames = [seal(peer.identity, ad, header)]
        elif lie == "replayed":
            frame = peer.signer.seal(ad, now_ms=now, ttl_ms=60_000)
            frames = [frame, frame]  # the first is accepted, the second is a replay
        else:  # one block over MAX_CHAIN_BLOCKS, correctly signed
            fields = msgpack.unpackb(encode_body(Header(iat=now, exp=now + 60_000, seq=5), ad))
            fields["blocks"] = [b"\x07" * 32] * (MAX_CHAIN_BLOCKS + 1)
            body = msgpack.packb(fields, use_bin_type=True)
            sig = peer.identity.sign(signing_input(ad.TYPE, body))
            frames = [encode_envelope(ad.TYPE, body, peer.identity.public_key, sig)]
        for frame in frames:
            pair.send(peer, frame)
        ads = pair.core().gossip.index.ads()
        if lie == "replayed":
            # A relayed statement seen twice is a duplicate whoever sends it (spec §6.3):
            # indexed once, and counted against nobody.
            assert len(ads) == 1 and pair.score(peer.node_id) == 0
            return
        assert pair.score(peer.node_id) < 0 and ads == []


def test_an_oversized_frame_is_never_read_and_the_node_keeps_serving(node, peers):
    n = node()
    peer, signer = peers(n)

    def ask(message):
        now = time.time_ns() // 1_000_000
        peer.send(signer.seal(message, now_ms=now, to=peer.node_id))
        return peer.recv()

    assert isinstance(ask(hello()).message, Peers)
    peer.send(b"\x00" * (MAX_FRAME_BYTES + 1))
    time.sleep(0.3)
    # libzmq dropped that connection; the DEALER reconnects and is served again.
    assert isinstance(eventually(lambda: ask(LOOKUP), timeout=10).message, LookupResult)
