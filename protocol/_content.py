"""Content roots (spec §7.5): a payload is cut into fixed-size chunks, each chunk has a
BLAKE3 hash, and the root over the size, the chunk size and the list is what sellers sign.

A receiver that holds the signed root checks the chunk list against it once, then each
chunk against its entry as it lands, so no unchecked byte is ever handed on.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import blake3

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._limits import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from ._naming import lp, u64

CONTENT_ROOT_PURPOSE = b"kvx/content-root/1"


def valid_chunk_size(chunk: int) -> bool:
    return MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES and chunk & (chunk - 1) == 0


def _require_chunk_size(chunk: int) -> None:
    if not valid_chunk_size(chunk):
        raise LocalProtocolError(
            ErrorCode.INVALID_FIELD,
            f"chunk size {chunk} is not a power of two in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]",
        )


def chunk_count(size: int, chunk: int) -> int:
    return -(-size // chunk)


def byte_view(data: object) -> memoryview:
    """The bytes of a buffer or a contiguous CPU torch tensor, without copying them."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already loaded
    if torch is not None and isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or not data.is_contiguous():
            raise LocalProtocolError(
                ErrorCode.INVALID_FIELD, "only contiguous CPU tensors can be hashed in place"
            )
        data = data.reshape(-1).view(torch.uint8).numpy()
    return memoryview(data).cast("B")  # type: ignore[arg-type]


def _hash(piece: memoryview) -> bytes:
    return blake3.blake3(piece, max_threads=blake3.blake3.AUTO).digest()


def chunk_hashes(data: object, chunk: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """The BLAKE3 hash of every chunk of a payload held whole in memory."""
    _require_chunk_size(chunk)
    view = byte_view(data)
    return [_hash(view[start : start + chunk]) for start in range(0, len(view), chunk)]


def content_root(size: int, chunk: int, hashes: Sequence[bytes]) -> bytes:
    """The root a seller signs, from the payload size, chunk size and chunk hash list."""
    _require_chunk_size(chunk)
    if size <= 0:
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, "a payload is never empty")
    if len(hashes) != chunk_count(size, chunk) or any(len(h) != 32 for h in hashes):
        raise LocalProtocolError(
            ErrorCode.INVALID_FIELD,
            f"{size} bytes in {chunk}-byte chunks need {chunk_count(size, chunk)} 32-byte hashes",
        )
    h = blake3.blake3(lp(CONTENT_ROOT_PURPOSE) + u64(size) + u64(chunk))
    for digest in hashes:
        h.update(digest)
    return h.digest()


def verify_chunk_list(root: bytes, size: int, chunk: int, hashes: Sequence[bytes]) -> None:
    """Check a peer's chunk hash list against the root it signed."""
    try:
        ok = content_root(size, chunk, hashes) == root
    except LocalProtocolError as exc:
        raise RemoteProtocolError(ErrorCode.ROOT_MISMATCH, exc.detail) from None
    if not ok:
        raise RemoteProtocolError(ErrorCode.ROOT_MISMATCH, "chunk hashes do not match the root")


class ContentHasher:
    """Builds the chunk list and root from pieces of any size, as they arrive."""

    def __init__(self, chunk: int = DEFAULT_CHUNK_BYTES) -> None:
        _require_chunk_size(chunk)
        self.chunk = chunk
        self.size = 0
        self.hashes: list[bytes] = []
        self._current = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._filled = 0

    def update(self, data: object) -> None:
        view = byte_view(data)
        while view:
            take = min(self.chunk - self._filled, len(view))
            self._current.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == self.chunk:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self.hashes.append(self._current.digest())
        self._current = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._filled = 0

    def finish(self) -> bytes:
        """Close the last (possibly short) chunk and return the root; `hashes` is then whole."""
        if self._filled:
            self._close_chunk()
        return content_root(self.size, self.chunk, self.hashes)
