"""Where received chunks land: straight into a CPU tensor's memory, or through pinned host
staging into a CUDA tensor, so that only verified bytes ever reach the device; or, for a
caller that owns the final memory (a model's KV cache), scattered straight into it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvx.protocol import ErrorCode, RemoteProtocolError, byte_view

if TYPE_CHECKING:
    import torch

from ._verify import Expected


class Destination:
    """A caller's preallocated tensor viewed as the first `deliver` bytes of a payload.

    `landing` gives the memory a chunk is received into; `commit` makes a verified chunk
    part of the result; `scrub` wipes what was not verified when a stream fails.
    """

    def __init__(self, tensor: torch.Tensor, expected: Expected) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if expected.deliver > nbytes:
            raise RemoteProtocolError(
                ErrorCode.SIZE_MISMATCH,
                f"the payload ({expected.deliver} bytes) is larger than the destination ({nbytes})",
            )
        if not tensor.is_contiguous():
            raise ValueError("the destination tensor must be contiguous")
        import torch  # a node that only serves never needs it; a buyer has it loaded already

        self.expected = expected
        self.tensor = tensor
        self.on_gpu = tensor.device.type == "cuda"
        # Several streams may land in it at once (§9.7) only where each chunk lands in
        # place: a GPU's staging buffers are shared by all chunks.
        self.concurrent = not self.on_gpu
        flat = tensor.reshape(-1).view(torch.uint8)[: expected.deliver]
        self._flat = flat
        chunk = expected.chunk
        if self.on_gpu:
            # Three pinned buffers: one being hashed and copied, two being received into
            # (a pipelined transport posts the next chunk's landing ahead).
            self._staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in "abc"]
            self._events = [torch.cuda.Event() for _ in "abc"]
            self._view = None
        else:
            self._staging = [torch.empty(chunk, dtype=torch.uint8)]  # for a last, partial chunk
            self._view = byte_view(flat)

    def _span(self, index: int) -> tuple[int, int]:
        start = index * self.expected.chunk
        return start, min(start + self.expected.length(index), self.expected.deliver)

    def segments(self, index: int) -> list[memoryview]:
        """Where chunk `index` is received, in order: one piece of memory here (a scatter
        destination gives several)."""
        return [self.landing(index)]

    def landing(self, index: int) -> memoryview:
        """Memory of exactly the chunk's length to receive chunk `index` into."""
        start, stop = self._span(index)
        length = self.expected.length(index)
        if self.on_gpu:
            slot = index % len(self._staging)
            self._events[slot].synchronize()  # its previous copy to the device is done
            return byte_view(self._staging[slot])[:length]
        if stop - start == length:
            assert self._view is not None
            return self._view[start:stop]  # in place, no copy at all
        return byte_view(self._staging[0])[:length]  # the chunk runs past what is kept

    def commit(self, index: int, landed: memoryview | list[memoryview]) -> None:
        """Place a verified chunk into the destination."""
        if isinstance(landed, list):
            (landed,) = landed
        start, stop = self._span(index)
        if self.on_gpu:
            slot = index % len(self._staging)
            self._flat[start:stop].copy_(self._staging[slot][: stop - start], non_blocking=True)
            self._events[slot].record()
        elif stop - start != self.expected.length(index):  # it landed in staging
            assert self._view is not None
            self._view[start:stop] = landed[: stop - start]

    def finish(self) -> None:
        if self.on_gpu:
            import torch

            torch.cuda.current_stream().synchronize()

    def read(self, start: int, stop: int) -> bytes:
        """Delivered payload bytes [start, stop), as they landed (for evidence)."""
        self.finish()
        return self._flat[start:stop].cpu().numpy().tobytes()

    def scrub(self, first_unverified: int) -> None:
        """Zero everything from chunk `first_unverified` on: no unchecked byte stays."""
        self.finish()
        self._flat[first_unverified * self.expected.chunk :].zero_()


class ScatterDestination(Destination):
    """A payload received straight into memory its caller lays out, one copy from the
    socket: `place(start, stop)` names the pieces of memory that payload bytes
    [start, stop) land in, in order (the pieces of a KV cache's layers, say).

    Bytes land before their chunk is verified, as they do in a tensor destination: the
    caller hands the memory on only after the whole fetch verified, and a failed fetch
    scrubs everything it did not verify. Transports that cannot scatter (UCX) receive
    a chunk whole into staging and `commit` copies it out.
    """

    def __init__(self, expected: Expected, place: Callable[[int, int], list[memoryview]]) -> None:
        import torch

        self.expected = expected
        self.on_gpu = False
        self.concurrent = True
        self._place = place
        self._staging = [torch.empty(expected.chunk, dtype=torch.uint8)]  # a last chunk's spill

    def segments(self, index: int) -> list[memoryview]:
        start, stop = self._span(index)
        pieces = self._place(start, stop)
        spill = self.expected.length(index) - (stop - start)
        if spill:  # the last chunk runs past what is kept: read the rest into staging
            pieces.append(byte_view(self._staging[0])[:spill])
        return pieces

    def landing(self, index: int) -> memoryview:
        """Memory of its own for a chunk received whole (UCX), however many streams land
        at once: `commit` copies it into place."""
        return memoryview(bytearray(self.expected.length(index)))

    def commit(self, index: int, landed: memoryview | list[memoryview]) -> None:
        if isinstance(landed, list):  # scattered in place already
            return
        at = 0
        for piece in self._place(*self._span(index)):
            piece[:] = landed[at : at + len(piece)]
            at += len(piece)

    def finish(self) -> None:
        pass

    def read(self, start: int, stop: int) -> bytes:
        return b"".join(bytes(piece) for piece in self._place(start, stop))

    def scrub(self, first_unverified: int) -> None:
        start = first_unverified * self.expected.chunk
        if start < self.expected.deliver:
            for piece in self._place(start, self.expected.deliver):
                piece[:] = bytes(len(piece))
