"""The TCP data channel (spec §9.1): frames over a plain stream socket.

The byte-moving loops are blocking and run in worker threads: `recv_into` with
MSG_WAITALL puts a whole chunk straight into its landing memory in one call, and a
second thread hashes chunk i while chunk i+1 arrives. asyncio only starts and joins them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

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
    node_id,
    parse_frame_header,
    split_host_port,
)
from kvx.trust import Inbox, Signer, Statement, open_envelope

from ._destination import Destination
from ._pace import Pace
from ._sessions import Offer, Payments, Sessions, admit
from ._verify import StreamVerifier

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


def receive_stream(
    sock: socket.socket,
    transfer_frame: bytes,
    verifier: StreamVerifier,
    dest: Destination,
    pay: Callable[[int], bytes] | None = None,
    key: bytes | None = None,
) -> None:
    """Run one stream to its END, verifying every chunk; raises on the first fault.

    `pay(bytes)` seals the receipt for the first `bytes` of the delivery, sent whenever
    the quote's payment window is used up (§9.4). With the deal's `key` every frame after
    the TRANSFER is sealed (§9.6): a chunk lands encrypted and is opened where it landed,
    on the hashing thread, before its hash is checked. On any exception
    `verifier.verified` is the first chunk not yet verified, where a stream from another
    provider resumes.
    """
    if verifier.expected.window and pay is None:
        raise ValueError("a quote with a payment window needs `pay`")
    channel = None if key is None else SealedChannel(key, Direction.TO_SELLER)
    sealed = channel is not None
    extra = SEAL_BYTES if sealed else 0
    _send_control(sock, transfer_frame)
    tag, length = _read_header(sock, sealed=sealed)
    if tag == FrameTag.CONTROL:  # refused at admission, before any key is in use
        raise remote_error(_recv_bytes(sock, length))
    if tag != FrameTag.CHUNK_LIST:
        raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{tag.name} before the list")
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
                if tag == FrameTag.END:
                    if channel is not None:
                        channel.open(tag, _recv_bytes(sock, length))
                    break
                if tag == FrameTag.CONTROL:
                    body = _recv_bytes(sock, length)
                    raise remote_error(body if channel is None else channel.open(tag, body))
                if tag != FrameTag.CHUNK or length < CHUNK_INDEX.size + extra:
                    raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{tag.name} frame")
                (index,) = CHUNK_INDEX.unpack(_recv_bytes(sock, CHUNK_INDEX.size))
                verifier.begin_chunk(index, length - CHUNK_INDEX.size - extra)
                landed = dest.segments(index)
                _recv_scattered(sock, landed)
                mac = _recv_bytes(sock, extra)
                if pending is not None:
                    pending.result()  # chunk index-1 is verified before index is handed on
                pending = hasher.submit(verify, index, landed, mac)
                if verifier.window_full:  # the seller waits: pay for what verified
                    pending.result()
                    pending = None
                    due = verifier.payment_due()
                    assert due is not None and pay is not None
                    receipt = pay(due)
                    if channel is None:
                        _send_control(sock, receipt)
                    else:
                        sock.sendall(channel.frame(FrameTag.CONTROL, receipt))
        finally:
            if pending is not None:
                # Always join the hasher, so that `verified` is final when we return.
                with contextlib.suppress(ProtocolError):
                    pending.result()
        if pending is not None:
            pending.result()
    verifier.end()
    dest.finish()


@dataclass(frozen=True)
class DataLimits:
    """A seller's data-port budgets (spec §13.1); the node's config sets them."""

    connections: int = 256
    """Open data connections in total; past it, the oldest one not yet streaming is closed."""
    streams: int = 8
    """Streams served at once, each on a thread of the port's own pool."""
    streams_per_buyer: int = 2
    header_s: float = 5.0
    """The opening TRANSFER must arrive whole within this, however it trickles."""
    stall_s: float = 30.0
    """No progress for this long ends a stream."""
    min_rate: int = 1 << 20
    """Bytes a second a stream must average: after `stall_s` of grace, and at once (after
    its first second) while other streams wait for a thread."""


