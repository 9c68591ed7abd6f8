"""Cases for spec §4 to §6: framing, the msgpack profile, envelopes, and the receive order."""

from __future__ import annotations

import time

import msgpack

from kvx.protocol import (
    MAX_ARRAY_ITEMS,
    MAX_CLOCK_SKEW_MS,
    MAX_FRAME_BYTES,
    MAX_MAP_KEYS,
    Digest,
    Error,
    ErrorCode,
    Hello,
    encode_body,
)
from kvx.trust import Identity

from ._case import (
    case,
    hello,
    ignored,
    refused,
    seal_raw,
    seq_of,
    signed_body,
    silent,
    welcomed,
)
from ._peer import HELLO, Failed, Session, now_ms

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


@case("4.6/1", "MUST", "an envelope of an unknown version (4) is not acted on, nor answered")
def _(s: Session) -> None:
    env = msgpack.unpackb(hello(s))
    env[0] = 4
    silent(s, msgpack.packb(env, use_bin_type=True))


@case("4.6/2", "MUST", "a kvx 0.1 or 0.2 peer's HELLO (versions 1, 2, purposes kvx/hello/1, /2)")
def _(s: Session) -> None:
    body = msgpack.unpackb(hello(s))[2]
    for version in (1, 2):
        purpose = f"kvx/hello/{version}".encode()
        sig = s.identity.sign(len(purpose).to_bytes(4, "little") + purpose + body)
        frame = [version, 1, body, s.identity.public_key, sig]
        silent(s, msgpack.packb(frame, use_bin_type=True))


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
    ignored(s, signed_body(s, HELLO, inc="one"), ErrorCode.INVALID_FIELD)


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
    refused(s, signed_body(s, HELLO, inc="one"), ErrorCode.INVALID_FIELD)


@case("6.5/2", "SHOULD", "an expired direct statement is answered with ERROR EXPIRED")
def _(s: Session) -> None:
    past = now_ms() - 10 * MAX_CLOCK_SKEW_MS
    refused(s, hello(s, iat=past - 1000, exp=past), ErrorCode.EXPIRED)


FLOOD = 3000
"""HELLOs the flood cases send on one connection, as fast as the suite signs them
(thousands a second on a laptop): far over any rate limit a node would set."""


def _flood(s: Session) -> tuple[int, float]:
    """Send the flood, then read answers until the target has been silent for a second
    (up to 60 s, so a target that verifies slowly works through what it took at its
    own pace): how many were answered, and the rate it was sent at."""
    s.hello()
    start = time.monotonic()
    for _ in range(FLOOD):
        s.send(hello(s))
    rate = FLOOD / max(time.monotonic() - start, 1e-9)
    answers, deadline = 0, time.monotonic() + 60.0
    while time.monotonic() < deadline and (got := len(s.receive(1.0))):
        answers += got
    return answers, rate


@case("12.6/1", "MUST", f"after a flood of {FLOOD} HELLOs, another peer is still served")
def _(s: Session) -> None:
    _flood(s)
    other = Session(s.ctx, s.target, s.target_key)  # a fresh connection and identity
    try:
        other.hello()
    finally:
        other.close()


@case("12.6/3", "SHOULD", f"a flood of {FLOOD} HELLOs on one connection is rate-limited")
def _(s: Session) -> None:
    answers, rate = _flood(s)
    if answers >= FLOOD:
        raise Failed(f"all {FLOOD} HELLOs (sent at {rate:,.0f} a second) were answered")


@case("12.6/2", "MUST", "a peer is not banned for the volume of valid statements it sends")
def _(s: Session) -> None:
    s.hello()
    end = time.monotonic() + 6.0  # as fast as the suite signs: over any limit, for long
    while time.monotonic() < end:
        s.send(hello(s))
    # Served again once the target has worked through what it took, at its own pace: its
    # drops are silent, so the suite asks again while it stays silent (a ban never ends).
    s.hello(within=60.0)


@case("4.2/1", "MUST", "a ZeroMQ message of two frames is not acted on")
def _(s: Session) -> None:
    s.sock.send_multipart([hello(s), hello(s)])
    for st in s.receive(1.5):
        if not isinstance(st.message, Error):
            raise Failed(f"the message was acted on: the target answered {st.type.name}")
    s.hello()


@case("4.3/2", "MUST", "a frame over MAX_FRAME_BYTES is not answered")
def _(s: Session) -> None:
    s.send(b"\x00" * (MAX_FRAME_BYTES + 1))
    if s.receive(1.5):
        raise Failed("the oversized frame was answered")
    s.reconnect()
    s.hello()


