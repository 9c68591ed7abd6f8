"""The TCP data channel (spec §9.1): frames over a plain stream socket.

The byte-moving loops are blocking and run in worker threads: `recv_into` with
MSG_WAITALL puts a whole chunk straight into its landing memory in one call, and a
second thread hashes chunk i while chunk i+1 arrives. asyncio only starts and joins them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kvx.protocol import (
    CHUNK_INDEX,
    FRAME_HEADER,
    SEAL_BYTES,
    Direction,
    Error,
    ErrorCode,
    FrameTag,
    ProtocolError,
    RemoteProtocolError,
    SealedChannel,
    frame_header,
    parse_frame_header,
    split_host_port,
)
from kvx.trust import open_envelope

from ._pace import Pace
from ._port import DataPort, Opening
from ._receiving import Receiving
from ._serving import Next, Serving
from ._sessions import Offer

log = logging.getLogger("kvx.transport")


def set_stall_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose reads and writes fail after `seconds` without progress.

    Kernel timeouts keep the socket truly blocking, so MSG_WAITALL fills a whole chunk in
    one call; Python's own socket timeout would turn each receive into a poll loop.
    """
    sock.settimeout(None)
    value = _timeval(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def split_address(address: str) -> tuple[str, int]:
    """A data address (already checked where it was decoded) as a connect() target."""
    ip, port = split_host_port(address)
    return str(ip), port


def _recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the socket; a peer that closes first has truncated the stream.

    With a `deadline` (monotonic seconds), a peer that trickles bytes cannot stretch one
    read past it: the stall timeout bounds each wait, the deadline the sum of them.
    """
    while view:
        if deadline is not None:
            _wait_at_most(sock, socket.SO_RCVTIMEO, deadline)
        got = sock.recv_into(view, len(view), socket.MSG_WAITALL)
        if got == 0:
            raise RemoteProtocolError(ErrorCode.STREAM_TRUNCATED, "the peer closed the stream")
        view = view[got:]


_IOV_MAX = 1024


def _recv_scattered(sock: socket.socket, pieces: list[memoryview]) -> None:
    """Fill every piece, in order, with as few system calls as the kernel allows."""
    if len(pieces) == 1:
        _recv_exact(sock, pieces[0])
        return
    left = [p for p in pieces if len(p)]
    while left:
        batch = left[:_IOV_MAX]
        got = sock.recvmsg_into(batch, 0, socket.MSG_WAITALL)[0]
        if got == 0:
            raise RemoteProtocolError(ErrorCode.STREAM_TRUNCATED, "the peer closed the stream")
        while got and left:
            if got >= len(left[0]):
                got -= len(left.pop(0))
            else:
                left[0] = left[0][got:]
                got = 0


def _recv_bytes(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf), deadline)
    return bytes(buf)


def _read_header(
    sock: socket.socket, deadline: float | None = None, sealed: bool = False
) -> tuple[FrameTag, int]:
    return parse_frame_header(_recv_bytes(sock, FRAME_HEADER.size, deadline), sealed)


def _wait_at_most(sock: socket.socket, option: int, deadline: float) -> None:
    """Shorten the socket's stall timeout to what is left before `deadline`."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the stream's deadline passed")
    current = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, option, 16))
    if left < current[0] + current[1] / 1e6 or current == (0, 0):
        sock.setsockopt(socket.SOL_SOCKET, option, _timeval(left))


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; never zero, which would mean "wait
    forever"."""
    whole = int(seconds)
    return struct.pack("ll", whole, max(1, int((seconds - whole) * 1e6)))


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


