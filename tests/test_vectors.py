"""The committed vectors are reproducible, and this implementation agrees with every one."""

import json
from pathlib import Path

import blake3
import msgpack
import pytest

from kvx.conformance import from_json, to_json
from kvx.conformance import generate_vectors as gen
from kvx.protocol import (
    KVLayout,
    MessageType,
    ModelFingerprint,
    Namespace,
    RemoteProtocolError,
    chain_seed,
    chunk_hashes,
    content_root,
    encode_body,
    node_id,
    prefix_chain,
)
from kvx.trust import Evidence, Identity, Inbox, ReplayGuard, bind, curve_public_key, evidence_id

VECTORS = Path(gen.__file__).with_name("vectors")


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def test_generator_reproduces_committed_files_byte_for_byte():
    rendered = gen.render()
    assert sorted(rendered) == sorted(p.name for p in VECTORS.glob("*.json"))
    for name, data in rendered.items():
        assert (VECTORS / name).read_bytes() == data, f"{name} differs: rerun the generator"


def frame_of(case: dict) -> bytes:
    if "frame_fill" in case:
        fill = case["frame_fill"]
        return bytes.fromhex(fill["fill"]) * fill["length"]
    return bytes.fromhex(case["frame"])


def receive(case: dict):
    ctx = case["context"]
    inbox = Inbox(bytes.fromhex(ctx["receiver"]), ReplayGuard())
    peer = ctx["peer_curve_key"] and bytes.fromhex(ctx["peer_curve_key"])
    for prior in ctx["prior_frames"]:
        inbox.receive(bytes.fromhex(prior), now_ms=ctx["now_ms"], peer_curve_key=peer)
    return inbox.receive(frame_of(case), now_ms=ctx["now_ms"], peer_curve_key=peer)


VALID = load("messages.json")["cases"]
INVALID = load("invalid.json")["cases"]


@pytest.mark.parametrize("case", VALID, ids=[c["id"] for c in VALID])
def test_valid_vector_is_accepted_and_decodes_to_its_body(case):
    st = receive(case)
    assert st.type.name == case["type"]
    body_bytes = msgpack.unpackb(frame_of(case))[2]
    assert body_bytes.hex() == case["body_bytes"]  # the exact bytes the signature covers
    assert to_json(msgpack.unpackb(body_bytes)) == case["body"]
    packed = msgpack.packb(from_json(case["body"]))
    if case["id"].startswith("message/"):  # the codec/ cases encode oddly on purpose
        assert packed == body_bytes  # the JSON body, packed in its order: an encoder's check
    if not case["id"].startswith("codec/unknown-"):  # unknown fields are dropped on decode
        assert encode_body(st.header, st.message) == packed


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_invalid_vector_is_rejected_with_its_code(case):
    with pytest.raises(RemoteProtocolError) as err:
        receive(case)
    assert (err.value.code, err.value.code.name) == (case["code"], case["reason"])


def test_every_message_type_has_a_valid_vector():
    assert {c["type"] for c in VALID} == {t.name for t in MessageType}


def test_every_single_message_error_code_has_a_vector():
    single_message_codes = {
        "MALFORMED",
        "FRAME_TOO_LARGE",
        "UNSUPPORTED_VERSION",
        "UNKNOWN_TYPE",
        "INVALID_FIELD",
        "BAD_SIGNATURE",
        "SIGNER_MISMATCH",
        "WRONG_RECIPIENT",
        "EXPIRED",
        "NOT_YET_VALID",
        "REPLAYED",
        "LIFETIME_TOO_LONG",
    }
    assert {c["reason"] for c in INVALID} == single_message_codes


def test_keys():
    for key in load("keys.json")["keys"]:
        ident = Identity.from_seed(bytes.fromhex(key["seed"]))
        assert ident.public_key.hex() == key["public_key"]
        assert node_id(ident.public_key).hex() == key["node_id"]
        assert curve_public_key(ident.public_key).hex() == key["curve_public_key"]


def test_fingerprints_namespaces_and_chains():
    data = load("naming.json")
    for fp in data["fingerprints"]:
        f = fp["fields"]
        layout = KVLayout(
            dtype=f["dtype"],
            layers=f["layers"],
            kv_heads=f["kv_heads"],
            head_dim=f["head_dim"],
            block=f["block"],
        )
        mf = ModelFingerprint(
            model_id=f["model_id"],
            revision=f["revision"],
            weights_hash=bytes.fromhex(f["weights_hash"]),
            tokenizer_hash=bytes.fromhex(f["tokenizer_hash"]),
            positional=f["positional"],
            layout=layout,
        )
        assert mf.encoded().hex() == fp["encoded"]
        assert mf.digest().hex() == fp["fingerprint"]
    for ns in data["namespaces"]:
        assert Namespace(bytes.fromhex(ns["secret"])).id.hex() == ns["id"]
    for p in data["membership_proofs"]:
        ns = Namespace(bytes.fromhex(p["secret"]))
        mac = ns.proof(
            bytes.fromhex(p["prover"]), bytes.fromhex(p["verifier"]), bytes.fromhex(p["challenge"])
        )
        assert mac.hex() == p["mac"]
    for chain in data["chains"]:
        secret = chain["namespace_secret"]
        space = Namespace(bytes.fromhex(secret) if secret else None)
        fp = bytes.fromhex(chain["fingerprint"])
        assert chain_seed(fp, space).hex() == chain["h0"]
        hashes = prefix_chain(fp, chain["tokens"], chain["block"], space)
        assert [h.hex() for h in hashes] == chain["hashes"]