def serve_stream(
    sock: socket.socket,
    offer: Offer,
    first: int,
    payments: Payments,
    now_ms: Callable[[], int],
    pace: Pace,
) -> bool:
    """Stream an admitted offer from chunk `first`; True if it was sent whole.

    `pace` holds the stream to its deadline and minimum rate at every send, so a buyer
    that reads a byte now and then cannot hold the thread; within the payment window the
    seller sends on, past it it waits for the buyer's receipt (§9.4), and a receipt it
    cannot take ends the stream with the ERROR that says why. A deal with a key is sealed
    (§9.6), each chunk encrypted while the one before it is sent.
    """
    channel = None if offer.key is None else SealedChannel(offer.key, Direction.TO_BUYER)
    ahead = None if channel is None else _SealAhead(channel, offer)

    def send_frame(tag: FrameTag, payload: bytes) -> None:
        if channel is None:
            _send_all(sock, frame_header(tag, len(payload)) + payload, pace)
        else:
            _send_all(sock, channel.frame(tag, payload), pace)

    try:
        send_frame(FrameTag.CHUNK_LIST, b"".join(offer.hashes))
        for index in range(first, offer.expected.needed):
            if payments.blocked(index):
                _await_receipt(sock, pace)
                tag, length = _read_header(sock, pace.deadline, sealed=channel is not None)
                if tag != FrameTag.CONTROL:
                    return False
                frame = _recv_bytes(sock, length, pace.deadline)
                if channel is not None:
                    frame = channel.open(tag, frame)
                refusal = payments.receipt(frame, index, now_ms())
                if payments.refused is not None:
                    if refusal is not None:
                        send_frame(FrameTag.CONTROL, refusal)
                    return False
            data = offer.chunk(index)
            if channel is None:
                head = frame_header(FrameTag.CHUNK, CHUNK_INDEX.size + len(data))
                _send_all(sock, head + CHUNK_INDEX.pack(index), pace)
                _send_all(sock, data, pace)
            else:
                assert ahead is not None
                for part in ahead.take(index):
                    _send_all(sock, part, pace)
            payments.sent = index + 1
        send_frame(FrameTag.END, b"")
    except (OSError, RemoteProtocolError):
        return False  # the buyer went away, stalled, or sent what is not a frame
    finally:
        if ahead is not None:
            ahead.close()
    return True


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

    def take(self, index: int) -> tuple[bytes, memoryview, bytes]:
        """Chunk `index` sealed (header and index, ciphertext, tag); the next one starts."""
        if self._next is not None and self._next[0] == index:
            sealed = self._next[1].result()
        else:
            sealed = self._seal(index)
        following = index + 1
        if following < self.offer.expected.needed:  # its buffer is not the one being sent
            self._next = (following, self._pool.submit(self._seal, following))
        return sealed

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_SLICE = 1 << 20


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


