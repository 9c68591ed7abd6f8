"""Where received chunks land: straight into a CPU tensor's memory, or through pinned host
staging into a CUDA tensor, so that only verified bytes ever reach the device.
"""

from __future__ import annotations

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

    def commit(self, index: int, landed: memoryview) -> None:
        """Place a verified chunk into the destination."""
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

    def scrub(self, first_unverified: int) -> None:
        """Zero everything from chunk `first_unverified` on: no unchecked byte stays."""
        self.finish()
        self._flat[first_unverified * self.expected.chunk :].zero_()