def test_content_roots():
    for case in load("content.json")["cases"]:
        spec = case["payload"]
        payload = blake3.blake3(spec["xof_of"].encode()).digest(length=spec["length"])
        hashes = chunk_hashes(payload, case["chunk"])
        assert [h.hex() for h in hashes] == case["chunk_hashes"]
        assert content_root(len(payload), case["chunk"], hashes).hex() == case["root"]


def test_evidence_binds_or_is_refused_as_the_vectors_say():
    """§8.19: what binding extracts from valid evidence, and the code of evidence that
    binds nobody."""
    cases = load("evidence.json")["cases"]
    assert {c["expected"] for c in cases} == {"valid", "reject"}
    for case in cases:
        data = bytes.fromhex(case["evidence"])
        if case["expected"] == "valid":
            bound = bind(Evidence.decode(data))
            assert evidence_id(data).hex() == case["evidence_id"]
            assert bound.seller.hex() == case["seller"] and bound.position == case["position"]
            assert (bound.keys.hex(), bound.values.hex()) == (case["keys"], case["values"])
        else:
            with pytest.raises(RemoteProtocolError) as refused:
                bind(Evidence.decode(data))
            assert refused.value.code == case["code"], case["id"]


def test_every_integer_in_the_vectors_is_exact_in_json():
    """§14: no integer above 2^53 - 1, the largest every JSON parser reads exactly."""

    def integers(value):
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from integers(item)
        elif isinstance(value, list):
            for item in value:
                yield from integers(item)

    found = [n for path in VECTORS.glob("*.json") for n in integers(json.loads(path.read_text()))]
    assert found and max(found) <= 2**53 - 1


def test_sealing_vectors_follow_the_spec_text_and_this_implementation():
    """§9.6 recomputed from its own words with the libraries alone, then through kvx."""
    import nacl.bindings
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from kvx.protocol import Direction, Ephemeral, FrameTag, SealedChannel, channel_key

    vectors = load("sealing.json")
    ks = {k: bytes.fromhex(v) for k, v in vectors["key_schedule"].items()}
    assert nacl.bindings.crypto_scalarmult_base(ks["seller_secret"]) == ks["seller_kx"]
    assert nacl.bindings.crypto_scalarmult_base(ks["buyer_secret"]) == ks["buyer_kx"]
    shared = nacl.bindings.crypto_scalarmult(ks["seller_secret"], ks["buyer_kx"])
    assert shared == nacl.bindings.crypto_scalarmult(ks["buyer_secret"], ks["seller_kx"])
    assert shared == ks["shared"]
    material = shared + ks["quote"] + ks["seller_kx"] + ks["buyer_kx"]
    key = blake3.blake3(material, derive_key_context="kvx 0.3 data channel key").digest()
    assert key == ks["key"]
    seller, buyer = Ephemeral(ks["seller_secret"]), Ephemeral(ks["buyer_secret"])
    assert channel_key(seller.shared(buyer.public), ks["quote"], seller.public, buyer.public) == key

    channels = {
        1: SealedChannel(key, Direction.TO_SELLER),
        2: SealedChannel(key, Direction.TO_BUYER),
    }
    for case in vectors["frames"]:
        plain, frame = bytes.fromhex(case["plaintext"]), bytes.fromhex(case["frame"])
        tag, n = case["tag"], case["n"]
        nonce = bytes([case["direction"], tag, 0, 0]) + n.to_bytes(8, "little")
        clear = frame[:5] + (frame[5:9] if tag == FrameTag.CHUNK else b"")
        assert frame[:5] == bytes([tag]) + (len(frame) - 5).to_bytes(4, "little")
        assert clear + AESGCM(key).encrypt(nonce, plain, clear) == frame, case["id"]
        opener = channels[case["direction"]]  # the receiving side of that direction
        if tag == FrameTag.CHUNK:
            landed = bytearray(frame[9:-16])
            opener.open_chunk(n, [memoryview(landed)], frame[-16:])
            assert bytes(landed) == plain
        else:
            assert opener.open(FrameTag(tag), frame[5:]) == plain
    with pytest.raises(RemoteProtocolError) as err:
        seller.shared(bytes.fromhex(vectors["low_order_kx"]["kx"]))
    assert err.value.code == vectors["low_order_kx"]["code"]
