"""Fraud proofs (spec §8.19-8.21): evidence that binds a seller to KV its fingerprint
refutes, checked in memory; then, against node processes, a third node that never
bought from the liar convicts it from the proof alone, a node without the weights acts
on nothing, and a false accusation convicts its accuser."""

import dataclasses
import struct
import time
from pathlib import Path

import liars
import pytest
import torch
from swarm import NodeProcess, TestPeer, eventually

pytest.importorskip("transformers", reason="the hf extra is not installed")
from tiny import tiny_llama
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from kvx.integrations import hf
from kvx.integrations.verify import judge
from kvx.p2p import PeerClient
from kvx.protocol import (
    Accuse,
    Advertise,
    DataAddress,
    ErrorCode,
    EvidencePart,
    EvidenceRequest,
    Hello,
    RemoteProtocolError,
    chunk_hashes,
    content_root,
    prefix_chain,
)
from kvx.trust import Evidence, Identity, Signer, bind, covering_chunks, evidence_id

BLOCK = 16
TOKENS = 6 * BLOCK


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("judge-model")
    vocab = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(256)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="w0").save_pretrained(where)
    tiny_llama(256).save_pretrained(where)
    return where


@pytest.fixture(scope="module")
def loaded(model_dir, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    return hf.load_model(model_dir, block=BLOCK)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def prompt(seed: int, n: int = TOKENS + 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def now() -> int:
    return time.time_ns() // 1_000_000


def claim_and_payload(loaded, ids, cache):
    """A seller's signed ADVERTISE of `cache` under the chain of `ids`, and its payload."""
    fp, layout = loaded.fp, loaded.fp.layout
    payload = hf.pack(cache, layout, TOKENS // BLOCK).numpy().tobytes()
    chunk = 1 << 16
    hashes = chunk_hashes(payload, chunk)
    ad = Advertise(
        fp=fp.digest(),
        layout=layout,
        blocks=tuple(prefix_chain(fp.digest(), ids[0, :TOKENS].tolist(), BLOCK)),
        root=content_root(len(payload), chunk, hashes),
        chunk=chunk,
        price=1,
        ctl="tcp://127.0.0.1:9",
        data=(DataAddress(t="tcp", addr="127.0.0.1:9"),),
    )
    frame = Signer(Identity.from_seed(b"\x5e" * 32)).seal(ad, now_ms=now())
    return frame, payload, b"".join(hashes), chunk


def evidence_of(loaded, ids, cache, position: int) -> Evidence:
    frame, payload, hashes, chunk = claim_and_payload(loaded, ids, cache)
    covering = covering_chunks(loaded.fp.layout, chunk, position)
    return Evidence(
        claim=frame,
        tokens=tuple(ids[0, : (position // BLOCK + 1) * BLOCK].tolist()),
        position=position,
        hashes=hashes,
        chunks=tuple((i, payload[i * chunk : (i + 1) * chunk]) for i in covering),
    )


# ---- evidence in memory ------------------------------------------------------------------


def test_evidence_of_a_lie_binds_and_the_weights_convict(loaded):
    ids = prompt(1)
    lie = evidence_of(loaded, ids, liars.other_weights(loaded.model, ids[:, :TOKENS]), 50)
    decoded = Evidence.decode(lie.encode())
    assert decoded == lie and evidence_id(lie.encode()) == lie.id
    bound = bind(decoded)
    assert bound.position == 50 and bound.fp == loaded.fp.digest()
    assert judge(loaded.model, bound) is not None
    honest = evidence_of(loaded, ids, liars.prefill(loaded.model, ids[:, :TOKENS]), 50)
    assert judge(loaded.model, bind(honest)) is None  # a false accusation


def _tampered(evidence: Evidence) -> dict:
    other_seller = Identity.from_seed(b"\x77" * 32)
    private = Advertise(**{**_ad(evidence).__dict__, "ns": b"\x01" * 32})
    return {
        "tokens of another text": dataclasses.replace(
            evidence, tokens=(evidence.tokens[0] ^ 1, *evidence.tokens[1:])
        ),
        "too few tokens": dataclasses.replace(evidence, tokens=evidence.tokens[:-1]),
        "a chunk list of another root": dataclasses.replace(
            evidence, hashes=bytes(32) + evidence.hashes[32:]
        ),
        "bytes that do not hash to the list": dataclasses.replace(
            evidence, chunks=((evidence.chunks[0][0], bytes(len(evidence.chunks[0][1]))),)
        ),
        "another chunk": dataclasses.replace(evidence, chunks=((1, evidence.chunks[0][1]),)),
        "a position past the claim": dataclasses.replace(evidence, position=TOKENS + 5),
        "a claim that is no ADVERTISE": dataclasses.replace(
            evidence,
            claim=Signer(other_seller).seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now(), to=bytes(32)
            ),
        ),
        "a private namespace's claim": dataclasses.replace(
            evidence, claim=Signer(other_seller).seal(private, now_ms=now())
        ),
        "a forged claim": dataclasses.replace(
            evidence, claim=evidence.claim[:-1] + bytes([evidence.claim[-1] ^ 1])
        ),
    }


def _ad(evidence: Evidence) -> Advertise:
    from kvx.trust import open_envelope

    return open_envelope(evidence.claim).message


@pytest.mark.parametrize(
    "case",
    [
        "tokens of another text",
        "too few tokens",
        "a chunk list of another root",
        "bytes that do not hash to the list",
        "another chunk",
        "a position past the claim",
        "a claim that is no ADVERTISE",
        "a private namespace's claim",
        "a forged claim",
    ],
)
def test_evidence_that_does_not_bind_the_seller_is_refused(loaded, case):
    ids = prompt(2)
    good = evidence_of(loaded, ids, liars.other_weights(loaded.model, ids[:, :TOKENS]), 20)
    bad = _tampered(good)[case]
    with pytest.raises(RemoteProtocolError) as refused:
        bind(Evidence.decode(bad.encode()))
    expected = ErrorCode.BAD_SIGNATURE if case == "a forged claim" else ErrorCode.INVALID_FIELD
    assert refused.value.code == expected


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xc1", ErrorCode.MALFORMED),
        (b"\x80", ErrorCode.INVALID_FIELD),  # an empty map
        (b"\x93\x01\x02\x03", ErrorCode.INVALID_FIELD),  # not a map
    ],
)
def test_evidence_bytes_of_the_wrong_shape_are_refused(data, code):
    with pytest.raises(RemoteProtocolError) as refused:
        Evidence.decode(data)
    assert refused.value.code == code


def test_evidence_with_an_unknown_key_or_odd_tokens_is_refused(loaded):
    import msgpack

    ids = prompt(3)
    good = evidence_of(loaded, ids, liars.prefill(loaded.model, ids[:, :TOKENS]), 3)
    raw = msgpack.unpackb(good.encode())
    for change in ({"extra": 1}, {"tokens": raw["tokens"] + b"\x00"}, {"position": -1}):
        with pytest.raises(RemoteProtocolError) as refused:
            Evidence.decode(msgpack.packb({**raw, **change}, use_bin_type=True))
        assert refused.value.code == ErrorCode.INVALID_FIELD
    assert struct.unpack("<I", raw["tokens"][:4])[0] == int(ids[0, 0])


# ---- against node processes --------------------------------------------------------------


@pytest.fixture
def swarm(tmp_path, model_dir, loaded):
    """S (a lying seller), B (a buyer, through S), C (judges with the weights, through
    B) and D (no weights, through B)."""
    s = NodeProcess(tmp_path / "s").start()
    s.wait_ready()
    b = NodeProcess(tmp_path / "b", [s.dir / "node.json"]).start()
    b.wait_ready()
    c = NodeProcess(
        tmp_path / "c",
        [b.dir / "node.json"],
        judge_models=[str(model_dir)],
        judge_block=BLOCK,
    ).start()
    d = NodeProcess(tmp_path / "d", [b.dir / "node.json"]).start()
    c.wait_ready()
    d.wait_ready()
    yield s, b, c, d
    for node in (d, c, b, s):
        node.stop()


def verdict(node: NodeProcess, peer: str) -> str:
    row = next((p for p in node.call("peers")["peers"] if p["node_id"] == peer), None)
    return row["verdict"] if row else ""


LAYER0_LIES = {  # the attack classes a layer-0 proof convicts (deep lies have none, §8.19)
    "another-document": lambda m, ids: liars.another_document(m, ids, prompt(98)[:, :TOKENS]),
    "spliced-8": lambda m, ids: liars.spliced(m, ids, prompt(97, 8), at=33),
    "other-weights": liars.other_weights,
    "bfloat16-as-float32": liars.in_bfloat16,
}


@pytest.mark.parametrize("attack", sorted(LAYER0_LIES))
async def test_a_third_node_convicts_a_liar_from_the_proof_alone(swarm, loaded, attack):
    s, b, c, d = swarm
    ids = prompt(4)
    lie = LAYER0_LIES[attack](loaded.model, ids[:, :TOKENS])
    async with PeerClient(s.dir) as seller:
        await hf.publish_prompt(seller, loaded.model, loaded.fp, ids[:, :TOKENS], cache=lie)
    for node in (b, c, d):
        eventually(lambda n=node: len(n.call("ads")["ads"]) == 1, 30)
    async with PeerClient(b.dir) as buyer:
        out = await hf.generate(buyer, loaded.model, loaded.fp, ids, max_new_tokens=4)
    assert out.bought is None
    seller_id = s.info["node_id"]
    convicted = eventually(lambda: verdict(b, seller_id))
    assert convicted.startswith("convicted ")
    proof = convicted.split()[-1]
    # C never dealt with S: it pulled the evidence from B and judged it with its weights.
    assert eventually(lambda: verdict(c, seller_id), 60) == f"convicted {proof}"
    assert eventually(lambda: c.call("ads")["ads"] == [])
    assert not c.events("bought") and c.events("convicted")[0]["ads_dropped"] == 1
    # C now serves the evidence it judged, part by part, to anyone who asks.
    asker = Identity.generate()
    peer, signer = TestPeer(c, asker), Signer(asker)
    try:
        ask = signer.seal(
            EvidenceRequest(evidence=bytes.fromhex(proof), offset=0), now_ms=now(), to=peer.node_id
        )
        peer.send(ask)
        part = peer.recv().message
        assert isinstance(part, EvidencePart) and part.offset == 0
        assert evidence_id(part.part) == bytes.fromhex(proof)  # one part: it is small here
        past = EvidenceRequest(evidence=bytes.fromhex(proof), offset=part.total)
        peer.send(signer.seal(past, now_ms=now(), to=peer.node_id))
        assert peer.recv().message.code == ErrorCode.INVALID_FIELD
    finally:
        peer.close()
    # D has no weights for this fingerprint: it keeps the accusation and does nothing.
    assert eventually(lambda: verdict(d, seller_id)) == f"accused, unchecked {proof}"
    assert len(d.call("ads")["ads"]) == 1
    assert not d.events("convicted")


@pytest.mark.parametrize("kind", ["its-honest-kv", "another-sellers-lie"])
async def test_a_false_accusation_convicts_the_accuser(swarm, loaded, kind):
    """Mallory accuses an honest seller with the seller's own honest KV as "evidence", or
    with true evidence of a lie that another identity signed (framing: the ACCUSE names
    the honest seller): both are false accusations, and the honest seller stands."""
    s, _, c, _ = swarm
    ids = prompt(5)
    async with PeerClient(s.dir) as seller:  # an honest seller
        await hf.publish_prompt(seller, loaded.model, loaded.fp, ids[:, :TOKENS])
    eventually(lambda: len(c.call("ads")["ads"]) == 1, 30)
    claim = c.call("lookup", fp=loaded.fp.digest(), blocks=_chain(loaded, ids), limit=1)["ads"][0]
    if kind == "its-honest-kv":
        evidence = _evidence_from(loaded, ids, claim, position=40)
    else:
        lie = liars.other_weights(loaded.model, ids[:, :TOKENS])
        evidence = evidence_of(loaded, ids, lie, position=40)
        assert judge(loaded.model, bind(evidence)) is not None  # a true lie, of someone else
    data = evidence.encode()
    mallory = Identity.generate()
    peer = TestPeer(c, mallory)
    signer = Signer(mallory)
    try:
        hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
        peer.send(signer.seal(hello, now_ms=now(), to=peer.node_id))
        seller_id = bytes.fromhex(s.info["node_id"])
        accuse = Accuse(
            seller=seller_id,
            fp=loaded.fp.digest(),
            root=bind(evidence).root,
            evidence=evidence_id(data),
            size=len(data),
            kind="layer0",
        )
        peer.send(signer.seal(accuse, now_ms=now()))
        while True:  # serve the evidence as C pulls it
            st = peer.recv(10)
            assert st is not None, "C never asked for the evidence"
            if not isinstance(st.message, EvidenceRequest):
                continue
            offset = st.message.offset
            part = EvidencePart(
                re=st.header.seq,
                evidence=evidence_id(data),
                offset=offset,
                total=len(data),
                part=data[offset : offset + (512 << 10)],
            )
            peer.send(signer.seal(part, now_ms=now(), to=peer.node_id))
            if offset + len(part.part) == len(data):
                break
        mallory_id = mallory.node_id.hex()
        assert eventually(lambda: verdict(c, mallory_id), 60).startswith("false accuser ")
        assert verdict(c, s.info["node_id"]) == ""  # the honest seller stands
        assert len(c.call("ads")["ads"]) == 1
        assert c.events("false_accusation")[0]["accuser"] == mallory_id[:12]
    finally:
        peer.close()


@pytest.mark.parametrize("lie", ["offset", "total", "bytes"])
async def test_a_peer_serving_bad_evidence_is_dropped_and_the_node_serves_on(swarm, loaded, lie):
    """Mallory accuses and then serves the evidence wrongly: a part at another offset, a
    total that is not the ACCUSE's size, or bytes of another hash. C drops the pull,
    scores the peer that served it, convicts nobody, and still answers a HELLO."""
    s, _, c, _ = swarm
    ids = prompt(6)
    async with PeerClient(s.dir) as seller:
        await hf.publish_prompt(seller, loaded.model, loaded.fp, ids[:, :TOKENS])
    eventually(lambda: len(c.call("ads")["ads"]) == 1, 30)
    claim = c.call("lookup", fp=loaded.fp.digest(), blocks=_chain(loaded, ids), limit=1)["ads"][0]
    data = _evidence_from(loaded, ids, claim, position=20).encode()
    mallory = Identity.generate()
    peer, signer = TestPeer(c, mallory), Signer(mallory)
    try:
        hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
        peer.send(signer.seal(hello, now_ms=now(), to=peer.node_id))
        accuse = Accuse(
            seller=bytes.fromhex(s.info["node_id"]),
            fp=loaded.fp.digest(),
            root=bind(Evidence.decode(data)).root,
            evidence=evidence_id(data),
            size=len(data),
            kind="layer0",
        )
        peer.send(signer.seal(accuse, now_ms=now()))
        ask = None
        while ask is None or not isinstance(ask.message, EvidenceRequest):
            ask = peer.recv(10)
            assert ask is not None, "C never asked for the evidence"
        served = {
            "offset": (1, len(data), data[1:]),
            "total": (0, len(data) + 1, data),
            "bytes": (0, len(data), bytes(len(data))),
        }[lie]
        offset, total, part = served
        reply = EvidencePart(
            re=ask.header.seq, evidence=evidence_id(data), offset=offset, total=total, part=part
        )
        peer.send(signer.seal(reply, now_ms=now(), to=peer.node_id))
        assert (
            eventually(lambda: c.events("evidence_abandoned"))[0]["source"]
            == (mallory.node_id.hex()[:12])
        )
        mallory_row = next(
            p for p in c.call("peers")["peers"] if p["node_id"] == mallory.node_id.hex()
        )
        assert mallory_row["score"] < 0 and mallory_row["verdict"] == ""
        assert verdict(c, s.info["node_id"]) == "" and len(c.call("ads")["ads"]) == 1
        honest = TestPeer(c, Identity.generate())
        try:
            honest.send(Signer(honest.identity).seal(hello, now_ms=now(), to=honest.node_id))
            assert honest.recv().type.name == "PEERS"
        finally:
            honest.close()
    finally:
        peer.close()


async def test_evidence_nobody_holds_is_not_found_and_unasked_parts_are_refused(swarm):
    _, _, c, _ = swarm
    stranger = Identity.generate()
    peer = TestPeer(c, stranger)
    signer = Signer(stranger)
    try:
        peer.send(
            signer.seal(
                EvidenceRequest(evidence=bytes(32), offset=0), now_ms=now(), to=peer.node_id
            )
        )
        answer = peer.recv()
        assert answer.message.code == ErrorCode.NOT_FOUND
        part = EvidencePart(re=1, evidence=bytes(32), offset=0, total=4, part=b"abcd")
        peer.send(signer.seal(part, now_ms=now(), to=peer.node_id))
        assert peer.recv().message.code == ErrorCode.UNEXPECTED_MESSAGE
    finally:
        peer.close()


def _chain(loaded, ids) -> list[bytes]:
    return prefix_chain(loaded.fp.digest(), ids[0, :TOKENS].tolist(), BLOCK)


def _evidence_from(loaded, ids, claim: bytes, position: int) -> Evidence:
    """Evidence against the seller of `claim`, made from the bytes its model computes
    (what a false accuser holds: an honest seller's own KV)."""
    from kvx.trust import open_envelope

    ad = open_envelope(claim).message
    payload = hf.pack(liars.prefill(loaded.model, ids[:, :TOKENS]), ad.layout, len(ad.blocks))
    payload = payload.numpy().tobytes()
    covering = covering_chunks(ad.layout, ad.chunk, position)
    return Evidence(
        claim=claim,
        tokens=tuple(ids[0, : (position // BLOCK + 1) * BLOCK].tolist()),
        position=position,
        hashes=b"".join(chunk_hashes(payload, ad.chunk)),
        chunks=tuple((i, payload[i * ad.chunk : (i + 1) * ad.chunk]) for i in covering),
    )
