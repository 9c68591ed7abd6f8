"""Writes spec/vectors/*.json from fixed seeds; running it again reproduces them byte for byte.

    python -m kvx.conformance.generate_vectors [--out DIR]

Every key, time and sequence number below is fixed, Ed25519 signatures are deterministic
and msgpack encodes each value one way, so nothing here depends on the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import msgpack

from kvx.conformance import to_json
from kvx.protocol import (
    MAX_ADVERT_LIFETIME_MS,
    MAX_CLOCK_SKEW_MS,
    MAX_FRAME_BYTES,
    MAX_LIFETIME_MS,
    PROTOCOL_VERSION,
    RELAYABLE,
    Accept,
    Accuse,
    Advertise,
    DataAddress,
    Digest,
    DigestEntry,
    Direction,
    Ephemeral,
    Error,
    ErrorCode,
    EvidencePart,
    EvidenceRequest,
    FrameTag,
    Header,
    Hello,
    KVLayout,
    Leave,
    Lookup,
    LookupResult,
    Membership,
    Message,
    MessageType,
    ModelFingerprint,
    Namespace,
    NamespaceProof,
    PeerEntry,
    Peers,
    Probe,
    ProbeAck,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    SealedChannel,
    Transfer,
    Withdraw,
    chain_seed,
    channel_key,
    chunk_hashes,
    content_root,
    encode_body,
    encode_envelope,
    prefix_chain,
    signing_input,
)
from kvx.trust import Evidence, Identity, bind, curve_public_key, seal

VECTORS = Path(__file__).with_name("vectors")
NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z, in ms
TTL = 60_000


def seed(label: str) -> bytes:
    return blake3.blake3(f"kvx test vector seed: {label}".encode()).digest()


ALICE = Identity.from_seed(seed("alice"))
BOB = Identity.from_seed(seed("bob"))
MALLORY = Identity.from_seed(seed("mallory"))

LAYOUT = KVLayout(dtype="bfloat16", layers=2, kv_heads=2, head_dim=8, block=16)
FINGERPRINT = ModelFingerprint(
    model_id="kvx-test/tiny-gqa",
    revision="r1",
    weights_hash=b"",
    tokenizer_hash=seed("tokenizer"),
    positional="rope;theta=10000;scaling=none",
    layout=LAYOUT,
)
FP = FINGERPRINT.digest()
CHAIN = prefix_chain(FP, list(range(48)), LAYOUT.block)
DATA = (DataAddress(t="tcp", addr="127.0.0.1:7001"), DataAddress(t="ucx", addr="127.0.0.1:7002"))
QUOTE_ID = seed("quote")[:16]


def header(seq: int, to: bytes | None = BOB.node_id, iat: int = NOW, ttl: int = TTL) -> Header:
    return Header(iat=iat, exp=iat + ttl, seq=seq, to=to)


def advert() -> Advertise:
    return Advertise(
        fp=FP,
        layout=LAYOUT,
        blocks=tuple(CHAIN),
        root=seed("root"),
        chunk=1 << 22,
        price=1200,
        ctl="tcp://127.0.0.1:7000",
        data=DATA,
    )


def advert_frame(seq: int = 10, ttl: int = 3_600_000) -> bytes:
    return seal(ALICE, advert(), header(seq, to=None, ttl=ttl))


MESSAGES: list[Message] = [
    Hello(ctl="tcp://127.0.0.1:7000", data=DATA, inc=3, agent="kvx/0.1"),
    Peers(
        peers=(PeerEntry(key=MALLORY.public_key, ctl="tcp://127.0.0.1:7100", inc=1, state=1),),
        recent=(DigestEntry(key=MALLORY.public_key, seq=9),),
        re=1,
        challenge=seed("challenge")[:16],
    ),
    advert(),
    Withdraw(ad=10),
    Digest(have=(DigestEntry(key=ALICE.public_key, seq=10),)),
    Lookup(fp=FP, blocks=tuple(CHAIN), limit=4),
    LookupResult(re=5, matched=2, ads=(advert_frame(),)),
    QuoteRequest(
        fp=FP,
        blocks=tuple(CHAIN),
        transports=("ucx", "tcp"),
        max_price=5000,
        ns=Namespace(seed("namespace")).id,
        dtype="float16",
    ),
    Quote(
        re=7,
        quote=QUOTE_ID,
        blocks=2,
        stored=3,
        layout=KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16),
        root=seed("root-f16"),
        chunk=1 << 16,
        price=800,
        transport="tcp",
        data="127.0.0.1:7001",
        token=seed("token"),
    ),
    Accept(quote=QUOTE_ID, price=800, root=seed("root-f16")),
    Reject(quote=QUOTE_ID, reason=int(ErrorCode.PRICE_TOO_HIGH), counter=600),
    Transfer(quote=QUOTE_ID, token=seed("token"), first=0),
    Receipt(quote=QUOTE_ID, seller=BOB.node_id, root=seed("root-f16"), bytes=4096, price=800),
    Error(code=int(ErrorCode.NOT_FOUND), msg="no block of this chain is held here", re=6),
    Membership(
        challenge=seed("challenge")[:16],
        proofs=(
            NamespaceProof(
                ns=Namespace(seed("namespace")).id,
                mac=Namespace(seed("namespace")).proof(
                    ALICE.node_id, BOB.node_id, seed("challenge")[:16]
                ),
            ),
        ),
    ),
    Probe(target=MALLORY.public_key),
    ProbeAck(
        re=115,
        target=MALLORY.public_key,
        proof=seal(MALLORY, Peers(peers=(), re=3), header(90, to=ALICE.node_id)),
    ),
    Accuse(
        seller=MALLORY.node_id,
        fp=FP,
        root=seed("root"),
        evidence=seed("evidence"),
        size=4_500_000,
        kind="layer0",
    ),
    EvidenceRequest(evidence=seed("evidence"), offset=524_288),
    EvidencePart(re=118, evidence=seed("evidence"), offset=0, total=4096, part=b"\x85\xa5claim"),
    Leave(inc=3),
]

# The evidence vectors (§8.19): a payload small enough to read by hand. Layer 0 of block
# j is its first 2 * kv_heads * block * head_dim elements: keys, then values.
EV_LAYOUT = KVLayout(dtype="float32", layers=2, kv_heads=1, head_dim=2, block=2)
EV_FP = ModelFingerprint(
    model_id="kvx-test/evidence",
    revision="1",
    weights_hash=b"",
    tokenizer_hash=seed("tokenizer"),
    positional="rope;rope_theta=10000;rope_type=default",
    layout=EV_LAYOUT,
).digest()
EV_TOKENS = [7, 8, 9, 10, 11, 12]
EV_PAYLOAD = b"".join(  # element e of the payload holds the float e
    struct.pack("<f", float(e)) for e in range(3 * EV_LAYOUT.block_bytes // 4)
)


def ev_claim() -> bytes:
    hashes = chunk_hashes(EV_PAYLOAD, 1 << 16)
    ad = Advertise(
        fp=EV_FP,
        layout=EV_LAYOUT,
        blocks=tuple(prefix_chain(EV_FP, EV_TOKENS, EV_LAYOUT.block)),
        root=content_root(len(EV_PAYLOAD), 1 << 16, hashes),
        chunk=1 << 16,
        price=10,
        ctl="tcp://127.0.0.1:7000",
        data=DATA,
    )
    return seal(MALLORY, ad, header(300, to=None, ttl=3_600_000))


def ev(position: int, **changes: Any) -> Evidence:
    tokens = EV_TOKENS[: (position // EV_LAYOUT.block + 1) * EV_LAYOUT.block]
    good = Evidence(
        claim=ev_claim(),
        tokens=tuple(tokens),
        position=position,
        hashes=b"".join(chunk_hashes(EV_PAYLOAD, 1 << 16)),
        chunks=((0, EV_PAYLOAD),),
    )
    return dataclasses.replace(good, **changes)


def evidence() -> dict[str, Any]:
    valid = []
    for position in (0, 3, 5):
        bound = bind(ev(position))
        valid.append(
            {
                "id": f"evidence/position-{position}",
                "expected": "valid",
                "evidence": ev(position).encode().hex(),
                "evidence_id": ev(position).id.hex(),
                "seller": bound.seller.hex(),
                "position": position,
                "keys": bound.keys.hex(),
                "values": bound.values.hex(),
            }
        )
    wrong = {
        "evidence/tokens-of-another-text": ev(3, tokens=(7, 8, 9, 99)),
        "evidence/tokens-short-of-the-block": ev(3, tokens=(7, 8, 9)),
        "evidence/chunk-list-of-another-root": ev(3, hashes=bytes(32)),
        "evidence/chunk-not-its-hash": ev(3, chunks=((0, bytes(len(EV_PAYLOAD))),)),
        "evidence/position-past-the-claim": dataclasses.replace(ev(5), position=6),
    }
    invalid = [
        {
            "id": case_id,
            "expected": "reject",
            "evidence": e.encode().hex(),
            "code": int(ErrorCode.INVALID_FIELD),
            "reason": ErrorCode.INVALID_FIELD.name,
        }
        for case_id, e in wrong.items()
    ]
    return {
        "description": "Fraud-proof evidence (spec §8.19): a claim signed by mallory over a "
        "payload whose float32 element e holds the value e; `keys` and `values` are the "
        "layer-0 elements bind() extracts at `position`, [kv_heads][head_dim], little-endian",
        "cases": valid + invalid,
    }


def keys() -> dict[str, Any]:
    return {
        "description": "Ed25519 identities: node_id = BLAKE3(lp('kvx/node-id/1') || public_key)",
        "keys": [
            {
                "name": name,
                "seed": seed(name).hex(),
                "public_key": ident.public_key.hex(),
                "node_id": ident.node_id.hex(),
                "curve_public_key": curve_public_key(ident.public_key).hex(),
            }
            for name, ident in (("alice", ALICE), ("bob", BOB), ("mallory", MALLORY))
        ],
    }


def context(now: int = NOW, peer: Identity | None = ALICE, prior: list[bytes] = ()) -> dict:
    return {
        "now_ms": now,
        "receiver": BOB.node_id.hex(),
        "peer_curve_key": None if peer is None else curve_public_key(peer.public_key).hex(),
        "prior_frames": [f.hex() for f in prior],
    }


def valid_case(case_id: str, description: str, frame: bytes, ctx: dict) -> dict[str, Any]:
    body_bytes = msgpack.unpackb(frame)[2]
    return {
        "id": case_id,
        "description": description,
        "expected": "valid",
        "context": ctx,
        "frame": frame.hex(),
        "type": MessageType(msgpack.unpackb(frame)[1]).name,
        "body": to_json(msgpack.unpackb(body_bytes)),
        "body_bytes": body_bytes.hex(),
    }


def messages() -> dict[str, Any]:
    cases = []
    for i, msg in enumerate(MESSAGES):
        relay = msg.TYPE in RELAYABLE
        frame = seal(ALICE, msg, header(100 + i, to=None if relay else BOB.node_id))
        cases.append(
            valid_case(
                f"message/{msg.TYPE.name.lower()}", f"a valid {msg.TYPE.name}", frame, context()
            )
        )
    hello = MESSAGES[0]
    cases += [
        valid_case(
            "freshness/iat-at-skew",
            "issued exactly MAX_CLOCK_SKEW_MS ahead",
            seal(ALICE, hello, header(200, iat=NOW + MAX_CLOCK_SKEW_MS)),
            context(),
        ),
        valid_case(
            "freshness/exp-at-skew",
            "expired exactly MAX_CLOCK_SKEW_MS ago",
            seal(ALICE, hello, header(201)),
            context(now=NOW + TTL + MAX_CLOCK_SKEW_MS),
        ),
        valid_case(
            "freshness/max-lifetime",
            "a direct statement living exactly MAX_LIFETIME_MS",
            seal(ALICE, hello, header(202, ttl=MAX_LIFETIME_MS)),
            context(),
        ),
        valid_case(
            "relay/advertise",
            "an ADVERTISE relayed by a peer that did not sign it",
            advert_frame(203, ttl=MAX_ADVERT_LIFETIME_MS),
            context(peer=MALLORY),
        ),
        valid_case(
            "codec/unknown-field",
            "a body with an extra field, which is ignored",
            signed(
                MessageType.WITHDRAW, body_of(Withdraw(ad=1), header(204, to=None), zz_future="x")
            ),
            context(),
        ),
        valid_case(
            "codec/unknown-nested-field",
            "an ADVERTISE whose layout map carries an extra key, which is ignored (§4.5)",
            signed(
                MessageType.ADVERTISE,
                body_of(
                    advert(),
                    header(205, to=None, ttl=3_600_000),
                    layout={**dataclasses.asdict(LAYOUT), "zz_future": 1},
                ),
            ),
            context(),
        ),
        valid_case(
            "codec/unknown-bytes-at-limit",
            "an ADVERTISE with exactly MAX_UNKNOWN_BYTES (4,096) of unknown fields: key zz"
            " (3 bytes) and a bin of 4,090 (3 + 4,090), counted as §4.5 says",
            signed(
                MessageType.ADVERTISE,
                body_of(advert(), header(207, to=None, ttl=3_600_000), zz=b"\0" * 4090),
            ),
            context(),
        ),
        valid_case(
            "codec/unknown-bytes-nested-at-limit",
            "an ADVERTISE whose unknown fields, in the body (3 + 3 + 3,000) and in the map of"
            " its data array's first entry (3 + 3 + 1,084), make exactly 4,096",
            signed(
                MessageType.ADVERTISE,
                body_of(
                    advert(),
                    header(208, to=None, ttl=3_600_000),
                    zz=b"\0" * 3000,
                    data=[
                        {"t": "tcp", "addr": "127.0.0.1:7001", "zz": b"\0" * 1084},
                        {"t": "ucx", "addr": "127.0.0.1:7002"},
                    ],
                ),
            ),
            context(),
        ),
        valid_case(
            "codec/unknown-bytes-re-encoded",
            "an ADVERTISE at the limit when its unknown fields are re-encoded (zz: 3 + 3 +"
            " 4,086; zy: 3 + 1 for the uint 0), over it as sent (zy's 0 sent as uint 64,"
            " cf + 8 bytes): unknown fields count in their shortest encoding (§4.5)",
            signed(
                MessageType.ADVERTISE,
                _long_unknown_uint_body(header(209, to=None, ttl=3_600_000)),
            ),
            context(),
        ),
        valid_case(
            "address/ipv6-upper-case",
            "a HELLO whose ctl writes its IPv6 address in upper-case hex (§8.1a: either case)",
            seal(ALICE, hello_at("tcp://[2001:DB8::A]:7000"), header(210)),
            context(),
        ),
        valid_case(
            "address/ipv4-mapped",
            "a HELLO whose ctl is an IPv4-mapped IPv6 address of a unicast IPv4 address",
            seal(ALICE, hello_at("tcp://[::ffff:10.0.0.1]:7000"), header(211)),
            context(),
        ),
        valid_case(
            "codec/uint-in-signed-format",
            "HELLO inc encoded as msgpack int 8 (d0 03): a uint in a signed format (§1)",
            signed(MessageType.HELLO, _int8_inc_body(header(206))),
            context(),
        ),
    ]
    return {"description": "Valid frames, one per message type and per boundary", "cases": cases}


def body_of(msg: Message, hdr: Header, **extra: Any) -> bytes:
    fields = msgpack.unpackb(encode_body(hdr, msg))
    fields.update(extra)
    return msgpack.packb(fields, use_bin_type=True)


def signed(
    mtype: int | MessageType,
    body: bytes,
    signer: Identity = ALICE,
    version: int = PROTOCOL_VERSION,
    purpose_type: MessageType | None = None,
) -> bytes:
    """A frame whose body is signed correctly, however wrong the body itself is."""
    sig = signer.sign(signing_input(MessageType(purpose_type or mtype), body))
    if version == PROTOCOL_VERSION and mtype in MessageType._value2member_map_:
        return encode_envelope(MessageType(mtype), body, signer.public_key, sig)
    return msgpack.packb([version, int(mtype), body, signer.public_key, sig], use_bin_type=True)


def raw_body(**fields: Any) -> bytes:
    base = {"iat": NOW, "exp": NOW + TTL, "seq": 300, "to": BOB.node_id}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None}, use_bin_type=True)


def lookup_body(**fields: Any) -> bytes:
    return raw_body(**{"fp": FP, "blocks": list(CHAIN), "limit": 4, **fields})


def invalid() -> dict[str, Any]:
    good = seal(ALICE, MESSAGES[0], header(400))
    env = msgpack.unpackb(good)
    version, mtype, body, signer, sig = env
    adv_hdr = header(401, to=None)
    cases: list[tuple[str, str, ErrorCode, bytes | dict, dict]] = []

    def case(cid: str, why: str, code: ErrorCode, frame: bytes | dict, ctx: dict | None = None):
        cases.append((cid, why, code, frame, ctx or context()))

    pack = lambda obj: msgpack.packb(obj, use_bin_type=True)  # noqa: E731
    flip = lambda b, i: b[:i] + bytes([b[i] ^ 1]) + b[i + 1 :]  # noqa: E731
    # §4 framing and codec
    case("codec/not-msgpack", "0xc1 is never used by msgpack", ErrorCode.MALFORMED, b"\xc1")
    case("codec/empty-frame", "a frame with no bytes", ErrorCode.MALFORMED, b"")
    case("codec/truncated", "a valid frame missing its last byte", ErrorCode.MALFORMED, good[:-1])
    case(
        "codec/trailing-bytes",
        "a valid frame followed by one more byte",
        ErrorCode.MALFORMED,
        good + b"\x00",
    )
    case("codec/not-array", "an envelope that is a map", ErrorCode.MALFORMED, pack({"v": 1}))
    case("codec/wrong-arity", "an envelope with six items", ErrorCode.MALFORMED, pack([*env, b""]))
    case(
        "codec/body-not-bin",
        "the body sent as a map, not as bin",
        ErrorCode.MALFORMED,
        pack([version, mtype, msgpack.unpackb(body), signer, sig]),
    )
    case(
        "codec/short-signer",
        "a 31-byte signer key",
        ErrorCode.MALFORMED,
        pack([version, mtype, body, signer[:31], sig]),
    )
    case(
        "codec/oversize",
        "a frame one byte over MAX_FRAME_BYTES",
        ErrorCode.FRAME_TOO_LARGE,
        {"fill": "00", "length": MAX_FRAME_BYTES + 1},
    )
    case(
        "codec/version-1",
        "a kvx 0.1 peer's HELLO: protocol version 1, signed for purpose kvx/hello/1",
        ErrorCode.UNSUPPORTED_VERSION,
        pack([1, mtype, body, signer, ALICE.sign(b"\x0b\x00\x00\x00kvx/hello/1" + body)]),
    )
    case(
        "codec/version-2",
        "a kvx 0.2 peer's HELLO: protocol version 2, signed for purpose kvx/hello/2",
        ErrorCode.UNSUPPORTED_VERSION,
        pack([2, mtype, body, signer, ALICE.sign(b"\x0b\x00\x00\x00kvx/hello/2" + body)]),
    )
    case(
        "codec/version-4",
        "protocol version 4",
        ErrorCode.UNSUPPORTED_VERSION,
        pack([4, mtype, body, signer, sig]),
    )
    case(
        "codec/version-0",
        "protocol version 0",
        ErrorCode.UNSUPPORTED_VERSION,
        pack([0, mtype, body, signer, sig]),
    )
    case(
        "codec/version-negative",
        "protocol version -1: no uint, so MALFORMED (step 3), not an unsupported version",
        ErrorCode.MALFORMED,
        pack([-1, mtype, body, signer, sig]),
    )
    case(
        "codec/type-negative",
        "message type -1: no uint, so MALFORMED (step 5), not an unknown type",
        ErrorCode.MALFORMED,
        pack([PROTOCOL_VERSION, -1, body, signer, sig]),
    )
    case(
        "codec/unknown-type",
        "message type 99",
        ErrorCode.UNKNOWN_TYPE,
        pack([version, 99, body, signer, sig]),
    )
    case(
        "codec/duplicate-key",
        "a body map naming 'seq' twice",
        ErrorCode.MALFORMED,
        signed(MessageType.HELLO, _duplicate_key_body()),
    )
    case(
        "codec/body-not-map",
        "a body that is an array",
        ErrorCode.MALFORMED,
        signed(MessageType.HELLO, pack([1, 2, 3])),
    )
    case(
        "codec/bad-utf8",
        "a str field holding invalid UTF-8",
        ErrorCode.MALFORMED,
        signed(MessageType.ERROR, raw_body(code=41, msg="x")[:-1] + b"\xff"),
    )
    case(
        "codec/ext-type",
        "a body holding a msgpack ext value",
        ErrorCode.MALFORMED,
        signed(MessageType.WITHDRAW, raw_body(to=None, ad=msgpack.ExtType(1, b"x"))),
    )
    # §5 signatures
    case(
        "sig/flipped-signature",
        "one bit of the signature flipped",
        ErrorCode.BAD_SIGNATURE,
        pack([version, mtype, body, signer, flip(sig, 0)]),
    )
    case(
        "sig/flipped-body",
        "one bit of the signed body flipped",
        ErrorCode.BAD_SIGNATURE,
        pack([version, mtype, flip(body, len(body) - 1), signer, sig]),
    )
    case(
        "sig/other-signer",
        "a valid signature presented under another key",
        ErrorCode.BAD_SIGNATURE,
        pack([version, mtype, body, MALLORY.public_key, sig]),
    )
    # §5.3's verification rules, where Ed25519 libraries differ. Each is valid under the
    # cofactorless equation [S]B = R + [k]A taken at face value, and refused by the rules.
    order = 2**252 + 27742317777372353535851937790883648493  # L, the group order
    s_plus_l = (int.from_bytes(sig[32:], "little") + order).to_bytes(32, "little")
    case(
        "sig/s-not-canonical",
        "a valid signature with S replaced by S + L: the same point, but S >= L",
        ErrorCode.BAD_SIGNATURE,
        pack([version, mtype, body, signer, sig[:32] + s_plus_l]),
    )
    identity = b"\x01" + bytes(31)  # the neutral point: order 1
    case(
        "sig/small-order-key",
        "signer = the neutral point (a key of small order), R = the neutral point, S = 0",
        ErrorCode.BAD_SIGNATURE,
        pack([version, mtype, body, identity, identity + bytes(32)]),
    )
    p25519 = 2**255 - 19
    case(
        "sig/non-canonical-key",
        "signer = the neutral point written with y = p + 1 (a non-canonical encoding),"
        " R = the neutral point, S = 0",
        ErrorCode.BAD_SIGNATURE,
        pack([version, mtype, body, (p25519 + 1).to_bytes(32, "little"), identity + bytes(32)]),
    )
    accept_body = encode_body(header(402), MESSAGES[9])
    case(
        "sig/wrong-purpose",
        "an ACCEPT body and signature presented as a REJECT",
        ErrorCode.BAD_SIGNATURE,
        signed(MessageType.REJECT, accept_body, purpose_type=MessageType.ACCEPT),
    )
    # §6 header and §8 fields
    case(
        "field/wrong-type",
        "LOOKUP limit sent as a str",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(limit="4")),
    )
    case(
        "field/bool-for-uint",
        "LOOKUP limit sent as true",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(limit=True)),
    )
    case(
        "field/missing",
        "LOOKUP without blocks",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(blocks=None)),
    )
    case(
        "field/out-of-bounds",
        "LOOKUP limit 17 (max 16)",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(limit=17)),
    )
    case(
        "field/short-bin",
        "LOOKUP fp of 31 bytes",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(fp=FP[:31])),
    )
    case(
        "field/nil-optional",
        "an optional field sent as nil",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.ERROR, pack({**msgpack.unpackb(raw_body(code=41, msg="")), "re": None})),
    )
    case(
        "field/empty-chain",
        "LOOKUP with zero blocks",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(blocks=[])),
    )
    case(
        "field/bad-chunk",
        "ADVERTISE chunk size not a power of two",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.ADVERTISE, body_of(advert(), adv_hdr, chunk=3 << 20)),
    )
    case(
        "field/bad-dtype",
        "ADVERTISE layout dtype 'int4'",
        ErrorCode.INVALID_FIELD,
        signed(
            MessageType.ADVERTISE,
            body_of(
                advert(),
                adv_hdr,
                layout={"dtype": "int4", "layers": 2, "kv_heads": 2, "head_dim": 8, "block": 16},
            ),
        ),
    )
    case(
        "field/transport-name",
        "QUOTE_REQUEST transport 'TCP!'",
        ErrorCode.INVALID_FIELD,
        signed(
            MessageType.QUOTE_REQUEST,
            raw_body(fp=FP, blocks=list(CHAIN), transports=["TCP!"], max_price=1),
        ),
    )
    case(
        "field/quote-over-stored",
        "QUOTE matching more blocks than it stores",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.QUOTE, body_of(MESSAGES[8], header(403), blocks=4)),
    )
    for cid, ctl in (
        ("no-port", "tcp://10.0.0.1"),
        ("port-out-of-range", "tcp://10.0.0.1:65536"),
        ("host-name", "tcp://example.org:7000"),
        ("unspecified", "tcp://0.0.0.0:7000"),
        ("other-scheme", "udp://10.0.0.1:7000"),
        ("ipv6-unbracketed", "tcp://2001:db8::1:7000"),
        ("octet-leading-zero", "tcp://10.0.0.010:7000"),
        ("port-leading-zero", "tcp://10.0.0.1:07000"),
        ("port-zero", "tcp://10.0.0.1:0"),
        ("port-signed", "tcp://10.0.0.1:+7000"),
        ("zone-id", "tcp://[fe80::1%eth0]:7000"),
        ("zone-id-escaped", "tcp://[fe80::1%25eth0]:7000"),
        ("mapped-unspecified", "tcp://[::ffff:0.0.0.0]:7000"),
        ("mapped-multicast", "tcp://[::ffff:224.0.0.1]:7000"),
        ("mapped-broadcast", "tcp://[::ffff:255.255.255.255]:7000"),
        ("ipv6-unspecified", "tcp://[::]:7000"),
        ("ipv6-multicast", "tcp://[ff02::1]:7000"),
        ("scheme-upper-case", "TCP://10.0.0.1:7000"),
        ("ipv4-bracketed", "tcp://[10.0.0.1]:7000"),
        ("three-octets", "tcp://10.0.1:7000"),
    ):
        case(
            f"address/{cid}",
            f"HELLO whose control address is {ctl!r} (§8.1a)",
            ErrorCode.INVALID_FIELD,
            signed(MessageType.HELLO, body_of(hello_msg(), header(410), ctl=ctl)),
        )
    case(
        "address/data-host-name",
        "ADVERTISE whose tcp data address names a host (§8.1a)",
        ErrorCode.INVALID_FIELD,
        signed(
            MessageType.ADVERTISE,
            body_of(advert(), adv_hdr, data=[{"t": "tcp", "addr": "seller.example:7001"}]),
        ),
    )
    case(
        "codec/too-many-keys",
        "a body map of 65 keys (MAX_MAP_KEYS is 64, §4.4)",
        ErrorCode.MALFORMED,
        signed(
            MessageType.HELLO,
            body_of(hello_msg(), header(411), **{f"x{i:02}": 0 for i in range(57)}),
        ),
    )
    case(
        "field/relayable-ballast",
        "an ADVERTISE carrying 4,098 bytes of unknown fields (§4.5)",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.ADVERTISE, body_of(advert(), adv_hdr, zz=b"\0" * 4092)),
    )
    case(
        "field/relayable-ballast-nested",
        "an ADVERTISE whose unknown fields make 4,097 bytes, 1,085 of them in a map of its"
        " data array (§4.5: maps nested in defined fields count, arrays' maps included)",
        ErrorCode.INVALID_FIELD,
        signed(
            MessageType.ADVERTISE,
            body_of(
                advert(),
                adv_hdr,
                zz=b"\0" * 3000,
                data=[
                    {"t": "tcp", "addr": "127.0.0.1:7001", "zz": b"\0" * 1085},
                    {"t": "ucx", "addr": "127.0.0.1:7002"},
                ],
            ),
        ),
    )
    case(
        "header/missing-to",
        "a direct message without a recipient",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(to=None)),
    )
    case(
        "header/relay-with-to",
        "an ADVERTISE naming a recipient",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.ADVERTISE, body_of(advert(), adv_hdr, to=BOB.node_id)),
    )
    case(
        "header/exp-before-iat",
        "expires-at equal to issued-at",
        ErrorCode.INVALID_FIELD,
        signed(MessageType.LOOKUP, lookup_body(exp=NOW)),
    )
    case(
        "header/lifetime",
        "a direct statement living MAX_LIFETIME_MS + 1",
        ErrorCode.LIFETIME_TOO_LONG,
        signed(MessageType.HELLO, body_of(hello_msg(), header(405), exp=NOW + MAX_LIFETIME_MS + 1)),
    )
    case(
        "header/advert-lifetime",
        "an ADVERTISE living MAX_ADVERT_LIFETIME_MS + 1",
        ErrorCode.LIFETIME_TOO_LONG,
        signed(
            MessageType.ADVERTISE,
            body_of(advert(), header(406, to=None), exp=NOW + MAX_ADVERT_LIFETIME_MS + 1),
        ),
    )
    # §6.4 receive-side checks
    case(
        "recv/wrong-recipient",
        "a HELLO addressed to Mallory, received by Bob",
        ErrorCode.WRONG_RECIPIENT,
        seal(ALICE, hello_msg(), header(407, to=MALLORY.node_id)),
    )
    case(
        "recv/signer-mismatch",
        "Alice's HELLO sent down Mallory's connection",
        ErrorCode.SIGNER_MISMATCH,
        seal(ALICE, hello_msg(), header(408)),
        context(peer=MALLORY),
    )
    case(
        "recv/expired",
        "received 1 ms after exp + MAX_CLOCK_SKEW_MS",
        ErrorCode.EXPIRED,
        seal(ALICE, hello_msg(), header(409)),
        context(now=NOW + TTL + MAX_CLOCK_SKEW_MS + 1),
    )
    case(
        "recv/far-future",
        "issued MAX_CLOCK_SKEW_MS + 1 ms ahead",
        ErrorCode.NOT_YET_VALID,
        seal(ALICE, hello_msg(), header(410, iat=NOW + MAX_CLOCK_SKEW_MS + 1)),
    )
    replay = seal(ALICE, hello_msg(), header(411))
    case(
        "recv/replayed",
        "the same frame a second time",
        ErrorCode.REPLAYED,
        replay,
        context(prior=[replay]),
    )
    case(
        "recv/replayed-seq",
        "a new frame reusing an accepted sequence number",
        ErrorCode.REPLAYED,
        seal(ALICE, MESSAGES[13], header(411)),
        context(prior=[replay]),
    )

    out = []
    for cid, why, code, frame, ctx in cases:
        entry: dict[str, Any] = {
            "id": cid,
            "description": why,
            "expected": "reject",
            "code": int(code),
            "reason": code.name,
            "context": ctx,
        }
        if isinstance(frame, dict):
            entry["frame_fill"] = frame
        else:
            entry["frame"] = frame.hex()
        out.append(entry)
    return {"description": "Frames a receiver must reject, each with its error code", "cases": out}


def hello_msg() -> Hello:
    return MESSAGES[0]  # type: ignore[return-value]


def hello_at(ctl: str) -> Hello:
    return dataclasses.replace(hello_msg(), ctl=ctl)


def _long_unknown_uint_body(hdr: Header) -> bytes:
    """An ADVERTISE body with unknown keys zz (a bin of 4,086) and zy, whose 0 is written
    cf 00…00 (uint 64) where an encoder writes 00."""
    body = body_of(advert(), hdr, zz=b"\0" * 4086, zy=0)
    key = msgpack.packb("zy")
    assert body.count(key + b"\x00") == 1
    return body.replace(key + b"\x00", key + b"\xcf" + bytes(8))


def _int8_inc_body(hdr: Header) -> bytes:
    """A HELLO body whose `inc` (3) is written d0 03 (int 8) where an encoder writes 03."""
    body = encode_body(hdr, hello_msg())
    key = msgpack.packb("inc")
    assert body.count(key + b"\x03") == 1
    return body.replace(key + b"\x03", key + b"\xd0\x03")


def _duplicate_key_body() -> bytes:
    # A dict cannot hold two equal keys, so write the map by hand: a fixmap (0x85) of
    # five entries, iat, exp, seq, to, seq.
    pack = msgpack.packb
    parts = [
        pack("iat"),
        pack(NOW),
        pack("exp"),
        pack(NOW + TTL),
        pack("seq"),
        pack(1),
        pack("to"),
        pack(BOB.node_id),
        pack("seq"),
        pack(2),
    ]
    return b"\x85" + b"".join(parts)


def naming() -> dict[str, Any]:
    secret = seed("namespace")
    ns = Namespace(secret)
    tokens_a = list(range(48))
    tokens_b = [0, 1, (1 << 32) - 1, 65535, *range(28)]
    fps = [
        FINGERPRINT,
        ModelFingerprint(
            model_id="HuggingFaceTB/SmolLM2-135M",
            revision="",
            weights_hash=seed("weights"),
            tokenizer_hash=seed("smol-tokenizer"),
            positional="rope;theta=100000;scaling=none",
            layout=KVLayout(dtype="float16", layers=30, kv_heads=3, head_dim=64, block=256),
        ),
    ]
    return {
        "description": "Model fingerprints, namespaces and prefix chains (spec §7.2-7.3)",
        "fingerprints": [
            {
                "fields": {
                    "model_id": f.model_id,
                    "revision": f.revision,
                    "weights_hash": f.weights_hash.hex(),
                    "tokenizer_hash": f.tokenizer_hash.hex(),
                    "positional": f.positional,
                    "dtype": f.layout.dtype,
                    "layers": f.layout.layers,
                    "kv_heads": f.layout.kv_heads,
                    "head_dim": f.layout.head_dim,
                    "block": f.layout.block,
                },
                "encoded": f.encoded().hex(),
                "fingerprint": f.digest().hex(),
            }
            for f in fps
        ],
        "namespaces": [{"secret": secret.hex(), "id": ns.id.hex()}],
        "membership_proofs": [
            {
                "secret": secret.hex(),
                "prover": prover.node_id.hex(),
                "verifier": verifier.node_id.hex(),
                "challenge": challenge.hex(),
                "mac": ns.proof(prover.node_id, verifier.node_id, challenge).hex(),
            }
            for prover, verifier, challenge in (
                (ALICE, BOB, seed("challenge")[:16]),
                (BOB, ALICE, seed("challenge")[:16]),
                (ALICE, BOB, seed("another challenge")[:16]),
            )
        ],
        "chains": [
            {
                "fingerprint": FP.hex(),
                "namespace_secret": None if space.secret is None else space.secret.hex(),
                "block": 16,
                "tokens": tokens,
                "h0": chain_seed(FP, space).hex(),
                "hashes": [h.hex() for h in prefix_chain(FP, tokens, 16, space)],
            }
            for tokens in (tokens_a, tokens_b)
            for space in (Namespace(), ns)
        ],
    }


def content() -> dict[str, Any]:
    cases = []
    for label, size, chunk in (
        ("one-byte", 1, 1 << 16),
        ("one-chunk", 1 << 16, 1 << 16),
        ("chunk-plus-one", (1 << 16) + 1, 1 << 16),
        ("several", 300_000, 1 << 16),
        ("four-mib-chunks", 5 << 20, 4 << 20),
    ):
        payload = blake3.blake3(label.encode()).digest(length=size)
        hashes = chunk_hashes(payload, chunk)
        cases.append(
            {
                "id": label,
                "payload": {"xof_of": label, "length": size},
                "chunk": chunk,
                "chunk_hashes": [h.hex() for h in hashes],
                "root": content_root(size, chunk, hashes).hex(),
            }
        )
    return {
        "description": "Content roots; payload = first `length` bytes of the BLAKE3 XOF of "
        "the UTF-8 string `xof_of` (spec §7.5)",
        "cases": cases,
    }


def sealing() -> dict[str, Any]:
    """One deal's key schedule and a frame of each kind, sealed (spec §9.6)."""
    seller, buyer = Ephemeral(seed("seller kx")), Ephemeral(seed("buyer kx"))
    shared = seller.shared(buyer.public)
    key = channel_key(shared, QUOTE_ID, seller.public, buyer.public)
    to_buyer = SealedChannel(key, Direction.TO_BUYER)
    to_seller = SealedChannel(key, Direction.TO_SELLER)
    chunk = blake3.blake3(b"a sealed chunk").digest(length=1000)
    listing = b"".join(blake3.blake3(bytes([i])).digest() for i in range(3))
    out = bytearray(len(chunk))
    clear, mac = to_buyer.chunk_frame(2, memoryview(chunk), memoryview(out))
    list_tag, control = FrameTag.CHUNK_LIST, FrameTag.CONTROL
    sealed = [
        ("chunk-list", 1, list_tag, 0, listing, to_buyer.frame(list_tag, listing)),
        ("chunk-2", 1, FrameTag.CHUNK, 2, chunk, clear + bytes(out) + mac),
        ("end", 1, FrameTag.END, 0, b"", to_buyer.frame(FrameTag.END, b"")),
        ("control-0", 2, control, 0, b"receipt", to_seller.frame(control, b"receipt")),
        ("control-1", 2, control, 1, b"receipt", to_seller.frame(control, b"receipt")),
    ]
    return {
        "description": "Sealing the data channel (spec §9.6): the key schedule from two "
        "ephemeral X25519 secret keys, and whole sealed frames; `plaintext` is the frame's "
        "payload in clear (a CHUNK's bytes without its index), `n` the nonce's counter",
        "key_schedule": {
            "seller_secret": seed("seller kx").hex(),
            "buyer_secret": seed("buyer kx").hex(),
            "seller_kx": seller.public.hex(),
            "buyer_kx": buyer.public.hex(),
            "quote": QUOTE_ID.hex(),
            "shared": shared.hex(),
            "key": key.hex(),
        },
        "low_order_kx": {"kx": bytes(32).hex(), "expected": "reject", "code": 14},
        "frames": [
            {
                "id": name,
                "direction": direction,
                "tag": int(tag),
                "n": n,
                "plaintext": plain.hex(),
                "frame": frame.hex(),
            }
            for name, direction, tag, n, plain, frame in sealed
        ],
    }


FILES: dict[str, Callable[[], dict[str, Any]]] = {
    "keys.json": keys,
    "messages.json": messages,
    "invalid.json": invalid,
    "naming.json": naming,
    "content.json": content,
    "evidence.json": evidence,
    "sealing.json": sealing,
}


def render() -> dict[str, bytes]:
    return {name: (json.dumps(make(), indent=1) + "\n").encode() for name, make in FILES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=VECTORS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in render().items():
        (args.out / name).write_bytes(data)
        print(f"wrote {args.out / name} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