def _send_control(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(frame_header(FrameTag.CONTROL, len(frame)) + frame)


class TcpReceiver(Receiving):
    """The buyer's end of one stream over TCP (§9.1, §9.2): `run` receives it to its END
    on a worker thread, verifying every chunk, and raises on the first fault, leaving
    `verifier.verified` at the first chunk not verified. From any other thread, `shorten`
    asks the seller to end the stream sooner (§9.7) and `cancel` abandons it.

    `pay(bytes)` seals the receipt for the first `bytes` the stream carried, sent whenever
    the quote's payment window is used up (§9.4). With the deal's `key` every frame after
    the TRANSFER is sealed (§9.6): a chunk lands encrypted and is opened where it landed,
    on the hashing thread, before its hash is checked. A receipt and a shortening
    TRANSFER leave under one lock, in the order they were decided: the seller reads them
    in that order, so both sides agree whether a window needs paying.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channel = None if self.key is None else SealedChannel(self.key, Direction.TO_SELLER)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._done = False

    async def run(self) -> None:
        """Receive the stream whole, on a worker thread."""
        await asyncio.to_thread(self._run)

    def _run(self) -> None:
        try:
            sock = open_stream(self.address, self.timeout_s)
        except OSError as exc:
            raise RemoteProtocolError(
                ErrorCode.UNAVAILABLE, f"cannot reach {self.address}: {exc}"
            ) from None
        with self._lock:
            if self._done:  # cancelled while connecting
                sock.close()
                raise RemoteProtocolError(ErrorCode.TIMEOUT, "abandoned")
            self._sock = sock
        try:
            self._receive(sock)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO expired: EAGAIN
            raise RemoteProtocolError(ErrorCode.TIMEOUT, "the stream stalled") from None
        except OSError as exc:
            raise RemoteProtocolError(
                ErrorCode.STREAM_TRUNCATED, f"the stream broke: {exc}"
            ) from None
        finally:
            with self._lock:  # no shorten() sends on a closed socket
                self._done = True
                sock.close()

    def shorten(self, stop: int, frame: bytes) -> bool:
        """Send `frame`, a TRANSFER naming this stream with `last` = stop - 1; False when
        the stream is over or already ends there."""
        with self._lock:  # decided and sent together, as window receipts are
            if self._done or self._sock is None or not self.verifier.shorten(stop):
                return False
            try:
                self._send_control(self._sock, frame)
            except OSError:
                return False  # the stream is breaking: its receiving thread will say why
        return True

    def cancel(self) -> None:
        """Abandon the stream: the receiving thread fails at once (STREAM_TRUNCATED)."""
        with self._lock:
            self._done = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _send_control(self, sock: socket.socket, frame: bytes) -> None:
        if self.channel is None:
            _send_control(sock, frame)
        else:
            sock.sendall(self.channel.frame(FrameTag.CONTROL, frame))

    def _receive(self, sock: socket.socket) -> None:
        verifier, dest, channel = self.verifier, self.dest, self.channel
        sealed = channel is not None
        extra = SEAL_BYTES if sealed else 0
        _send_control(sock, self.opening)
        tag, length = _read_header(sock, sealed=sealed)
        if verifier.frame(tag) == FrameTag.CONTROL:  # refused at admission, before any key
            raise remote_error(_recv_bytes(sock, length))
        listing = _recv_bytes(sock, length)
        verifier.chunk_list(listing if channel is None else channel.open(tag, listing))

        with ThreadPoolExecutor(1, thread_name_prefix="kvx-verify") as hasher:
            pending: Future[None] | None = None

            def verify(index: int, landed: list[memoryview], mac: bytes) -> None:
                if channel is not None:
                    channel.open_chunk(index, landed, mac)
                verifier.check(index, landed)
                dest.commit(index, landed)

            try:
                while True:
                    tag, length = _read_header(sock, sealed=sealed)
                    if verifier.frame(tag) == FrameTag.END:
                        if channel is not None:
                            channel.open(tag, _recv_bytes(sock, length))
                        break
                    if tag == FrameTag.CONTROL:
                        body = _recv_bytes(sock, length)
                        raise remote_error(body if channel is None else channel.open(tag, body))
                    if length < CHUNK_INDEX.size + extra:
                        raise RemoteProtocolError(ErrorCode.SIZE_MISMATCH, f"{length}-byte chunk")
                    (index,) = CHUNK_INDEX.unpack(_recv_bytes(sock, CHUNK_INDEX.size))
                    verifier.begin_chunk(index, length - CHUNK_INDEX.size - extra)
                    landed = dest.segments(index)
                    _recv_scattered(sock, landed)
                    mac = _recv_bytes(sock, extra)
                    if pending is not None:
                        pending.result()  # chunk index-1 is verified before index is handed on
                    pending = hasher.submit(verify, index, landed, mac)
                    if verifier.window_full:  # the seller may wait: pay for what verified
                        pending.result()
                        pending = None
                        with self._lock:
                            due = verifier.payment_due()
                            if due is not None:
                                assert self.pay is not None
                                self._send_control(sock, self.pay(due))
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
    sock: socket.socket, serving: Serving, now_ms: Callable[[], int], pace: Pace
) -> bool:
    """Send `serving`'s stream; True if it went whole, to its END.

    `pace` holds the stream to its deadline and minimum rate at every send, so a buyer
    that reads a byte now and then cannot hold the thread. Before each chunk the seller
    reads whatever the buyer sent (a receipt, or a TRANSFER that ends the stream sooner,
    §9.7); past the payment window it waits for one (§9.4), and a frame it cannot take
    ends the stream with the ERROR that says why. A deal with a key is sealed (§9.6),
    each chunk encrypted while the one before it is sent.
    """
    offer = serving.offer
    channel = None if offer.key is None else SealedChannel(offer.key, Direction.TO_BUYER)
    ahead = None if channel is None else _SealAhead(channel, offer)

    def send_frame(tag: FrameTag, payload: bytes) -> None:
        if channel is None:
            _send_all(sock, frame_header(tag, len(payload)) + payload, pace)
        else:
            _send_all(sock, channel.frame(tag, payload), pace)

    def take_control() -> bool:
        tag, length = _read_header(sock, pace.deadline, sealed=channel is not None)
        if tag != FrameTag.CONTROL:
            return False
        frame = _recv_bytes(sock, length, pace.deadline)
        reply = serving.control(frame if channel is None else channel.open(tag, frame), now_ms())
        if reply is not None:
            send_frame(FrameTag.CONTROL, reply)
        return serving.refused is None

    try:
        send_frame(FrameTag.CHUNK_LIST, b"".join(offer.hashes))
        while (step := serving.next()) is not Next.END:
            if step is Next.RECEIPT:
                _await_receipt(sock, pace)
            if (step is Next.RECEIPT or _readable(sock)) and not take_control():
                return False
            if serving.next() is not Next.CHUNK:
                continue
            index = serving.sent
            if channel is None:
                data = offer.chunk(index)
                head = frame_header(FrameTag.CHUNK, CHUNK_INDEX.size + len(data))
                _send_all(sock, head + CHUNK_INDEX.pack(index), pace)
                _send_all(sock, data, pace)
            else:
                assert ahead is not None
                for part in ahead.take(index, serving.stop):
                    _send_all(sock, part, pace)
            serving.chunk_sent()
        send_frame(FrameTag.END, b"")
    except (OSError, RemoteProtocolError):
        return False  # the buyer went away, stalled, or sent what is not a frame
    finally:
        if ahead is not None:
            ahead.close()
    return True


LINGER_S = 2.0
"""How long a seller waits after END for the buyer to close."""


async def _linger(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """After END: read and drop what the buyer still sends until it closes. A request to
    end sooner may cross the END (§9.7); closing on it unread would reset the connection,
    and the buyer would lose the chunks still on their way."""
    conn.setblocking(False)
    conn.shutdown(socket.SHUT_WR)
    async with asyncio.timeout(LINGER_S):
        while await loop.sock_recv(conn, 1 << 16):
            pass


def _readable(sock: socket.socket) -> bool:
    """Whether the buyer sent something (or closed) that the seller has not read."""
    return bool(select.select([sock], [], [], 0)[0])


class _SealAhead:
    """Seals chunk i+1 on a thread of its own while chunk i is sent: AES-GCM runs without
    the GIL, so sealing costs a stream a second core rather than its time."""

    def __init__(self, channel: SealedChannel, offer: Offer) -> None:
        self.channel = channel
        self.offer = offer
        self._buffers = [memoryview(bytearray(offer.expected.chunk)) for _ in range(2)]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvx-seal")
        self._next: tuple[int, Future[tuple[bytes, memoryview, bytes]]] | None = None

    def _seal(self, index: int) -> tuple[bytes, memoryview, bytes]:
        data = self.offer.chunk(index)
        out = self._buffers[index % 2][: len(data)]
        clear, mac = self.channel.chunk_frame(index, data, out)
        return clear, out, mac

    def take(self, index: int, stop: int) -> tuple[bytes, memoryview, bytes]:
        """Chunk `index` sealed (header and index, ciphertext, tag); the next one starts
        unless the stream ends before it (`stop`)."""
        if self._next is not None and self._next[0] == index:
            sealed = self._next[1].result()
        else:
            sealed = self._seal(index)
        following = index + 1
        if following < stop:  # its buffer is not the one being sent
            self._next = (following, self._pool.submit(self._seal, following))
        return sealed

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_SLICE = 1 << 20
NOTSENT_LOWAT = 4 << 20
"""Bytes a seller's data socket holds unsent at most, beyond those in flight."""


def _await_receipt(sock: socket.socket, pace: Pace) -> None:
    """Wait for the buyer's window receipt under the stream's pace: a buyer that does not
    pay holds the thread no longer than one that reads too slowly."""
    while not select.select([sock], [], [], pace.check())[0]:
        pass


def _send_all(sock: socket.socket, data: bytes | memoryview, pace: Pace) -> None:
    """Send everything, each send blocking at most until the pace is due a check: the
    kernel's send timeout restarts on every partial send, so it alone bounds nothing."""
    view = memoryview(data)
    while view:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(pace.check()))
        try:
            n = sock.send(view[:_SLICE])
        except BlockingIOError:  # the timeout passed with nothing sent
            n = 0
        pace.sent(n)
        view = view[n:]


