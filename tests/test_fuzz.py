"""Peer input, however broken, raises RemoteProtocolError and nothing else."""

import contextlib

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from kvx.protocol import (
    MessageType,
    RemoteProtocolError,
    decode_body,
    encode_body,
    encode_envelope,
    parse_envelope,
    signing_input,
)
from kvx.trust import Identity, Inbox, seal
from strategies import messages

ME = Identity.from_seed(b"\x07" * 32)
INBOX_KEY = b"\x09" * 32


def only_remote_errors(fn, *args) -> None:
    with contextlib.suppress(RemoteProtocolError):
        fn(*args)


def receive(frame: bytes) -> None:
    # A fresh inbox each time: a frame that decodes must still pass every later check.
    Inbox(ME.node_id).receive(frame, now_ms=0, peer_curve_key=INBOX_KEY)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_random_bytes(data):
    only_remote_errors(parse_envelope, data)
    only_remote_errors(receive, data)
    for mtype in MessageType:
        only_remote_errors(decode_body, mtype, data)


@settings(max_examples=500)
@given(msgpack_values, st.sampled_from(list(MessageType)))
def test_random_msgpack_structures(value, mtype):
    packed = msgpack.packb(value, use_bin_type=True)
    only_remote_errors(parse_envelope, packed)
    only_remote_errors(decode_body, mtype, packed)


@st.composite
def mutated_frames(draw):
    header, message = draw(messages)
    frame = bytearray(seal(ME, message, header))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(frame) - 1))
        if op == "flip":
            frame[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del frame[at]
        else:
            del frame[at:]
        if not frame:
            break
    return bytes(frame)


@settings(max_examples=500)
@given(mutated_frames())
def test_mutated_valid_frames(frame):
    only_remote_errors(receive, frame)


@settings(max_examples=300)
@given(messages, msgpack_values, st.text(max_size=6))
def test_signed_bodies_with_mutated_fields(pair, junk, key):
    # A correctly signed body with one field replaced by junk reaches the field checks.
    header, message = pair
    fields = msgpack.unpackb(encode_body(header, message))
    fields[key if key else next(iter(fields))] = junk
    body = msgpack.packb(fields, use_bin_type=True)
    sig = ME.sign(signing_input(message.TYPE, body))
    only_remote_errors(receive, encode_envelope(message.TYPE, body, ME.public_key, sig))
