"""The UCX data channel (spec §9.3): the TCP channel's frames over a ucxx endpoint.

UCX messages have sizes, not a byte stream, so each frame travels as its 5-byte header
message, then its payload; a CHUNK's payload is two messages, the 4-byte index and the
chunk bytes, so the bytes land straight in their landing memory (RDMA where UCX finds
it). Two chunks are in flight each way, and the buyer answers END with END, after which
the seller closes. ucxx is an optional extra (`kvx[ucx]`), imported only when used.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ucxx

from kvx.protocol import (
    CHUNK_INDEX,
    FRAME_HEADER,
    SEAL_BYTES,
    Direction,
    ErrorCode,
    FrameTag,
    ProtocolError,
    RemoteProtocolError,
    SealedChannel,
    frame_header,
    parse_frame_header,
)

from ._destination import Destination
from ._port import DataPort
from ._receiving import Receiving
from ._serving import Next, Serving
from ._tcp import remote_error, split_address
from ._verify import StreamVerifier


def _array(view: memoryview) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8)


async def _recv(ep: ucxx.Endpoint, n: int) -> bytes:
    buf = np.empty(n, dtype=np.uint8)
    await ep.recv(buf)
    return buf.tobytes()


async def _read_header(ep: ucxx.Endpoint, sealed: bool = False) -> tuple[FrameTag, int]:
    return parse_frame_header(await _recv(ep, FRAME_HEADER.size), sealed)


async def _send(ep: ucxx.Endpoint, tag: FrameTag, *parts: bytes | memoryview) -> None:
    await ep.send(np.frombuffer(frame_header(tag, sum(len(p) for p in parts)), dtype=np.uint8))
    for part in parts:
        await ep.send(np.frombuffer(part, dtype=np.uint8))


async def _send_frame(
    ep: ucxx.Endpoint, channel: SealedChannel | None, tag: FrameTag, payload: bytes = b""
) -> None:
    """A whole frame that is not a CHUNK: its header message, then its payload, sealed
    when the stream is (§9.6)."""
    if channel is None:
        await _send(ep, tag, *([payload] if payload else []))
    else:
        frame = channel.frame(tag, payload)
        await _send(ep, tag, frame[FRAME_HEADER.size :])


async def _recv_frame(
    ep: ucxx.Endpoint, channel: SealedChannel | None, tag: FrameTag, length: int
) -> bytes:
    body = await _recv(ep, length) if length else b""
    return body if channel is None else channel.open(tag, body)


async def _receive(
    ep: ucxx.Endpoint,
    transfer_frame: bytes,
    verifier: StreamVerifier,
    dest: Destination,
    pay: Callable[[int], bytes] | None = None,
    key: bytes | None = None,
) -> None:
    """The UCX twin of TcpReceiver's loop: same checks, same payment window, same sealing,
    same resume point on failure. A sealed chunk is three messages after its header: the
    index, the ciphertext (into the landing memory) and the tag."""
    channel = None if key is None else SealedChannel(key, Direction.TO_SELLER)
    sealed = channel is not None
    await _send(ep, FrameTag.CONTROL, transfer_frame)
    tag, length = await _read_header(ep, sealed)
    if verifier.frame(tag) == FrameTag.CONTROL:  # refused at admission, before any key
        raise remote_error(await _recv(ep, length))
    verifier.chunk_list(await _recv_frame(ep, channel, tag, length))

    loop = asyncio.get_running_loop()

    def verify(index: int, landed: memoryview, mac: np.ndarray) -> None:
        if channel is not None:
            channel.open_chunk(index, [landed], mac.tobytes())
        verifier.check(index, landed)
        dest.commit(index, landed)

    def post(index: int) -> tuple[int, np.ndarray, np.ndarray, memoryview, np.ndarray, Any]:
        # The buyer knows every chunk's index and length in advance, so the receives for
        # the next chunk are posted while this one is still arriving: no rendezvous bubble.
        head, idx, landed = np.empty(5, np.uint8), np.empty(4, np.uint8), dest.landing(index)
        mac = np.empty(SEAL_BYTES if sealed else 0, np.uint8)
        receives = [ep.recv(head), ep.recv(idx), ep.recv(_array(landed))]
        if sealed:
            receives.append(ep.recv(mac))
        return index, head, idx, landed, mac, asyncio.gather(*receives)

    window = [post(i) for i in range(verifier.verified, min(verifier.verified + 2, verifier.stop))]
    with ThreadPoolExecutor(1, thread_name_prefix="kvx-verify") as hasher:
        pending: asyncio.Future[None] | None = None
        try:
            while window:
                index, head, idx, landed, mac, done = window.pop(0)
                try:
                    await done
                except ucxx.exceptions.UCXMsgTruncated:
                    raise RemoteProtocolError(
                        ErrorCode.SIZE_MISMATCH, f"chunk {index} is longer than announced"
                    ) from None
                tag, length = parse_frame_header(head.tobytes(), sealed)
                if verifier.frame(tag) == FrameTag.END:
                    verifier.end()  # before every chunk came: STREAM_TRUNCATED
                if tag != FrameTag.CHUNK:  # a refusal's body went to posted buffers
                    raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{tag.name} frame")
                (sent_index,) = CHUNK_INDEX.unpack(idx.tobytes())
                verifier.begin_chunk(sent_index, length - CHUNK_INDEX.size - mac.size)
                if pending is not None:
                    await pending
                pending = loop.run_in_executor(hasher, verify, index, landed, mac)
                if verifier.window_full:  # the seller waits: pay for what verified
                    await pending
                    pending = None
                    due = verifier.payment_due()
                    assert due is not None and pay is not None
                    await _send_frame(ep, channel, FrameTag.CONTROL, pay(due))
                if index + 2 < verifier.stop:
                    window.append(post(index + 2))
        finally:
            for *_, done in window:
                done.cancel()
            # Collect what the cancelled receives raised, so none is left unretrieved.
            await asyncio.gather(*(done for *_, done in window), return_exceptions=True)
            if pending is not None:
                with contextlib.suppress(ProtocolError):
                    await pending
        if pending is not None:
            await pending
    tag, length = await _read_header(ep, sealed)
    if verifier.frame(tag) != FrameTag.END:
        raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{tag.name} instead of END")
    await _recv_frame(ep, channel, tag, length)
    verifier.end()
    dest.finish()
    await _send_frame(ep, channel, FrameTag.END)  # the seller may close: everything arrived


class UcxReceiver(Receiving):
    """The buyer's end of one stream over UCX, as TcpReceiver is over TCP. Its chunks
    are received ahead into posted buffers, so the buyer cannot take a shorter stream
    than it asked for: `shorten` declines, and the buyer stripes UCX streams by the
    ranges it opens them with (§9.7)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        try:
            await self._task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise RemoteProtocolError(ErrorCode.STREAM_TRUNCATED, "abandoned") from None

    async def _run(self) -> None:
        host, port = split_address(self.address)
        try:
            ep = await ucxx.create_endpoint(host, port)
        except Exception as exc:  # ucxx raises its own error types for unreachable peers
            raise RemoteProtocolError(
                ErrorCode.UNAVAILABLE, f"cannot reach {self.address}: {exc}"
            ) from None
        try:
            async with asyncio.timeout(self.timeout_s + self.verifier.carried / (1 << 20)):
                await _receive(ep, self.opening, self.verifier, self.dest, self.pay, self.key)
        except TimeoutError:
            raise RemoteProtocolError(ErrorCode.TIMEOUT, "the stream stalled") from None
        except ucxx.exceptions.UCXError as exc:
            raise RemoteProtocolError(
                ErrorCode.STREAM_TRUNCATED, f"the stream broke: {exc}"
            ) from None
        finally:
            await ep.close()

    def shorten(self, stop: int, frame: bytes) -> bool:
        return False

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class UcxDataServer(DataPort):
    """A seller's UCX data port; serves each buyer's stream on the event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener: ucxx.Listener | None = None
        self._host = "127.0.0.1"
        self._active: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._listener is not None
        return f"{self._host}:{self._listener.port}"

    @property
    def streams(self) -> int:
        return len(self._active)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._listener = ucxx.create_listener(self._serve, port=port or None)

    async def _serve(self, ep: ucxx.Endpoint) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        task.add_done_callback(self._active.discard)
        try:
            await self._stream(ep)
        finally:
            await ep.close()

    async def _stream(self, ep: ucxx.Endpoint) -> None:
        """Admit the TRANSFER and stream it; tell how it ended."""
        try:
            tag, length = await _read_header(ep)
            if tag != FrameTag.CONTROL:
                return
            frame = await _recv(ep, length)
            # open() may wait for the quote's ACCEPT, which this very loop must process.
            opening = await asyncio.to_thread(self.open, frame)
        except (ucxx.exceptions.UCXError, TimeoutError):
            return
        whole, cut = False, None
        try:
            if opening.reply is not None:
                await _send(ep, FrameTag.CONTROL, opening.reply)
            serving = opening.serving
            if serving is not None:
                # No thread is held here, but a task and its buffers are: the same deadline
                # as TCP's for the whole stream, from its size and the minimum rate (§9.5).
                deadline = self.limits.stall_s + serving.size / self.limits.min_rate
                try:
                    async with asyncio.timeout(deadline):
                        whole = await self._send_stream(ep, serving)
                except TimeoutError:
                    cut = "the stream's deadline passed"
        except ucxx.exceptions.UCXError:
            pass  # the buyer went away
        finally:
            self.ended(opening, whole, cut)

    async def _send_stream(self, ep: ucxx.Endpoint, serving: Serving) -> bool:
        """The stream's frames; the buyer's are read when the window is full (over UCX a
        TRANSFER that ends the stream sooner takes effect there, §9.7)."""
        offer = serving.offer
        channel = None if offer.key is None else SealedChannel(offer.key, Direction.TO_BUYER)
        sealed = channel is not None
        await _send_frame(ep, channel, FrameTag.CHUNK_LIST, b"".join(offer.hashes))
        scratch = [bytearray(offer.expected.chunk if sealed else 0) for _ in range(3)]
        inflight: list[asyncio.Future[list[Any]]] = []
        while (step := serving.next()) is not Next.END:
            if step is Next.RECEIPT:  # the window is used up: wait for the buyer's frame
                await asyncio.gather(*inflight)
                inflight.clear()
                tag, length = await _read_header(ep, sealed)
                if tag != FrameTag.CONTROL:
                    return False
                frame = await _recv_frame(ep, channel, tag, length)
                # From a worker thread, as on TCP: `record` waits for the node's loop.
                reply = await asyncio.to_thread(serving.control, frame, self.now_ms())
                if serving.refused is not None:  # the buyer gets no more
                    if reply is not None:
                        await _send_frame(ep, channel, FrameTag.CONTROL, reply)
                    return False
                continue
            index = serving.sent
            data = offer.chunk(index)
            if channel is None:
                head = frame_header(FrameTag.CHUNK, CHUNK_INDEX.size + len(data))
                parts: list[bytes | memoryview] = [head + CHUNK_INDEX.pack(index), data]
            else:  # three buffers rotate with the three sends that may be in flight
                out = memoryview(scratch[index % 3])[: len(data)]
                clear, mac = channel.chunk_frame(index, data, out)
                parts = [clear, out, mac]
            # Two chunks in flight: the next is posted before this one has left.
            inflight.append(
                asyncio.gather(
                    ep.send(np.frombuffer(parts[0][: FRAME_HEADER.size], dtype=np.uint8)),
                    ep.send(np.frombuffer(parts[0][FRAME_HEADER.size :], dtype=np.uint8)),
                    *(ep.send(_array(memoryview(p))) for p in parts[1:]),
                )
            )
            if len(inflight) > 2:
                await inflight.pop(0)
            serving.chunk_sent()
        await asyncio.gather(*inflight)
        await _send_frame(ep, channel, FrameTag.END)
        # A completed UCX send only means the buffer is free, not that it arrived: close
        # after the buyer's END, or the last chunks may die with the endpoint. A request
        # to end sooner may cross the END (§9.7): it comes first, and is dropped.
        while True:
            tag, length = await _read_header(ep, sealed)
            await _recv_frame(ep, channel, tag, length)  # opened: a sealed one must verify
            if tag == FrameTag.END:
                return True
            if tag != FrameTag.CONTROL:
                return False

    async def close(self) -> None:
        """Finish the streams under way, then stop listening."""
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in self._active if t is not current), return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