async def _read_opening(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The buyer's first frame, read without a thread: CONTROL(TRANSFER) or nothing."""

    async def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = await loop.sock_recv(conn, n - len(buf))
            if not got:
                raise RemoteProtocolError(ErrorCode.STREAM_TRUNCATED, "closed before TRANSFER")
            buf += got
        return bytes(buf)

    tag, length = parse_frame_header(await exactly(FRAME_HEADER.size))
    if tag != FrameTag.CONTROL:
        raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a stream opens with TRANSFER")
    return await exactly(length)


class TcpDataServer(DataPort):
    """A seller's TCP data port: accepts buyers and serves each stream on its own pool.

    Nothing a buyer does stops the port: connections past the budget push out the oldest
    one still waiting for its TRANSFER, the TRANSFER is read on the event loop under one
    deadline (no thread is held by a slow opener), running out of file descriptors backs
    off instead of ending the accept loop, and each stream has a deadline of its own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accept_errors = 0  # a metric: accept() failures survived
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._opening: dict[socket.socket, asyncio.Task[None]] = {}  # oldest first
        self._streaming: set[socket.socket] = set()
        self._queued = 0  # streams waiting for a thread of the pool
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(self.limits.streams, thread_name_prefix="kvx-data")

    @property
    def address(self) -> str:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def connections(self) -> int:
        return len(self._opening) + len(self._streaming)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        backoff = 0.01
        while True:
            accepting = asyncio.ensure_future(loop.sock_accept(self._listener))
            try:
                conn, _ = await asyncio.shield(accepting)
            except asyncio.CancelledError:
                # Closing: a connection accepted just now would be dropped unclosed.
                accepting.add_done_callback(_close_accepted)
                accepting.cancel()
                raise
            except OSError as exc:
                # EMFILE and friends: wait for descriptors to come back; never give up.
                self.accept_errors += 1
                log.warning("data port accept failed (%s); retrying in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.01
            if self.connections >= self.limits.connections:
                if not self._opening:  # every slot streams a paid-for deal: refuse this one
                    conn.close()
                    continue
                oldest = next(iter(self._opening))
                self._opening.pop(oldest).cancel()
            task = asyncio.create_task(self._serve(conn))
            self._opening[conn] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # A task cancelled before its first step never enters `with conn`: close here.
            task.add_done_callback(functools.partial(_close_when_done, conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            try:
                conn.setblocking(False)
                frame = await asyncio.wait_for(_read_opening(loop, conn), self.limits.header_s)
            except (TimeoutError, OSError, RemoteProtocolError):
                return
            finally:
                self._opening.pop(conn, None)
            self._streaming.add(conn)
            with self._lock:
                self._queued += 1
            try:
                opening, whole, cut = await loop.run_in_executor(
                    self._pool, self._stream, conn, frame
                )
            finally:
                self._streaming.discard(conn)
            self.ended(opening, whole, cut)  # the books first: the buyer may pay at once
            if whole:
                with contextlib.suppress(OSError, TimeoutError):
                    await _linger(loop, conn)

    def _stream(self, conn: socket.socket, frame: bytes) -> tuple[Opening, bool, str | None]:
        """On a pool thread: admit the TRANSFER (it may wait for its ACCEPT), then stream.
        Returns the opening, whether the stream went whole, and why its pace cut it."""
        with self._lock:
            self._queued -= 1
        set_stall_timeout(conn, self.limits.stall_s)
        # What the stream has sent is what it has handed to the kernel: keep that close to
        # what left, so that a buyer's request to end sooner (§9.7) takes effect soon.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        opening = self.open(frame)
        if opening.reply is not None:
            with contextlib.suppress(OSError):
                _send_control(conn, opening.reply)
        if opening.serving is None:
            return opening, False, None
        serving = opening.serving
        pace = Pace(serving.size, self.limits.stall_s, self.limits.min_rate, self._pressed)
        return opening, serve_stream(conn, serving, self.now_ms, pace), pace.cut

    @property
    def streams(self) -> int:
        """Streams admitted or waiting for a thread: what a leaving node lets finish."""
        return len(self._streaming)

    def _pressed(self) -> bool:
        """Whether streams wait for a thread: then none may hold one below the rate."""
        return self._queued > 0

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for task in list(self._opening.values()):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _close_when_done(conn: socket.socket, _: asyncio.Task[None]) -> None:
    conn.close()


def _close_accepted(accepting: asyncio.Future[tuple[socket.socket, Any]]) -> None:
    if not accepting.cancelled() and accepting.exception() is None:
        accepting.result()[0].close()


def open_stream(address: str, timeout_s: float) -> socket.socket:
    sock = socket.create_connection(split_address(address), timeout=timeout_s)
    set_stall_timeout(sock, timeout_s)
    return sock
