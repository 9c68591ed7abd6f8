"""The msgpack codec: envelopes (spec §5) and bodies (spec §6, §8).

Decoding is split in two so that nothing decodes a body before its signature is checked:
`parse_envelope` yields the raw signed bytes, the trust layer verifies them against
`signing_input`, and only then does `decode_body` look inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._limits import (
    MAX_ARRAY_ITEMS,
    MAX_FRAME_BYTES,
    MAX_MAP_KEYS,
    MAX_UNKNOWN_BYTES,
    PROTOCOL_VERSION,
)
from ._messages import MESSAGE_CLASSES, RELAYABLE, Header, Message, MessageType, check_header
from ._schema import Invalid, decode_struct, encode_struct, unknown_bytes


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    # msgpack keeps the last of two equal keys; a signed body must mean one thing only.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate map key")
    if not all(type(k) is str for k in out):
        raise ValueError("map keys must be str")
    return out


def _unpack(data: bytes, what: str) -> object:
    if len(data) > MAX_FRAME_BYTES:
        raise RemoteProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"{what} of {len(data)} bytes exceeds {MAX_FRAME_BYTES}"
        )
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_pairs,
            max_ext_len=0,
            # Counts are bounded before anything is built, so that a frame of a million
            # tiny keys costs the sender more than it costs us (spec §4.4).
            max_map_len=MAX_MAP_KEYS,
            max_array_len=MAX_ARRAY_ITEMS,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # msgpack's own errors (truncation, trailing bytes, bad UTF-8, ext types,
        # nesting depth) all derive from these.
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{what}: {exc}") from None


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


@dataclass(frozen=True)
class RawEnvelope:
    """An envelope whose body has not been verified or decoded yet."""

    version: int
    type: MessageType
    body: bytes
    signer: bytes
    signature: bytes


def body_seq(body: bytes) -> int | None:
    """The `seq` of a body that failed its checks, for an ERROR's `re` (spec §6.5): read
    under the same bounds as any body, so a body refused before it could be built (over
    MAX_MAP_KEYS, say) is never built for its seq either, and has none."""
    try:
        obj = _unpack(body, "body")
    except RemoteProtocolError:
        return None
    seq = obj.get("seq") if isinstance(obj, dict) else None
    return seq if type(seq) is int and 0 <= seq < 2**64 else None


def parse_envelope(frame: bytes) -> RawEnvelope:
    """Split a frame into its envelope fields (spec §6.4 steps 1-6, in order).

    Raises only RemoteProtocolError.
    """
    obj = _unpack(frame, "frame")
    if type(obj) is not list or not obj:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "an envelope is a non-empty array")
    version = obj[0]
    if type(version) is not int or version < 0:  # a negative integer is no uint (§6.4)
        raise RemoteProtocolError(ErrorCode.MALFORMED, "the envelope version is not a uint")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"version {version}, this node speaks {PROTOCOL_VERSION}"
        )
    if len(obj) != 5:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"an envelope has 5 items, not {len(obj)}")
    _, mtype, body, signer, signature = obj
    if type(mtype) is not int or mtype < 0:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "the message type is not a uint")
    if type(body) is not bytes:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "the body is not bin")
    if type(signer) is not bytes or len(signer) != 32:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "the signer is not a 32-byte bin")
    if type(signature) is not bytes or len(signature) != 64:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "the signature is not a 64-byte bin")
    if mtype not in MessageType._value2member_map_:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, f"message type {mtype} is not known")
    return RawEnvelope(version, MessageType(mtype), body, signer, signature)


def encode_envelope(mtype: MessageType, body: bytes, signer: bytes, signature: bytes) -> bytes:
    if len(signer) != 32 or len(signature) != 64:
        raise LocalProtocolError(ErrorCode.MALFORMED, "signer has 32 bytes, signature 64")
    frame = _pack([PROTOCOL_VERSION, int(mtype), body, signer, signature])
    if len(frame) > MAX_FRAME_BYTES:
        raise LocalProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"{mtype.name} frame of {len(frame)} bytes is too large"
        )
    return frame


def signing_input(mtype: MessageType, body: bytes) -> bytes:
    """The exact bytes an Ed25519 signature covers: length-prefixed purpose, then body."""
    purpose = mtype.purpose
    return len(purpose).to_bytes(4, "little") + purpose + body


def encode_body(header: Header, message: Message) -> bytes:
    """The msgpack map for a header and message; out-of-bounds values raise LocalProtocolError."""
    mtype = message.TYPE
    try:
        fields = encode_struct(header, mtype.name) | encode_struct(message, mtype.name)
        check_header(mtype, header)
    except Invalid as exc:
        raise LocalProtocolError(exc.code, str(exc)) from None
    return _pack(fields)


def decode_body(mtype: MessageType, body: bytes) -> tuple[Header, Message]:
    """Decode a verified body; raises only RemoteProtocolError."""
    fields = _unpack(body, "body")
    if type(fields) is not dict:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "a body is a map")
    try:
        header = decode_struct(Header, fields, mtype.name)
        check_header(mtype, header)
        message = decode_struct(MESSAGE_CLASSES[mtype], fields, mtype.name)
        if mtype in RELAYABLE:  # kept and relayed by every node: no room for ballast
            extra = unknown_bytes(MESSAGE_CLASSES[mtype], fields, Header)
            if extra > MAX_UNKNOWN_BYTES:
                raise Invalid(
                    mtype.name, f"{extra} bytes of unknown fields (at most {MAX_UNKNOWN_BYTES})"
                )
    except Invalid as exc:
        raise RemoteProtocolError(exc.code, str(exc)) from None
    return header, message