class TcpDataServer:
    """A seller's TCP data port: accepts buyers and serves each stream on its own pool.

    Nothing a buyer does stops the port: connections past the budget push out the oldest
    one still waiting for its TRANSFER, the TRANSFER is read on the event loop under one
    deadline (no thread is held by a slow opener), running out of file descriptors backs
    off instead of ending the accept loop, and each stream has a deadline of its own.
    """

    def __init__(
        self,
        sessions: Sessions,
        inbox: Inbox,
        signer: Signer,
        *,
        on_finished: Callable[[Offer, int, bool], None] | None = None,
        on_receipt: Callable[[Statement], None] | None = None,
        on_fault: Callable[[bytes, RemoteProtocolError], None] | None = None,
        now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        limits: DataLimits | None = None,
    ) -> None:
        self.sessions = sessions
        self.inbox = inbox
        self.signer = signer
        self.on_finished = on_finished  # (offer, bytes sent, whole): every admitted stream
        self.on_receipt = on_receipt  # records a window receipt, raising if it is refused
        self.on_fault = on_fault  # (buyer key, what it broke): cut for its pace or receipt
        self.now_ms = now_ms
        self.limits = limits if limits is not None else DataLimits()
        self.accept_errors = 0  # a metric: accept() failures survived
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._opening: dict[socket.socket, asyncio.Task[None]] = {}  # oldest first
        self._streaming: set[socket.socket] = set()
        self._per_buyer: dict[bytes, int] = {}
        self._queued = 0  # streams waiting for a thread of the pool
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()  # _per_buyer is counted from the pool's threads
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
            task.add_done_callback(lambda _, conn=conn: conn.close())

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
                ended = await loop.run_in_executor(self._pool, self._stream, conn, frame)
            finally:
                self._streaming.discard(conn)
        if ended is not None and self.on_finished is not None:
            self.on_finished(*ended)

    def _stream(self, conn: socket.socket, frame: bytes) -> tuple[Offer, int, bool] | None:
        """On a pool thread: admit the TRANSFER (it may wait for its ACCEPT), then stream.
        Returns how the stream of an admitted offer ended: the bytes sent, and whether whole
        (None: no offer was admitted)."""
        with self._lock:
            self._queued -= 1
        set_stall_timeout(conn, self.limits.stall_s)
        admission = admit(frame, self.sessions, self.inbox, self.signer, self.now_ms())
        offer = admission.offer
        if offer is None:
            if admission.reply is not None:
                with contextlib.suppress(OSError):
                    _send_control(conn, admission.reply)
            return None
        buyer = offer.buyer
        with self._lock:
            busy = self._per_buyer.get(buyer, 0) >= self.limits.streams_per_buyer
            if not busy:
                self._per_buyer[buyer] = self._per_buyer.get(buyer, 0) + 1
        if busy:
            over = RemoteProtocolError(
                ErrorCode.OVER_BUDGET,
                f"at most {self.limits.streams_per_buyer} streams per buyer at once",
            )
            reply = self.signer.seal_error(
                over, re=admission.seq, to=node_id(buyer), now_ms=self.now_ms()
            )
            with contextlib.suppress(OSError):
                _send_control(conn, reply)
            return offer, 0, False  # the token is spent: this deal will never stream
        pace = Pace(
            offer.expected.deliver, self.limits.stall_s, self.limits.min_rate, self._pressed
        )
        try:
            payments = Payments(offer, admission.first, self.inbox, self.signer, self.on_receipt)
            done = serve_stream(conn, offer, admission.first, payments, self.now_ms, pace)
            fault = payments.refused
            if pace.cut is not None:
                fault = RemoteProtocolError(ErrorCode.TIMEOUT, pace.cut)
            if fault is not None and self.on_fault is not None:
                self.on_fault(buyer, fault)
        finally:
            with self._lock:
                self._per_buyer[buyer] -= 1
                if not self._per_buyer[buyer]:
                    del self._per_buyer[buyer]
        return offer, payments.sent_bytes, done

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


def _close_accepted(accepting: asyncio.Future) -> None:
    if not accepting.cancelled() and accepting.exception() is None:
        accepting.result()[0].close()


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
    pay: Callable[[int], bytes] | None = None,
    key: bytes | None = None,
) -> None:
    """Open a stream to `address` and receive it whole (blocking; run it in a thread)."""
    try:
        sock = open_stream(address, timeout_s)
    except OSError as exc:
        raise RemoteProtocolError(ErrorCode.UNAVAILABLE, f"cannot reach {address}: {exc}") from None
    with sock:
        try:
            receive_stream(sock, transfer_frame, verifier, dest, pay, key)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO expired: EAGAIN
            raise RemoteProtocolError(ErrorCode.TIMEOUT, "the stream stalled") from None
        except OSError as exc:
            raise RemoteProtocolError(
                ErrorCode.STREAM_TRUNCATED, f"the stream broke: {exc}"
            ) from None