@case(
    "4.4/4",
    "MUST",
    f"a map of more than MAX_MAP_KEYS ({MAX_MAP_KEYS}) keys is MALFORMED, answered without re",
)
def _(s: Session) -> None:
    extra = {f"k{i}": 0 for i in range(MAX_MAP_KEYS)}
    frame = signed_body(s, HELLO, **extra)
    s.send(frame)
    for st in s.receive(1.5):
        if not isinstance(st.message, Error) or st.message.code != ErrorCode.MALFORMED:
            raise Failed(f"answered {st.type.name}, where §6.4 gives MALFORMED")
        if st.message.re is not None:
            raise Failed("the ERROR names re: the body's seq was read past its bounds")
    s.hello()


@case("4.4/5", "MUST", f"an array of more than MAX_ARRAY_ITEMS ({MAX_ARRAY_ITEMS}) is MALFORMED")
def _(s: Session) -> None:
    have = [{"key": bytes(32), "seq": i} for i in range(MAX_ARRAY_ITEMS + 1)]
    frame = signed_body(s, Digest(have=()), have=have)
    if len(frame) > MAX_FRAME_BYTES:
        raise Failed("the suite built an oversized frame")
    ignored(s, frame, ErrorCode.MALFORMED)


@case("4.5/1", "MUST", "a body's unknown field is ignored: the HELLO is answered with PEERS")
def _(s: Session) -> None:
    frame = signed_body(s, HELLO, zz_future="x")
    welcomed(s, frame)


@case("4.5/2", "MUST", "an unknown key in a nested map (a data-address) is ignored too")
def _(s: Session) -> None:
    frame = signed_body(s, HELLO, data=[{"t": "tcp", "addr": "127.0.0.1:9", "zz_future": [1, 2]}])
    welcomed(s, frame)


@case("1/1", "MUST", "a uint written in a signed msgpack format (d0 05) is accepted")
def _(s: Session) -> None:
    frame = signed_body(s, Hello(ctl=HELLO.ctl, data=(), inc=5))
    env = msgpack.unpackb(frame)
    key = msgpack.packb("inc")
    body = env[2].replace(key + b"\x05", key + b"\xd0\x05")
    frame = seal_raw(s.identity, Hello.TYPE, body)
    welcomed(s, frame)


@case("6.2/2", "MUST", "a different body reusing an accepted seq is REPLAYED")
def _(s: Session) -> None:
    first = hello(s)
    s.send(first)
    if s.answer(seq_of(first)) is None:
        raise Failed("the first HELLO was not answered")
    again = signed_body(s, HELLO, seq=seq_of(first), inc=2)
    ignored(s, again, ErrorCode.REPLAYED)


@case("6.5/3", "MUST", "a frame whose signature fails (step 7) is dropped without an answer")
def _(s: Session) -> None:
    env = msgpack.unpackb(hello(s))
    env[4] = bytes(64)
    silent(s, msgpack.packb(env, use_bin_type=True))


@case("6.5/4", "MUST", "a statement refused for SIGNER_MISMATCH is dropped without an answer")
def _(s: Session) -> None:
    silent(s, s.frame(HELLO, signer=Identity.generate()))


@case("6.5/6", "MUST", "a frame of another signer that fails step 8 is dropped without an answer")
def _(s: Session) -> None:
    other = Identity.generate()  # signs validly, but is not this connection's peer
    body = msgpack.unpackb(encode_body(s.header(), HELLO))
    body["inc"] = "one"  # INVALID_FIELD at step 8, before step 10 compares the signer
    silent(s, seal_raw(other, HELLO.TYPE, msgpack.packb(body, use_bin_type=True)))


@case("6.5/5", "MUST", "an ERROR is never answered with an ERROR, even an invalid one")
def _(s: Session) -> None:
    silent(s, s.frame(Error(code=999, msg="a code nobody defined")))
    silent(s, signed_body(s, Error(code=1, msg=""), code=0))


@case("8.1a/1", "MUST", "a HELLO whose ctl names a host, not an IP literal, is INVALID_FIELD")
def _(s: Session) -> None:
    ignored(s, signed_body(s, HELLO, ctl="tcp://localhost:7000"), ErrorCode.INVALID_FIELD)


@case("8.1a/2", "MUST", "a HELLO whose ctl is 0.0.0.0 or port 0 is INVALID_FIELD")
def _(s: Session) -> None:
    ignored(s, signed_body(s, HELLO, ctl="tcp://0.0.0.0:7000"), ErrorCode.INVALID_FIELD)
    ignored(s, signed_body(s, HELLO, ctl="tcp://127.0.0.1:0"), ErrorCode.INVALID_FIELD)


@case("8.1a/3", "MUST", "a data address that is a host name is INVALID_FIELD")
def _(s: Session) -> None:
    data = [{"t": "tcp", "addr": "example.org:7000"}]
    ignored(s, signed_body(s, HELLO, data=data), ErrorCode.INVALID_FIELD)


@case("6.4/6", "MUST", "a rejected frame's seq is not remembered: a valid frame may reuse it")
def _(s: Session) -> None:
    bad = signed_body(s, HELLO, inc="one")
    s.send(bad)
    s.receive(1.0)
    good = signed_body(s, HELLO, seq=seq_of(bad))
    welcomed(s, good)
