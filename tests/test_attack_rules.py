"""The rules that hold off hostile peers' frames (spec §12.6), against a node core in
memory (tests/pair.py): every case of a class, in milliseconds. tests/test_attacks.py
sends one case of each class to a node process.
"""

import blake3
import pytest
from pair import HELLO, Pair

from kvx.conformance.fuzz import signed_with
from kvx.p2p import PublishRequest
from kvx.p2p._dials import Connect
from kvx.p2p._outbox import Reply, Send
from kvx.protocol import (
    Advertise,
    DataAddress,
    Digest,
    DigestEntry,
    Error,
    ErrorCode,
    Header,
    KVLayout,
    Lookup,
    LookupResult,
    Namespace,
    Peers,
    Probe,
    ProbeAck,
    prefix_chain,
)
from kvx.trust import NamespaceRule, Policy, open_envelope, seal

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32
CHAIN = tuple(blake3.blake3(f"doc/{i}".encode()).digest() for i in range(3))
PAYLOAD = blake3.blake3(b"doc").digest(length=LAYOUT.payload_bytes(3))


def direct(pair: Pair, ttl_ms: int = 60_000) -> Header:
    t = pair.now_ms()
    return Header(iat=t, exp=t + ttl_ms, seq=t * 1000, to=pair.core().id)


def relayable(pair: Pair, ttl_ms: int = 600_000, seq: int = 1) -> Header:
    t = pair.now_ms()
    return Header(iat=t, exp=t + ttl_ms, seq=t * 1000 + seq)


def advert(root: bytes = b"\x01" * 32, **over: object) -> Advertise:
    fields = {
        "fp": FP,
        "layout": LAYOUT,
        "blocks": CHAIN[:1],
        "root": root,
        "chunk": 1 << 16,
        "price": 1,
        "ctl": "tcp://127.0.0.1:1",
        "data": (DataAddress("tcp", "127.0.0.1:2"),),
        **over,
    }
    return Advertise(**fields)


# ---- 1. one signed frame must not stop a node ---------------------------------------


@pytest.mark.parametrize(
    "ctl",
    [
        "x",
        "tcp://host",
        "tcp://127.0.0.1:99999",
        "udp://1.2.3.4:5",
        "tcp://0.0.0.0:7",
        "tcp://localhost:7",
        "tcp://[::1]7",
    ],
)
def test_a_bad_address_in_any_signed_message_is_refused_at_decode(ctl):
    with Pair() as pair:
        peer = pair.stranger()
        [answer] = pair.send(peer, signed_with(peer.identity, HELLO, {"ctl": ctl}, direct(pair)))
        assert isinstance(answer, Error) and answer.code == ErrorCode.INVALID_FIELD
        # The same address in a PEERS entry and in a gossiped ADVERTISE: dropped, and
        # nothing is dialed.
        entry = {"key": pair.stranger().identity.public_key, "ctl": ctl, "inc": 1, "state": 0}
        dialed = []
        for frame in (
            signed_with(peer.identity, Peers(peers=()), {"peers": [entry]}, direct(pair)),
            signed_with(peer.identity, advert(), {"ctl": ctl}, relayable(pair)),
        ):
            pair.send(peer, frame)
            dialed += [o for o in pair.outputs if isinstance(o, Connect)]
        pair.advance(2.0)
        assert dialed == [] and pair.core().gossip.index.ads() == []
        assert pair.welcomed(pair.stranger())


def test_a_lookup_whose_chain_overlaps_an_ad_at_another_position_is_a_miss():
    with Pair() as pair:
        pair.publish(PublishRequest(FP, LAYOUT, CHAIN, PAYLOAD, 10**9))
        # The ad holds CHAIN[0] at position 0; this chain holds it at position 1.
        lookup = Lookup(fp=FP, blocks=(b"\x77" * 32, CHAIN[0]), limit=4)
        answer = pair.ask(pair.stranger(), lookup)
        assert isinstance(answer, LookupResult) and answer.matched == 0
        whole = pair.ask(pair.stranger(), Lookup(fp=FP, blocks=CHAIN, limit=4))
        assert isinstance(whole, LookupResult) and whole.matched == 3


