"""Hostile frames for fuzzing a node's control socket: random bytes, mutated valid frames,
msgpack structures of every shape, and correctly signed bodies with junk in their fields.

Seeded, so a run that found something is repeated exactly; fast enough for 10^5 frames
in CI (hypothesis drives the decoder fuzz in the tests; this drives a live socket).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgpack

from kvx.protocol import (
    Advertise,
    DataAddress,
    Digest,
    Header,
    Hello,
    KVLayout,
    Leave,
    Lookup,
    Message,
    MessageType,
    Peers,
    QuoteRequest,
    Withdraw,
    encode_body,
    encode_envelope,
    signing_input,
)
from kvx.trust import Identity, Signer

_LAYOUT = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)


def _valid(signer: Signer, to: bytes, rng: random.Random, now_ms: int) -> bytes:
    h = bytes(rng.randrange(256) for _ in range(32))
    choices = [
        (Hello(ctl="tcp://127.0.0.1:9", data=(), inc=rng.randrange(9)), to),
        (Lookup(fp=h, blocks=(h,), limit=1 + rng.randrange(16)), to),
        (QuoteRequest(fp=h, blocks=(h,), transports=("tcp",), max_price=rng.randrange(99)), to),
        (Digest(have=()), to),
        (
            Advertise(
                fp=h,
                layout=_LAYOUT,
                blocks=(h,),
                root=h,
                chunk=1 << 16,
                price=1,
                ctl="tcp://127.0.0.1:9",
                data=(DataAddress("tcp", "127.0.0.1:9"),),
            ),
            None,
        ),
    ]
    message, recipient = rng.choice(choices)
    return signer.seal(message, now_ms=now_ms, to=recipient)


_ADDRESSES = [
    "tcp://127.0.0.1:9",
    "x",
    "tcp://host",
    "tcp://127.0.0.1:99999",
    "tcp://127.0.0.1:0",
    "udp://1.2.3.4:5",
    "tcp://0.0.0.0:7",
    "tcp://[::]:7",
    "tcp://224.0.0.1:7",
    "tcp://localhost:7",
    "tcp://[::1]:7",
    "tcp://::1:7",
    "tcp://127.0.0.1:+7",
    "tcp://127.0.0.1:07",
    "tcp://1.2.3.4:7/extra",
    "tcp://" + "9" * 240 + ":7",
]


def _hostile(signer: Signer, to: bytes, rng: random.Random, now_ms: int) -> bytes:
    """A well-typed, validly signed message whose values are chosen to hurt: addresses a
    socket cannot take, chains overlapping others at shifted positions, counts at their
    bounds, statements living as long as allowed, listings aimed at one address."""
    hashes = [bytes([i]) * 32 for i in range(1, 9)]  # a small pool, so chains overlap
    chain = tuple(rng.choice(hashes) for _ in range(rng.choice((1, 2, 3, 4096))))
    ctl = rng.choice(_ADDRESSES)
    host_port = ctl.removeprefix("tcp://")
    choices = [
        (Hello(ctl="tcp://127.0.0.1:9", data=(), inc=rng.randrange(2**64)), to, {"ctl": ctl}),
        (
            Peers(peers=()),
            to,
            {
                "peers": [
                    {"key": rng.randbytes(32), "ctl": ctl, "inc": 1, "state": rng.randrange(3)}
                    for _ in range(rng.choice((1, 64)))
                ]
            },
        ),
        (Lookup(fp=hashes[0], blocks=(hashes[0],), limit=16), to, {"blocks": list(chain)}),
        (
            Advertise(
                fp=hashes[0],
                layout=_LAYOUT,
                blocks=(hashes[0],),
                root=rng.choice(hashes),
                chunk=1 << 16,
                price=rng.choice((0, 2**64 - 1)),
                ctl="tcp://127.0.0.1:9",
                data=(DataAddress("tcp", "127.0.0.1:9"),),
            ),
            None,
            {
                "ctl": ctl,
                "blocks": list(chain),
                "data": [{"t": rng.choice(("tcp", "ucx", "zz")), "addr": host_port}],
            },
        ),
        (Withdraw(ad=rng.randrange(2**64)), None, {}),
        (Leave(inc=rng.randrange(2**64)), to, {}),
        (
            Digest(have=()),
            to,
            {"have": [{"key": rng.randbytes(32), "seq": i} for i in range(rng.choice((1, 4096)))]},
        ),
        (
            QuoteRequest(fp=hashes[0], blocks=(hashes[0],), transports=("tcp",), max_price=0),
            to,
            {"blocks": list(chain), "max_price": rng.choice((0, 2**64 - 1))},
        ),
    ]
    message, recipient, fields = rng.choice(choices)
    lifetime = 86_400_000 if recipient is None else 300_000
    header = Header(
        iat=now_ms + 29_000, exp=now_ms + lifetime, seq=rng.randrange(2**64), to=recipient
    )
    return signed_with(signer.identity, message, fields, header)


def signed_with(identity: Identity, message: Message, fields: dict, header: Header) -> bytes:
    """A validly signed frame whose body is `message` with `fields` written over it:
    values no honest encoder produces, under a good signature, so they reach the checks
    a receiver makes after it has verified the signer."""
    body = msgpack.unpackb(encode_body(header, message))
    body.update(fields)
    raw = msgpack.packb(body, use_bin_type=True)
    return encode_envelope(
        message.TYPE, raw, identity.public_key, identity.sign(signing_input(message.TYPE, raw))
    )


def _junk(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randrange(-(2**63), 2**64)
    if kind == 3:
        return rng.random() * 1e9
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if kind in (6, 7):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {str(rng.randrange(99)): _junk(rng, depth + 1) for _ in range(rng.randrange(5))}


def frames(count: int, *, seed: int, target: bytes, now_ms: int) -> Iterator[bytes]:
    """`count` hostile frames addressed (where they name anyone) to node id `target`."""
    rng = random.Random(seed)
    identity = Identity.from_seed(rng.randbytes(32))
    signer = Signer(identity)
    for _ in range(count):
        mode = rng.randrange(5)
        if mode == 0:  # random bytes
            yield rng.randbytes(rng.randrange(1, 300))
        elif mode == 1:  # a valid frame, mutated
            frame = bytearray(_valid(signer, target, rng, now_ms))
            for _ in range(1 + rng.randrange(4)):
                at = rng.randrange(len(frame))
                op = rng.randrange(3)
                if op == 0:
                    frame[at] ^= 1 << rng.randrange(8)
                elif op == 1:
                    del frame[at:]
                    if not frame:
                        frame = bytearray(b"\x00")
                else:
                    frame[at:at] = rng.randbytes(1 + rng.randrange(4))
            yield bytes(frame)
        elif mode == 2:  # any msgpack structure, as envelope or as a whole frame
            yield msgpack.packb(
                [1, rng.randrange(20), _junk(rng), _junk(rng), _junk(rng)]
                if rng.random() < 0.5
                else _junk(rng),
                use_bin_type=True,
            )
        elif mode == 4:  # well-typed and signed, with values chosen to hurt
            yield _hostile(signer, target, rng, now_ms)
        else:  # correctly signed, so the junk reaches the body checks
            mtype = rng.choice(list(MessageType))
            body = {"iat": now_ms, "exp": now_ms + 1000, "seq": rng.randrange(2**63), "to": target}
            for _ in range(rng.randrange(5)):
                body[
                    rng.choice(
                        [
                            "fp",
                            "blocks",
                            "limit",
                            "ctl",
                            "data",
                            "inc",
                            "peers",
                            "ns",
                            "quote",
                            "price",
                            "root",
                            "code",
                            "msg",
                            "re",
                            "have",
                        ]
                    )
                ] = _junk(rng)
            raw = msgpack.packb(body, use_bin_type=True)
            sig = identity.sign(signing_input(mtype, raw))
            yield encode_envelope(mtype, raw, identity.public_key, sig)
