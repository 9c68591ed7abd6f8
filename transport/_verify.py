"""The buyer's side of a stream as a sans-I/O state machine (spec §9.2).

It knows what the signed quote promised and decides, for every frame the seller sends,
whether it may be read and where it goes; the I/O loops only move bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

from kvx.protocol import (
    ErrorCode,
    FrameTag,
    Quote,
    RemoteProtocolError,
    chunk_count,
    receipt_price,
    verify_chunk_list,
)


@dataclass(frozen=True)
class Expected:
    """What the buyer knows before any byte arrives, all from the seller's signed QUOTE."""

    root: bytes
    size: int  # bytes the root covers
    chunk: int
    deliver: int  # bytes the buyer keeps: a prefix of the payload
    window: int = 0  # chunks the seller sends before it waits for a receipt; 0: no window
    price: int = 0  # of the whole delivery, which window receipts pay pro rata

    @classmethod
    def from_quote(cls, quote: Quote) -> Expected:
        return cls(
            root=quote.root,
            size=quote.size,
            chunk=quote.chunk,
            deliver=quote.deliver,
            window=(quote.window or 0) // quote.chunk,
            price=quote.price,
        )

    @property
    def content(self) -> tuple[bytes, int, int, int]:
        """What makes two providers' streams interchangeable chunk for chunk."""
        return (self.root, self.size, self.chunk, self.deliver)

    def paid_price(self, paid_bytes: int) -> int:
        """The price a receipt for the first `paid_bytes` of the delivery states (§9.4)."""
        return receipt_price(self.price, paid_bytes, self.deliver)

    @property
    def chunks(self) -> int:
        """Chunks of the whole payload (the length of the chunk list)."""
        return chunk_count(self.size, self.chunk)

    @property
    def needed(self) -> int:
        """Chunks the buyer must receive to hold `deliver` bytes."""
        return chunk_count(self.deliver, self.chunk)

    def length(self, index: int) -> int:
        return min(self.chunk, self.size - index * self.chunk)


def _fail(code: ErrorCode, detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, detail)


class StreamVerifier:
    """One stream from chunk `first` up to (not including) chunk `stop` (§9.7); the
    buyer may ask it to end sooner (`shorten`), and the seller then ends it at the chunk
    asked for or after the chunks it had sent already. `verified` is the first chunk of
    the stream not yet verified."""

    def __init__(self, expected: Expected, first: int = 0, stop: int | None = None) -> None:
        stop = expected.needed if stop is None else stop
        if not 0 <= first < stop <= expected.needed or expected.deliver > expected.size:
            raise ValueError("the stream's chunks lie outside the delivery")
        self.expected = expected
        self.verified = first
        self.start = first  # where this stream began: its receipts count from here (§9.4)
        self.paid = first  # chunks this stream's receipts cover (a window counts from here)
        self.stop = stop  # the chunk after the last the seller may send
        self.asked = stop  # the chunk after the last the buyer still wants
        self._next = first
        self._hashes: list[bytes] | None = None

    @property
    def last(self) -> int:
        """The stream's last chunk, as its TRANSFER names it."""
        return self.stop - 1

    def shorten(self, stop: int) -> bool:
        """The buyer asks the seller to end the stream before chunk `stop`; False when
        the stream already ends there or `stop` leaves it nothing (a TRANSFER's `last` is
        never before its `first`). Window receipts are decided by what was asked from then
        on: the seller reads the request before it waits for a receipt it would not need.
        A `stop` the stream has passed already is a request like any other: the seller
        ends after what it has sent (§9.7)."""
        if not self.start < stop < self.asked:
            return False
        self.asked = stop
        return True

    def payment_due(self) -> int | None:
        """Bytes to receipt now, when every chunk of the window has verified and the
        stream goes on: the seller sends no further chunk before that receipt (§9.4).
        They count from this stream's first chunk: what another provider sent is not
        this one's."""
        window = self.expected.window
        if window and self.verified == self.paid + window < self.asked:
            self.paid = self.verified
            return (self.verified - self.start) * self.expected.chunk
        return None

    @property
    def carried(self) -> int:
        """Bytes of the delivery this stream carries, from its first chunk to its end."""
        chunk = self.expected.chunk
        return min(self.stop * chunk, self.expected.deliver) - self.start * chunk

    @property
    def window_full(self) -> bool:
        """Whether the chunk just admitted is the last the seller sends before a receipt."""
        window = self.expected.window
        return bool(window) and self._next == self.paid + window < self.asked

    @property
    def complete(self) -> bool:
        return self.verified == self.stop

    def frame(self, tag: FrameTag) -> FrameTag:
        """Admit the tag of the seller's next frame (§9.2): its refusal (CONTROL) at any
        time, the chunk list first, then chunks, then END."""
        due = (FrameTag.CHUNK_LIST,) if self._hashes is None else (FrameTag.CHUNK, FrameTag.END)
        if tag != FrameTag.CONTROL and tag not in due:
            expected = " or ".join(t.name for t in due)
            raise _fail(ErrorCode.UNEXPECTED_MESSAGE, f"{tag.name} where {expected} was due")
        return tag

    def chunk_list(self, payload: bytes) -> None:
        """Check the seller's chunk list against the signed root before any chunk is read."""
        if self._hashes is not None:
            raise _fail(ErrorCode.UNEXPECTED_MESSAGE, "a second chunk list in one stream")
        n = self.expected.chunks
        if len(payload) != 32 * n:
            raise _fail(
                ErrorCode.ROOT_MISMATCH, f"chunk list of {len(payload)} bytes, not {32 * n}"
            )
        hashes = [payload[i : i + 32] for i in range(0, len(payload), 32)]
        verify_chunk_list(self.expected.root, self.expected.size, self.expected.chunk, hashes)
        self._hashes = hashes

    @property
    def chunk_list_bytes(self) -> bytes:
        """The stream's chunk list, verified against the root (what evidence quotes)."""
        return b"".join(self._hashes or ())

    def begin_chunk(self, index: int, length: int) -> None:
        """Admit the header of the next chunk; its bytes may then be read."""
        if self._hashes is None:
            raise _fail(ErrorCode.UNEXPECTED_MESSAGE, "a chunk before the chunk list")
        if index != self._next or index >= self.stop:
            raise _fail(ErrorCode.SIZE_MISMATCH, f"chunk {index} where {self._next} was due")
        if length != self.expected.length(index):
            raise _fail(
                ErrorCode.SIZE_MISMATCH,
                f"chunk {index} of {length} bytes, not {self.expected.length(index)}",
            )
        self._next += 1

    def check(self, index: int, data: memoryview | list[memoryview]) -> None:
        """Verify a received chunk (whole, or as the pieces it landed in, in order)."""
        assert self._hashes is not None and index == self.verified
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for piece in data if isinstance(data, list) else (data,):
            hasher.update(piece)
        if hasher.digest() != self._hashes[index]:
            raise _fail(ErrorCode.CHUNK_HASH_MISMATCH, f"chunk {index} does not match its hash")
        self.verified += 1

    def end(self) -> None:
        """The seller said END: every chunk asked for must have arrived (a shortened
        stream may bring the ones the seller sent before it read the request)."""
        if not self.asked <= self._next <= self.stop:
            raise _fail(
                ErrorCode.STREAM_TRUNCATED,
                f"END after chunk {self._next - 1}; the stream runs to {self.asked - 1}",
            )
        self.stop = self._next