def test_a_body_of_a_hundred_thousand_keys_is_refused_cheaply():
    with Pair() as pair:
        peer = pair.stranger()
        keys = {f"k{i}": 0 for i in range(100_000)}
        [answer] = pair.send(peer, signed_with(peer.identity, HELLO, keys, direct(pair)))
        assert isinstance(answer, Error) and answer.code == ErrorCode.MALFORMED
        assert pair.welcomed(pair.stranger())


# ---- 2. memory is budgeted per signer and in total ----------------------------------


def test_ballast_in_unknown_fields_and_ads_beyond_a_signers_budget_are_refused():
    with Pair(max_ads_per_signer=4) as pair:
        peer, honest = pair.stranger(), pair.stranger()
        ballast = {"pad": b"\0" * 5000}  # over MAX_UNKNOWN_BYTES of fields nobody defined
        pair.send(peer, signed_with(peer.identity, advert(), ballast, relayable(pair)))
        assert pair.core().gossip.index.ads() == []
        for i in range(8):  # twice its budget of distinct ads
            ad = advert(root=bytes([i + 10]) * 32)
            pair.send(peer, seal(peer.identity, ad, relayable(pair, seq=i)))
        pair.send(honest, seal(honest.identity, advert(root=b"\x55" * 32), relayable(pair)))
        signers = [a.signer for a in pair.core().gossip.index.ads()]
        assert signers.count(peer.identity.public_key) == 4
        assert honest.identity.public_key in signers  # one stranger's budget is its own
        assert pair.welcomed(pair.stranger())


# ---- 3. no stranger can starve honest peers ------------------------------------------


def test_a_full_replay_memory_refuses_nobody_and_blames_nobody():
    with Pair(replay_total=200) as pair:
        flooder, honest = pair.stranger(), pair.stranger()
        for _ in range(400):  # long-lived statements, all remembered; within the rate
            pair.roundtrip(flooder, HELLO, ttl_ms=300_000)
            pair.advance(0.01)
        assert pair.welcomed(honest)
        held = pair.core().held()
        assert held["replay_entries"] <= 200 and held["replay_forgotten"] > 0
        assert pair.score(honest.node_id) == 0 and pair.score(flooder.node_id) == 0


# ---- 5. private namespaces ----------------------------------------------------------


def test_outsiders_learn_nothing_of_a_private_namespace():
    team = Namespace(blake3.blake3(b"team").digest())
    rules = (NamespaceRule("team", team),)
    with Pair(policy=Policy(namespaces=rules)) as pair:
        chain = prefix_chain(FP, list(range(3 * LAYOUT.block)), LAYOUT.block, team)
        pair.publish(PublishRequest(FP, LAYOUT, chain, PAYLOAD, 10**9, ns=team.id))
        pair.advance(1.0)
        outsider = pair.stranger()
        # HELLO, then a DIGEST that claims to hold something: the node's own DIGEST to the
        # newcomer lists nothing private, and no private ADVERTISE goes out.
        said = []
        for message in (HELLO, Digest(have=(DigestEntry(key=b"\x01" * 32, seq=1),))):
            pair.roundtrip(outsider, message)
            frames = [o.frame for o in pair.outputs if isinstance(o, (Reply, Send))]
            said += [open_envelope(f).message for f in frames]
        digests = [m for m in said if isinstance(m, Digest)]
        assert digests and all(d.have == () for d in digests)
        assert not any(isinstance(m, Advertise) for m in said)
        # LOOKUP: the same answer for a namespace the node is in and for one it is not.
        answers = [
            pair.ask(outsider, Lookup(fp=FP, blocks=tuple(chain), limit=4, ns=ns))
            for ns in (team.id, b"\x99" * 32)
        ]
        assert [(a.matched, a.ads) for a in answers] == [(0, ()), (0, ())]
        # ADVERTISE into the namespace by a non-member: not indexed.
        ad = advert(root=b"\x02" * 32, blocks=tuple(chain), price=0, ns=team.id)
        pair.send(outsider, seal(outsider.identity, ad, relayable(pair)))
        assert len(pair.core().gossip.index.ads()) == 1  # only the seller's own
        assert pair.welcomed(pair.stranger())


