"""Envelope and body codec: round trips, every truncation, trailing bytes, limits."""

import msgpack
import pytest
from hypothesis import given

from kvx.protocol import (
    MAX_FRAME_BYTES,
    ErrorCode,
    Header,
    Hello,
    LocalProtocolError,
    Lookup,
    MessageType,
    RemoteProtocolError,
    decode_body,
    encode_body,
    encode_envelope,
    parse_envelope,
    signing_input,
)
from strategies import messages

HDR = Header(iat=1_000, exp=2_000, seq=7, to=b"\x01" * 32)
HELLO = Hello(ctl="tcp://127.0.0.1:1", data=(), inc=0)


def frame(body: bytes = b"\x80", mtype: MessageType = MessageType.HELLO) -> bytes:
    return encode_envelope(mtype, body, b"\x02" * 32, b"\x03" * 64)


@given(messages)
def test_every_message_round_trips_exactly(pair):
    header, message = pair
    body = encode_body(header, message)
    assert decode_body(message.TYPE, body) == (header, message)


@given(messages)
def test_envelope_round_trips(pair):
    header, message = pair
    body = encode_body(header, message)
    raw = parse_envelope(frame(body, message.TYPE))
    assert (raw.type, raw.body, raw.signer, raw.signature) == (
        message.TYPE,
        body,
        b"\x02" * 32,
        b"\x03" * 64,
    )


def test_every_truncation_of_a_frame_is_malformed():
    whole = frame(encode_body(HDR, HELLO))
    for cut in range(len(whole)):
        with pytest.raises(RemoteProtocolError) as err:
            parse_envelope(whole[:cut])
        assert err.value.code == ErrorCode.MALFORMED, cut


def test_trailing_bytes_are_malformed():
    body = encode_body(HDR, HELLO)
    for tail in (b"\x00", b"\xc0", body):
        with pytest.raises(RemoteProtocolError) as err:
            parse_envelope(frame(body) + tail)
        assert err.value.code == ErrorCode.MALFORMED
        with pytest.raises(RemoteProtocolError) as err:
            decode_body(MessageType.HELLO, body + tail)
        assert err.value.code == ErrorCode.MALFORMED


def test_frame_at_the_limit_is_parsed_and_one_byte_over_is_not():
    # A bin body padded so the whole frame is exactly MAX_FRAME_BYTES long.
    overhead = len(frame(b""))
    body = b"\x00" * (MAX_FRAME_BYTES - overhead - 3)  # bin8 header (2 B) becomes bin32 (5 B)
    exact = frame(body)
    assert len(exact) == MAX_FRAME_BYTES
    assert parse_envelope(exact).body == body
    with pytest.raises(RemoteProtocolError) as err:
        parse_envelope(exact + b"\x00")
    assert err.value.code == ErrorCode.FRAME_TOO_LARGE


def test_encoder_refuses_a_frame_over_the_limit():
    with pytest.raises(LocalProtocolError) as err:
        frame(b"\x00" * MAX_FRAME_BYTES)
    assert err.value.code == ErrorCode.FRAME_TOO_LARGE


def test_unknown_version_is_reported_before_the_layout_is_checked():
    # Another version may have another envelope shape; only its first item is read.
    for version in (1, 2, 4):  # kvx 0.1 and 0.2, and a future one
        with pytest.raises(RemoteProtocolError) as err:
            parse_envelope(msgpack.packb([version, "anything"]))
        assert err.value.code == ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    ("envelope", "code"),
    [
        ([], ErrorCode.MALFORMED),
        (["1", 1, b"", b"\x00" * 32, b"\x00" * 64], ErrorCode.MALFORMED),
        ([3, "1", b"", b"\x00" * 32, b"\x00" * 64], ErrorCode.MALFORMED),
        ([3, 0, b"", b"\x00" * 32, b"\x00" * 64], ErrorCode.UNKNOWN_TYPE),
        ([3, 1, b"", b"\x00" * 32, b"\x00" * 63], ErrorCode.MALFORMED),
        ([3, 1, b"", "k" * 32, b"\x00" * 64], ErrorCode.MALFORMED),
        ([True, 1, b"", b"\x00" * 32, b"\x00" * 64], ErrorCode.MALFORMED),
    ],
)
def test_bad_envelope_items(envelope, code):
    with pytest.raises(RemoteProtocolError) as err:
        parse_envelope(msgpack.packb(envelope, use_bin_type=True))
    assert err.value.code == code


