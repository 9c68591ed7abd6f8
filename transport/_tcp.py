"""The TCP data channel (spec §9.1): frames over a plain stream socket.

The byte-moving loops are blocking and run in worker threads: `recv_into` with
MSG_WAITALL puts a whole chunk straight into its landing memory in one call, and a
second thread hashes chunk i while chunk i+1 arrives. asyncio only starts and joins them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from kvx.protocol import (
    CHUNK_INDEX,
    FRAME_HEADER,
    Error,
    ErrorCode,
    FrameTag,
    ProtocolError,
    RemoteProtocolError,
    frame_header,
    parse_frame_header,
)
from kvx.trust import Inbox, Signer, open_envelope

from ._destination import Destination
from ._sessions import Offer, Sessions, admit
from ._verify import StreamVerifier


def set_stall_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose reads and writes fail after `seconds` without progress.

    Kernel timeouts keep the socket truly blocking, so MSG_WAITALL fills a whole chunk in
    one call; Python's own socket timeout would turn each receive into a poll loop.
    """
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a TCP data address is HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; a peer that closes first has truncated the stream."""
    while view:
        got = sock.recv_into(view, len(view), socket.MSG_WAITALL)
        if got == 0:
            raise RemoteProtocolError(ErrorCode.STREAM_TRUNCATED, "the peer closed the stream")
        view = view[got:]


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def _read_header(sock: socket.socket) -> tuple[FrameTag, int]:
    return parse_frame_header(_recv_bytes(sock, FRAME_HEADER.size))


def remote_error(frame: bytes) -> RemoteProtocolError:
    """The seller's ERROR, turned into the error it reports."""
    message = open_envelope(frame).message
    if not isinstance(message, Error):
        return RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a control frame mid-stream")
    try:
        code = ErrorCode(message.code)
    except ValueError:
        code = ErrorCode.INTERNAL
    return RemoteProtocolError(code, f"the seller said: {message.msg}")


def receive_stream(
    sock: socket.socket, transfer_frame: bytes, verifier: StreamVerifier, dest: Destination
) -> None:
    """Run one stream to its END, verifying every chunk; raises on the first fault.

    On any exception `verifier.verified` is the first chunk not yet verified, where a
    stream from another provider resumes.
    """
    sock.sendall(frame_header(FrameTag.CONTROL, len(transfer_frame)) + transfer_frame)
    tag, length = _read_header(sock)
    if tag == FrameTag.CONTROL:
        raise remote_error(_recv_bytes(sock, length))
    if tag != FrameTag.CHUNK_LIST:
        raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{tag.name} before the list")
    verifier.chunk_list(_recv_bytes(sock, length))

    with ThreadPoolExecutor(1, thread_name_prefix="kvx-verify") as hasher:
        pending: Future[None] | None = None

        def verify(index: int, landed: memoryview) -> None:
            verifier.check(index, landed)
            dest.commit(index, landed)

        try:
            while True:
                tag, length = _read_header(sock)
                if tag == FrameTag.END:
                    break
                if tag == FrameTag.CONTROL:
                    raise remote_error(_recv_bytes(sock, length))
                if tag != FrameTag.CHUNK or length < CHUNK_INDEX.size:
                    raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{tag.name} frame")
                (index,) = CHUNK_INDEX.unpack(_recv_bytes(sock, CHUNK_INDEX.size))
                verifier.begin_chunk(index, length - CHUNK_INDEX.size)
                landed = dest.landing(index)
                _recv_exact(sock, landed)
                if pending is not None:
                    pending.result()  # chunk index-1 is verified before index is handed on
                pending = hasher.submit(verify, index, landed)
        finally:
            if pending is not None:
                # Always join the hasher, so that `verified` is final when we return.
                with contextlib.suppress(ProtocolError):
                    pending.result()
        if pending is not None:
            pending.result()
    verifier.end()
    dest.finish()


def serve_stream(
    sock: socket.socket,
    sessions: Sessions,
    inbox: Inbox,
    signer: Signer,
    now_ms: Callable[[], int],
) -> Offer | None:
    """Serve the stream a buyer's TRANSFER asks for; answer a bad one with ERROR.

    Returns the offer served whole, or None if the stream failed or was refused.
    """
    tag, length = _read_header(sock)
    if tag != FrameTag.CONTROL:
        return None
    admission = admit(_recv_bytes(sock, length), sessions, inbox, signer, now_ms())
    offer, first = admission.offer, admission.first
    if offer is None:
        if admission.reply is not None:
            with contextlib.suppress(OSError):
                sock.sendall(frame_header(FrameTag.CONTROL, len(admission.reply)) + admission.reply)
        return None
    hashes = b"".join(offer.hashes)
    try:
        sock.sendall(frame_header(FrameTag.CHUNK_LIST, len(hashes)) + hashes)
        for index in range(first, offer.expected.needed):
            data = offer.chunk(index)
            head = frame_header(FrameTag.CHUNK, CHUNK_INDEX.size + len(data))
            sock.sendall(head + CHUNK_INDEX.pack(index))
            sock.sendall(data)
        sock.sendall(frame_header(FrameTag.END, 0))
    except OSError:
        return None  # the buyer went away; it resumes elsewhere or gives up
    return offer


class TcpDataServer:
    """A seller's TCP data port: accepts buyers and serves each stream in a worker thread."""

    def __init__(
        self,
        sessions: Sessions,
        inbox: Inbox,
        signer: Signer,
        *,
        on_delivered: Callable[[Offer], None] | None = None,
        now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        timeout_s: float = 30.0,
    ) -> None:
        self.sessions = sessions
        self.inbox = inbox
        self.signer = signer
        self.on_delivered = on_delivered
        self.now_ms = now_ms
        self.timeout_s = timeout_s
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._streams: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        listener = socket.create_server((host, port), reuse_port=False)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = asyncio.create_task(self._serve(conn))
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)

    async def _serve(self, conn: socket.socket) -> None:
        set_stall_timeout(conn, self.timeout_s)
        with conn:
            offer = await asyncio.to_thread(
                serve_stream, conn, self.sessions, self.inbox, self.signer, self.now_ms
            )
        if offer is not None and self.on_delivered is not None:
            self.on_delivered(offer)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        if self._streams:
            await asyncio.gather(*self._streams, return_exceptions=True)


def open_stream(address: str, timeout_s: float) -> socket.socket:
    sock = socket.create_connection(split_address(address), timeout=timeout_s)
    set_stall_timeout(sock, timeout_s)
    return sock


def fetch_tcp(
    address: str,
    transfer_frame: bytes,
    verifier: StreamVerifier,
    dest: Destination,
    timeout_s: float,
) -> None:
    """Open a stream to `address` and receive it whole (blocking; run it in a thread)."""
    try:
        sock = open_stream(address, timeout_s)
    except OSError as exc:
        raise RemoteProtocolError(ErrorCode.UNAVAILABLE, f"cannot reach {address}: {exc}") from None
    with sock:
        try:
            receive_stream(sock, transfer_frame, verifier, dest)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO expired: EAGAIN
            raise RemoteProtocolError(ErrorCode.TIMEOUT, "the stream stalled") from None
        except OSError as exc:
            raise RemoteProtocolError(
                ErrorCode.STREAM_TRUNCATED, f"the stream broke: {exc}"
            ) from None