def test_a_stranger_probing_a_member_through_a_member_learns_no_private_news():
    team = Namespace(blake3.blake3(b"team").digest())
    with Pair(policy=Policy(namespaces=(NamespaceRule("team", team),))) as pair:
        seller, agent = pair.cores  # both members
        pair.advance(2.0)  # they prove it to each other
        chain = prefix_chain(FP, list(range(3 * LAYOUT.block)), LAYOUT.block, team)
        pair.publish(PublishRequest(FP, LAYOUT, chain, PAYLOAD, 10**6, ns=team.id))
        pair.advance(1.0)
        private = {(a.signer, a.seq) for a in agent.gossip.index.ads()}
        assert len(private) == 1  # news the seller tells members
        stranger, proofs = pair.stranger(), []
        for _ in range(12):  # past the 10 s the news stays in the seller's PEERS to members
            said = pair.roundtrip(stranger, Probe(target=seller.identity.public_key), to=1)
            pair.advance(1.0)
            said += pair.answers(stranger)
            proofs += [open_envelope(m.proof) for m in said if isinstance(m, ProbeAck)]
        assert proofs  # the agent vouches for the seller, and with what names nothing private
        for proof in proofs:
            recent = getattr(proof.message, "recent", None) or ()
            assert not {(e.key, e.seq) for e in recent} & private, proof.type.name


# ---- honest volume is no flood (spec §8.7, §12.6) ------------------------------------

BUSY = {"rate_per_s": 1e6, "burst": 10**6}  # a node that takes a test's ads at once


def flood(pair: Pair, count: int, signers: int) -> int:
    """Core 0 takes `count` valid ADVERTISEs of `signers` strangers, each of its own
    chain, from a peer that relays them; returns how many it holds."""
    relayer, keys = pair.stranger(), [pair.stranger().identity for _ in range(signers)]
    for i in range(count):
        block = blake3.blake3(f"flood/{i}".encode()).digest()
        ad = advert(root=block, blocks=(block,))
        pair.send(relayer, seal(keys[i % signers], ad, relayable(pair, seq=i)))
    return len(pair.core(0).gossip.index)


def spread_without_blame(pair: Pair, count: int) -> None:
    """Within 90 simulated seconds core 1 holds all `count` ads, and core 0, which they
    came from, was never scored below 0 by it, nor banned."""
    source, receiver = pair.core(0).id, pair.core(1)
    for _ in range(90):
        pair.advance(1.0)
        assert pair.score(source, by=1) >= 0 and not pair.banned(source, by=1)
        if len(receiver.gossip.index) == count:
            return
    raise AssertionError(f"{len(receiver.gossip.index)} of {count} ads arrived in 90 s")


def test_a_node_joining_a_peer_with_thousands_of_ads_gets_them_all_and_bans_nobody():
    """The joiner's first DIGEST used to bring back every ad at once; its rate limit
    scored the honest holder as a flooder and banned it within seconds."""
    with Pair(own={0: BUSY}) as pair:  # the joiner keeps the default limits
        pair.sim.crash(1)  # not yet there
        assert flood(pair, 2500, signers=2) == 2500
        pair.sim.restart(1, known=1)
        spread_without_blame(pair, 2500)
        # Paced: the holder answered in pages, so the joiner's limit dropped almost nothing.
        assert pair.metrics[1].value("kvx_rejections_total", code="RATE_LIMITED") < 100
        assert pair.sim.traffic.frames["DIGEST"] >= 2500 // 200  # pulled page by page


def test_a_relay_pushing_thousands_of_strangers_ads_is_never_banned():
    """A node that takes thousands of valid ads at once pushes them on at the pace its
    neighbour accepts; the neighbour pulls the rest and bans nobody."""
    with Pair(own={0: BUSY}) as pair:
        pair.advance(2.0)
        assert flood(pair, 3000, signers=3) == 3000
        spread_without_blame(pair, 3000)
        assert pair.metrics[0].value("kvx_shed_total", what="push") > 0  # paced, not at once
