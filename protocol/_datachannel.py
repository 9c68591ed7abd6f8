"""Frames of the data channel (spec §9): u8 tag, u32le length, payload.

Only the framing lives here; reading and writing them is the transport's business.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from ._errors import ErrorCode, RemoteProtocolError
from ._limits import MAX_CHUNK_BYTES, MAX_FRAME_BYTES

FRAME_HEADER = struct.Struct("<BI")
CHUNK_INDEX = struct.Struct("<I")


class FrameTag(IntEnum):
    CONTROL = 1
    CHUNK_LIST = 2
    CHUNK = 3
    END = 4


MAX_CHUNK_LIST_BYTES = 32 * (1 << 20)
"""A chunk list names at most 2^20 chunks (64 TiB at the largest chunk size)."""

_MAX_LENGTH = {
    FrameTag.CONTROL: MAX_FRAME_BYTES,
    FrameTag.CHUNK_LIST: MAX_CHUNK_LIST_BYTES,
    FrameTag.CHUNK: CHUNK_INDEX.size + MAX_CHUNK_BYTES,
    FrameTag.END: 0,
}


def frame_header(tag: FrameTag, length: int) -> bytes:
    return FRAME_HEADER.pack(tag, length)


SEAL_BYTES = 16
"""What sealing (§9.6) adds to a frame's payload: the AES-GCM tag that ends it."""


def parse_frame_header(header: bytes, sealed: bool = False) -> tuple[FrameTag, int]:
    """Tag and payload length of a frame, refusing unknown tags and oversize lengths; a
    frame of a sealed stream carries a tag more, and a sealed END is that tag alone."""
    raw_tag, length = FRAME_HEADER.unpack(header)
    try:
        tag = FrameTag(raw_tag)
    except ValueError:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED, f"unknown data frame tag {raw_tag}"
        ) from None
    extra = SEAL_BYTES if sealed else 0
    if sealed and tag == FrameTag.END and length != extra:
        raise RemoteProtocolError(ErrorCode.SIZE_MISMATCH, f"a sealed END of {length} bytes")
    if length > _MAX_LENGTH[tag] + extra:
        code = ErrorCode.FRAME_TOO_LARGE if tag == FrameTag.CONTROL else ErrorCode.SIZE_MISMATCH
        raise RemoteProtocolError(code, f"{tag.name} frame of {length} bytes is too long")
    return tag, length
