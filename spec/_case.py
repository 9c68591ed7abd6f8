"""What every conformance case is made of: the registry, the fixture, and the ways a case
sends a frame and judges the answer. The cases live in _cases_*.py, one file per part
of the spec; each names its section and level, quotes its requirement, talks to the
target as an ordinary peer, and raises Failed or Skipped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import blake3
import msgpack

from kvx.protocol import (
    RELAYABLE,
    Error,
    ErrorCode,
    KVLayout,
    Message,
    encode_body,
    encode_envelope,
    prefix_chain,
    signing_input,
)
from kvx.trust import Identity

from ._peer import HELLO, Failed, Session, now_ms

FIXTURE_LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FIXTURE_FP = blake3.blake3(b"kvx conformance fixture: fingerprint").digest()
FIXTURE_CHAIN = prefix_chain(FIXTURE_FP, list(range(3 * 16)), 16)
FIXTURE_PAYLOAD = blake3.blake3(b"kvx conformance fixture: payload").digest(
    length=FIXTURE_LAYOUT.payload_bytes(3)
)
# The long fixture: 16 chunks, for the payment window (§9.4), which the short one, of one
# chunk, never opens. Its blocks are 128 KiB: 8 blocks, 1 MiB.
LONG_FIXTURE_LAYOUT = KVLayout(dtype="float16", layers=4, kv_heads=4, head_dim=64, block=32)
LONG_FIXTURE_FP = blake3.blake3(b"kvx conformance fixture: long fingerprint").digest()
LONG_FIXTURE_CHAIN = prefix_chain(LONG_FIXTURE_FP, list(range(8 * 32)), 32)
LONG_FIXTURE_PAYLOAD = blake3.blake3(b"kvx conformance fixture: long payload").digest(
    length=LONG_FIXTURE_LAYOUT.payload_bytes(8)
)
FIXTURE_CHUNK = 1 << 16
FIXTURES = (
    (FIXTURE_FP, FIXTURE_LAYOUT, FIXTURE_CHAIN, FIXTURE_PAYLOAD, 1),
    (LONG_FIXTURE_FP, LONG_FIXTURE_LAYOUT, LONG_FIXTURE_CHAIN, LONG_FIXTURE_PAYLOAD, 10**9),
)
"""(fingerprint, layout, chain, payload, params) of each fixture, as a target publishes
it with chunks of FIXTURE_CHUNK bytes; params prices the long one well above any floor,
so that counter-offers have room."""


@dataclass(frozen=True)
class Case:
    id: str
    level: str  # MUST or SHOULD
    requirement: str  # what the spec says, in a line
    run: Callable[[Session], None]

    @property
    def section(self) -> str:
        return self.id.split("/")[0]


CASES: list[Case] = []


def case(case_id: str, level: str, requirement: str):
    def register(fn: Callable[[Session], None]) -> Callable[[Session], None]:
        CASES.append(Case(case_id, level, requirement, fn))
        return fn

    return register


def hello(s: Session, **over) -> bytes:
    return s.frame(HELLO, **over)


def seq_of(frame: bytes) -> int:
    """The seq of a frame we made, read without validating it (it may be invalid on purpose)."""
    return msgpack.unpackb(msgpack.unpackb(frame)[2])["seq"]


def ignored(s: Session, frame: bytes, code: ErrorCode | None, *, wait: float = 1.5) -> None:
    """MUST: the frame is not acted on (nothing but an ERROR with the §6.4 code comes back),
    and the target still answers a normal request afterwards."""
    s.send(frame)
    for st in s.receive(wait):
        if not isinstance(st.message, Error):
            raise Failed(f"the frame was acted on: the target answered {st.type.name}")
        if code is not None and st.message.code != code:
            raise Failed(f"ERROR {st.message.code}, where §6.4 gives {int(code)} ({code.name})")
    s.hello()


def welcomed(s: Session, frame: bytes) -> None:
    """The HELLO is taken as any other: answered with PEERS."""
    s.send(frame)
    answer = s.answer(seq_of(frame))
    if answer is None or answer.type.name != "PEERS":
        got = answer.message.code if answer and isinstance(answer.message, Error) else answer
        raise Failed(f"the HELLO was answered {got}, not PEERS")


def silent(s: Session, frame: bytes, *, wait: float = 1.5) -> None:
    """MUST (§6.5): a frame with no sender the target could address is not answered at
    all, and the target still serves afterwards."""
    s.send(frame)
    answers = s.receive(wait)
    if answers:
        raise Failed(f"the target answered {answers[0].type.name}; §6.5: no answer")
    s.hello()


def refused(s: Session, frame: bytes, code: ErrorCode) -> None:
    """The statement is answered ERROR with this code (§6.5), and the target serves on."""
    s.send(frame)
    answer = s.answer(seq_of(frame))
    if answer is None:
        raise Failed(f"no answer, where the spec gives ERROR {code.name}")
    if not isinstance(answer.message, Error) or answer.message.code != code:
        got = answer.message.code if isinstance(answer.message, Error) else answer.type.name
        raise Failed(f"answered {got}, not ERROR {code.name} ({int(code)})")
    s.hello()


def signed_body(s: Session, message: Message, **fields) -> bytes:
    """A correctly signed statement whose body fields are replaced or added by `fields`
    (hostile values the codec would never produce)."""
    over = {"to": None, "exp": now_ms() + 600_000} if message.TYPE in RELAYABLE else {}
    body = msgpack.unpackb(encode_body(s.header(**over), message))
    body.update(fields)
    data = msgpack.packb(body, use_bin_type=True)
    return seal_raw(s.identity, message.TYPE, data)


def seal_raw(identity: Identity, mtype, data: bytes) -> bytes:
    sig = identity.sign(signing_input(mtype, data))
    return encode_envelope(mtype, data, identity.public_key, sig)
