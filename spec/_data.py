"""The suite's own client for the TCP data channel, written from spec §7.5 and §9 alone.

It shares no code with kvx's transport: a bug there cannot pass its own test. It keeps
what the target sent and whether each rule held, and lets the case decide what fails.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from kvx.protocol import Quote
from kvx.trust import Statement, open_envelope

CONTROL, CHUNK_LIST, CHUNK, END = 1, 2, 3, 4
HEADER = struct.Struct("<BI")
ROOT_PURPOSE = b"kvx/content-root/1"


def root_of(size: int, chunk: int, hashes: list[bytes]) -> bytes:
    """§7.5: BLAKE3(lp("kvx/content-root/1") ‖ u64le(size) ‖ u64le(chunk) ‖ c_0 ‖ …)."""
    prefix = struct.pack("<I", len(ROOT_PURPOSE)) + ROOT_PURPOSE + struct.pack("<QQ", size, chunk)
    return blake3.blake3(prefix + b"".join(hashes)).digest()


@dataclass
class Stream:
    """What one data-channel connection delivered."""

    hashes: list[bytes] | None = None  # CHUNK_LIST
    chunks: dict[int, bytes] = field(default_factory=dict)  # verified chunks, by index
    controls: list[Statement] = field(default_factory=list)  # CONTROL frames (ERROR)
    ended: bool = False  # END arrived
    closed: bool = False  # the seller closed the connection
    fault: str = ""  # the first rule the seller broke, if any

    def payload(self, size: int) -> bytes:
        return b"".join(self.chunks[i] for i in sorted(self.chunks))[:size]


def _read(sock: socket.socket, n: int) -> bytes | None:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            return None
        out += part
    return bytes(out)


def open_stream(
    address: str,
    transfer: bytes,
    quote: Quote,
    pay: Callable[[int], bytes],
    *,
    first: int = 0,
    timeout: float = 10.0,
) -> Stream:
    """Send CONTROL(TRANSFER) to `address` (HOST:PORT) and read the stream to its end,
    checking §9.2's rules and paying each payment window (§9.4) with `pay(bytes)`."""
    host, _, port = address.rpartition(":")
    stream = Stream()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(HEADER.pack(CONTROL, len(transfer)) + transfer)
        try:
            return _receive(sock, stream, quote, pay, first)
        except TimeoutError:
            stream.fault = stream.fault or f"nothing for {timeout} s"
            return stream


def _receive(
    sock: socket.socket,
    stream: Stream,
    quote: Quote,
    pay: Callable[[int], bytes],
    first: int,
) -> Stream:
    deliver = quote.blocks * quote.layout.payload_bytes(1)
    stored = quote.stored * quote.layout.payload_bytes(1)
    count = -(-deliver // quote.chunk)
    window = (quote.window or 0) // quote.chunk
    paid = expect = first
    while True:
        head = _read(sock, HEADER.size)
        if head is None:
            stream.closed = True
            if not stream.ended and not stream.controls:
                stream.fault = stream.fault or "closed before END"
            return stream
        tag, length = HEADER.unpack(head)
        if stream.ended:
            stream.fault = "a frame after END"
            return stream
        if tag == CONTROL:
            stream.controls.append(open_envelope(_read(sock, length) or b""))
        elif tag == CHUNK_LIST:
            data = _read(sock, length) or b""
            stream.hashes = [data[i : i + 32] for i in range(0, len(data), 32)]
            if root_of(stored, quote.chunk, stream.hashes) != quote.root:
                stream.fault = "CHUNK_LIST does not match the quoted root"
                return stream
        elif tag == CHUNK:
            size = min(quote.chunk, stored - expect * quote.chunk) + 4
            index_bytes = _read(sock, 4) or b"\0\0\0\0"
            (index,) = struct.unpack("<I", index_bytes)
            if stream.hashes is None or index != expect or length != size:
                stream.fault = f"chunk {index} ({length} bytes) where {expect} was due"
                return stream
            data = _read(sock, length - 4) or b""
            if blake3.blake3(data).digest() != stream.hashes[index]:
                stream.fault = f"chunk {index} does not match its hash"
                return stream
            stream.chunks[index] = data
            expect += 1
            if window and expect == paid + window and expect < count:
                receipt = pay(expect * quote.chunk)
                sock.sendall(HEADER.pack(CONTROL, len(receipt)) + receipt)
                paid = expect
        elif tag == END:
            stream.ended = True
            if expect != count:
                stream.fault = f"END after chunk {expect - 1}, before chunk {count - 1}"
        else:
            stream.fault = f"an unknown frame tag {tag}"
            return stream
