"""The conformance cases. Each names the spec section and level of the requirement it
checks, talks to the target as an ordinary peer, and raises Failed or Skipped."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import msgpack

from kvx.protocol import (
    MAX_CLOCK_SKEW_MS,
    MAX_FRAME_BYTES,
    Accept,
    Advertise,
    DataAddress,
    Digest,
    Error,
    ErrorCode,
    Hello,
    KVLayout,
    Lookup,
    LookupResult,
    Quote,
    QuoteRequest,
    Receipt,
    RemoteProtocolError,
    Transfer,
    encode_body,
    encode_envelope,
    prefix_chain,
    signing_input,
)
from kvx.transport import Destination, Expected, StreamVerifier, fetch_tcp
from kvx.trust import Identity, Statement

from ._peer import HELLO, Failed, Session, Skipped, now_ms

FIXTURE_LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FIXTURE_FP = blake3.blake3(b"kvx conformance fixture: fingerprint").digest()
FIXTURE_CHAIN = prefix_chain(FIXTURE_FP, list(range(3 * 16)), 16)
FIXTURE_PAYLOAD = blake3.blake3(b"kvx conformance fixture: payload").digest(
    length=FIXTURE_LAYOUT.payload_bytes(3)
)


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


def answered_with(s: Session, frame: bytes, code: ErrorCode) -> None:
    """SHOULD (§6.5): a rejected direct frame is answered with ERROR carrying the code."""
    s.send(frame)
    answer = s.answer(seq_of(frame))
    if answer is None:
        raise Failed(f"no answer; §6.5 says ERROR {code.name}")
    if not isinstance(answer.message, Error) or answer.message.code != code:
        raise Failed(f"answered {answer.type.name}, not ERROR {code.name}")


def raw_hello(s: Session, **fields) -> bytes:
    """A correctly signed HELLO whose body fields are replaced by `fields`."""
    body = msgpack.unpackb(encode_body(s.header(), HELLO))
    body.update(fields)
    data = msgpack.packb(body, use_bin_type=True)
    hello_type = Hello.TYPE
    sig = s.identity.sign(signing_input(hello_type, data))
    return encode_envelope(hello_type, data, s.identity.public_key, sig)


# ---- §8 positive cases -------------------------------------------------------------


@case("8.2/1", "MUST", "a HELLO is answered with PEERS, re = its seq, signed by the target")
def _(s: Session) -> None:
    answer = s.hello()
    if answer.signer != s.target_key:
        raise Failed("PEERS is signed by a key other than the target's")


@case("7.6/1", "SHOULD", "PEERS answering a HELLO carries the session's membership challenge")
def _(s: Session) -> None:
    if s.hello().message.challenge is None:  # type: ignore[union-attr]
        raise Failed("no challenge in PEERS")


def _advert(s: Session, blocks: list[bytes]) -> bytes:
    ad = Advertise(
        fp=FIXTURE_FP,
        layout=FIXTURE_LAYOUT,
        blocks=tuple(blocks),
        root=bytes(32),
        chunk=1 << 16,
        price=1,
        ctl="tcp://127.0.0.1:9",
        data=(DataAddress("tcp", "127.0.0.1:9"),),
    )
    return s.frame(ad, exp=now_ms() + 600_000)


def _own_chain(s: Session) -> list[bytes]:
    return [blake3.blake3(s.identity.public_key + bytes([i])).digest() for i in range(3)]


@case("8.6/1", "MUST", "an ADVERTISE gossiped to the target comes back in answer to a DIGEST")
def _(s: Session) -> None:
    s.hello()
    frame = _advert(s, _own_chain(s))
    s.send(frame)
    time.sleep(0.3)
    s.send(s.frame(Digest(have=())))
    if not any(st.frame == frame for st in s.receive(2.0)):
        raise Failed("the advertisement did not come back, byte for byte, after DIGEST")


@case("8.7/1", "MUST", "LOOKUP returns the longest prefix held, with the signed ADVERTISE")
def _(s: Session) -> None:
    s.hello()
    chain = _own_chain(s)
    frame = _advert(s, chain)
    s.send(frame)
    time.sleep(0.3)
    ask = s.frame(Lookup(fp=FIXTURE_FP, blocks=(chain[0], chain[1], bytes(32)), limit=4))
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None or not isinstance(answer.message, LookupResult):
        raise Failed("LOOKUP was not answered with LOOKUP_RESULT")
    if answer.message.matched != 2 or frame not in answer.message.ads:
        raise Failed(
            f"matched {answer.message.matched} (want 2), our ad listed: "
            f"{frame in answer.message.ads}"
        )


@case("8.7/2", "MUST", "LOOKUP of a chain nobody holds is a miss: matched 0, no ads")
def _(s: Session) -> None:
    ask = s.frame(Lookup(fp=FIXTURE_FP, blocks=(blake3.blake3(b"nobody").digest(),), limit=4))
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None or not isinstance(answer.message, LookupResult):
        raise Failed("LOOKUP was not answered with LOOKUP_RESULT")
    if answer.message.matched != 0 or answer.message.ads:
        raise Failed("a miss must list nothing")


# ---- §10 a whole sale (needs the fixture) ------------------------------------------


def _quote(s: Session, fp: bytes = FIXTURE_FP) -> Statement:
    ask = s.frame(
        QuoteRequest(fp=fp, blocks=tuple(FIXTURE_CHAIN), transports=("tcp",), max_price=10**15)
    )
    s.send(ask)
    answer = s.answer(seq_of(ask))
    if answer is None:
        raise Failed("QUOTE_REQUEST was not answered")
    if isinstance(answer.message, Error):
        if (
            answer.message.code in (ErrorCode.NOT_FOUND, ErrorCode.FINGERPRINT_MISMATCH)
            and fp == FIXTURE_FP
        ):
            raise Skipped("the target does not hold the conformance fixture (spec/README.md)")
        raise Failed(f"ERROR {answer.message.code}: {answer.message.msg}")
    return answer


@case(
    "10.1/1",
    "MUST",
    "QUOTE_REQUEST, QUOTE, ACCEPT, TRANSFER, RECEIPT: the payload arrives "
    "whole and matches the signed content root",
)
def _(s: Session) -> None:
    s.hello()
    quote = _quote(s)
    q = quote.message
    if not isinstance(q, Quote) or q.blocks != 3:
        raise Failed(f"expected a QUOTE for 3 blocks, got {quote.type.name}")
    s.send(s.frame(Accept(quote=q.quote, price=q.price, root=q.root)))
    expected = Expected.from_quote(q)
    import torch

    dest = torch.zeros(expected.deliver, dtype=torch.uint8)
    verifier = StreamVerifier(expected)
    transfer = s.frame(Transfer(quote=q.quote, token=q.token, first=0))
    try:
        fetch_tcp(
            q.data, transfer, verifier, Destination(dest, expected), 10, _payer(s, q, expected)
        )
    except RemoteProtocolError as exc:
        raise Failed(f"the data channel failed: {exc}") from None
    if dest.numpy().tobytes() != FIXTURE_PAYLOAD[: expected.deliver]:
        raise Failed("verified bytes differ from the fixture")
    receipt = s.frame(
        Receipt(quote=q.quote, seller=s.target_id, root=q.root, bytes=q.deliver, price=q.price)
    )
    s.send(receipt)
    for st in s.receive(1.0):
        if isinstance(st.message, Error):
            raise Failed(f"the RECEIPT was refused: {st.message.msg}")


@case(
    "10.2/1",
    "MUST",
    "a QUOTE_REQUEST for another fingerprint is refused before any "
    "transfer, with FINGERPRINT_MISMATCH or NOT_FOUND",
)
def _(s: Session) -> None:
    answer = _quote_error(s, blake3.blake3(b"another model").digest())
    if answer not in (ErrorCode.FINGERPRINT_MISMATCH, ErrorCode.NOT_FOUND):
        raise Failed(f"answered {answer}")


def _payer(s: Session, q: Quote, expected: Expected):
    """Receipts for the payment window (§9.4): the first `n` bytes at their share of the price."""
    return lambda n: s.frame(
        Receipt(
            quote=q.quote, seller=s.target_id, root=q.root, bytes=n, price=expected.paid_price(n)
        )
    )


def _quote_error(s: Session, fp: bytes) -> ErrorCode | str:
    try:
        answer = _quote(s, fp)
    except Failed as exc:
        text = str(exc)
        with contextlib.suppress(ValueError):
            return ErrorCode(int(text.split()[1].rstrip(":")))
        return text
    return answer.type.name


@case("9.2/1", "MUST", "a TRANSFER with a wrong session token streams nothing (BAD_TOKEN)")
def _(s: Session) -> None:
    s.hello()
    q = _quote(s).message
    assert isinstance(q, Quote)
    s.send(s.frame(Accept(quote=q.quote, price=q.price, root=q.root)))
    expected = Expected.from_quote(q)
    import torch

    dest = torch.zeros(expected.deliver, dtype=torch.uint8)
    bad = s.frame(Transfer(quote=q.quote, token=bytes(32), first=0))
    try:
        verifier = StreamVerifier(expected)
        fetch_tcp(q.data, bad, verifier, Destination(dest, expected), 10, _payer(s, q, expected))
    except RemoteProtocolError as exc:
        if exc.code not in (ErrorCode.BAD_TOKEN, ErrorCode.STREAM_TRUNCATED):
            raise Failed(f"refused with {exc.code.name}, not BAD_TOKEN") from None
        if dest.any():
            raise Failed("bytes arrived for a wrong token") from None
        return
    raise Failed("the stream was served with a wrong token")


# ---- §4-§6 negative cases ----------------------------------------------------------


@case("4.4/1", "MUST", "bytes that are not msgpack are not acted on")
def _(s: Session) -> None:
    ignored(s, b"\xc1\xc1\xc1", None)


@case("4.4/2", "MUST", "a truncated frame is not acted on")
def _(s: Session) -> None:
    ignored(s, hello(s)[:-1], None)


@case("4.4/3", "MUST", "a frame with trailing bytes is not acted on")
def _(s: Session) -> None:
    ignored(s, hello(s) + b"\x00", None)


@case("4.3/1", "MUST", "a frame over MAX_FRAME_BYTES is never decoded; the target serves on")
def _(s: Session) -> None:
    s.send(b"\x00" * (MAX_FRAME_BYTES + 1))
    time.sleep(0.5)
    s.reconnect()  # the target may drop the connection, as libzmq's MAXMSGSIZE does
    s.hello()


@case("4.6/1", "MUST", "an envelope of an unknown version is not acted on")
def _(s: Session) -> None:
    env = msgpack.unpackb(hello(s))
    env[0] = 2
    ignored(s, msgpack.packb(env, use_bin_type=True), None)


@case("5.1/1", "MUST", "an unknown message type is not acted on")
def _(s: Session) -> None:
    env = msgpack.unpackb(hello(s))
    env[1] = 99
    ignored(s, msgpack.packb(env, use_bin_type=True), None)


@case("5.3/1", "MUST", "a statement whose signature does not verify is not acted on")
def _(s: Session) -> None:
    env = msgpack.unpackb(hello(s))
    env[4] = bytes(64)
    ignored(s, msgpack.packb(env, use_bin_type=True), None)


@case("6.4/1", "MUST", "a field of the wrong type is not acted on (INVALID_FIELD)")
def _(s: Session) -> None:
    ignored(s, raw_hello(s, inc="one"), ErrorCode.INVALID_FIELD)


@case(
    "6.4/2",
    "MUST",
    "a direct statement signed by a key other than the socket peer's is "
    "not acted on (SIGNER_MISMATCH)",
)
def _(s: Session) -> None:
    other = Identity.generate()
    ignored(
        s,
        s.frame(HELLO, signer=other),
        ErrorCode.SIGNER_MISMATCH,
    )


@case("6.4/3", "MUST", "an expired statement is not acted on (EXPIRED)")
def _(s: Session) -> None:
    past = now_ms() - 10 * MAX_CLOCK_SKEW_MS
    ignored(s, hello(s, iat=past - 1000, exp=past), ErrorCode.EXPIRED)


@case("6.4/4", "MUST", "a statement issued too far in the future is not acted on")
def _(s: Session) -> None:
    future = now_ms() + 10 * MAX_CLOCK_SKEW_MS
    ignored(s, hello(s, iat=future, exp=future + 1000), ErrorCode.NOT_YET_VALID)


@case("6.4/5", "MUST", "a statement addressed to another node is not acted on")
def _(s: Session) -> None:
    ignored(s, hello(s, to=bytes(32)), ErrorCode.WRONG_RECIPIENT)


@case("6.2/1", "MUST", "a replayed statement is not acted on the second time")
def _(s: Session) -> None:
    frame = hello(s)
    s.send(frame)
    if s.answer(seq_of(frame)) is None:
        raise Failed("the first HELLO was not answered")
    ignored(s, frame, ErrorCode.REPLAYED)


@case("6.5/1", "SHOULD", "a rejected direct frame is answered with ERROR and its code")
def _(s: Session) -> None:
    answered_with(s, raw_hello(s, inc="one"), ErrorCode.INVALID_FIELD)


@case("6.5/2", "SHOULD", "an expired direct statement is answered with ERROR EXPIRED")
def _(s: Session) -> None:
    past = now_ms() - 10 * MAX_CLOCK_SKEW_MS
    answered_with(s, hello(s, iat=past - 1000, exp=past), ErrorCode.EXPIRED)


@case("12.6/1", "MUST", "a flood beyond the rate limit does not stop the target serving")
def _(s: Session) -> None:
    s.hello()
    sent = 3000
    for _ in range(sent):
        s.send(hello(s))
    answers = len(s.receive(2.0))
    time.sleep(1.0)
    s.hello()
    if answers >= sent:
        raise Failed(f"all {sent} flooded requests were answered: no rate limit")