def test_signing_input_is_length_prefixed_purpose_then_body():
    assert signing_input(MessageType.QUOTE_REQUEST, b"BODY") == (
        b"\x13\x00\x00\x00kvx/quote-request/3BODY"
    )


def test_purposes_are_distinct():
    assert len({t.purpose for t in MessageType}) == len(MessageType)


def body(**fields) -> bytes:
    base = {
        "iat": 1_000,
        "exp": 2_000,
        "seq": 1,
        "to": b"\x01" * 32,
        "fp": b"\x00" * 32,
        "blocks": [b"\x00" * 32],
        "limit": 1,
    }
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None}, use_bin_type=True)


@pytest.mark.parametrize(
    ("fields", "code", "where"),
    [
        ({"limit": 0}, ErrorCode.INVALID_FIELD, "LOOKUP.limit"),
        ({"limit": -1}, ErrorCode.INVALID_FIELD, "LOOKUP.limit"),
        ({"limit": 1.0}, ErrorCode.INVALID_FIELD, "LOOKUP.limit"),
        ({"blocks": [b"\x00" * 32] * 4097}, ErrorCode.INVALID_FIELD, "LOOKUP.blocks"),
        ({"blocks": [b"\x00" * 33]}, ErrorCode.INVALID_FIELD, "LOOKUP.blocks[0]"),
        ({"blocks": b"\x00" * 32}, ErrorCode.INVALID_FIELD, "LOOKUP.blocks"),
        ({"ns": b""}, ErrorCode.INVALID_FIELD, "LOOKUP.ns"),
        ({"seq": -1}, ErrorCode.INVALID_FIELD, "LOOKUP.seq"),
        ({"to": None}, ErrorCode.INVALID_FIELD, "LOOKUP.to"),
        ({"iat": None}, ErrorCode.INVALID_FIELD, "LOOKUP.iat"),
        ({"exp": 500}, ErrorCode.INVALID_FIELD, "LOOKUP.exp"),
        ({"exp": 1_000 + 300_001}, ErrorCode.LIFETIME_TOO_LONG, "LOOKUP.exp"),
    ],
)
def test_field_rules(fields, code, where):
    with pytest.raises(RemoteProtocolError) as err:
        decode_body(MessageType.LOOKUP, body(**fields))
    assert err.value.code == code
    assert where in err.value.detail


def test_duplicate_and_non_str_keys_are_malformed():
    dup = b"\x82" + msgpack.packb("seq") + b"\x01" + msgpack.packb("seq") + b"\x02"
    binkey = msgpack.packb({b"seq": 1}, use_bin_type=True)
    for raw in (dup, binkey):
        with pytest.raises(RemoteProtocolError) as err:
            decode_body(MessageType.LOOKUP, raw)
        assert err.value.code == ErrorCode.MALFORMED


def test_deep_nesting_is_malformed_not_a_crash():
    nested = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(RemoteProtocolError) as err:
        decode_body(MessageType.LOOKUP, nested)
    assert err.value.code == ErrorCode.MALFORMED


def test_encoder_refuses_out_of_bounds_values():
    bad = Lookup(fp=b"\x00" * 32, blocks=(b"\x00" * 32,), limit=99)
    with pytest.raises(LocalProtocolError) as err:
        encode_body(HDR, bad)
    assert err.value.code == ErrorCode.INVALID_FIELD
    assert "LOOKUP.limit" in err.value.detail


def test_item_shapes_are_checked_before_the_type_is_looked_up():
    # Spec §6.4: step 5 (items 2-4) comes before step 6 (known type).
    with pytest.raises(RemoteProtocolError) as err:
        parse_envelope(msgpack.packb([3, 99, "not bin", b"\x00" * 32, b"\x00" * 64]))
    assert err.value.code == ErrorCode.MALFORMED
