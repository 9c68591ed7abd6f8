"""The suite's own client for the TCP data channel, written from spec §7.5 and §9 alone
(sealing, §9.6, with the libraries the spec names: X25519, BLAKE3, AES-256-GCM).

It shares no code with kvx's transport: a bug there cannot pass its own test. It keeps
what the target sent and whether each rule held, and lets the case decide what fails.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvx.protocol import Quote
from kvx.trust import Statement, open_envelope

CONTROL, CHUNK_LIST, CHUNK, END = 1, 2, 3, 4
HEADER = struct.Struct("<BI")
ROOT_PURPOSE = b"kvx/content-root/1"


def root_of(size: int, chunk: int, hashes: list[bytes]) -> bytes:
    """§7.5: BLAKE3(lp("kvx/content-root/1") ‖ u64le(size) ‖ u64le(chunk) ‖ c_0 ‖ …)."""
    prefix = struct.pack("<I", len(ROOT_PURPOSE)) + ROOT_PURPOSE + struct.pack("<QQ", size, chunk)
    return blake3.blake3(prefix + b"".join(hashes)).digest()


TO_BUYER, TO_SELLER = 1, 2
SEAL = 16


def nonce(direction: int, tag: int, n: int) -> bytes:
    """§9.6: u8(direction) ‖ u8(tag) ‖ u16le(0) ‖ u64le(n)."""
    return struct.pack("<BBHQ", direction, tag, 0, n)


class Sealing:
    """One stream's key (§9.6), with the frame counts its nonces need."""

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)
        self.counts: dict[tuple[int, int], int] = {}

    def _next(self, direction: int, tag: int) -> int:
        n = self.counts.get((direction, tag), 0)
        self.counts[(direction, tag)] = n + 1
        return n

    def open(self, tag: int, body: bytes) -> bytes | None:
        """A sealed frame from the seller (not a CHUNK), or None if it does not open."""
        n = self._next(TO_BUYER, tag)
        try:
            return self.aead.decrypt(nonce(TO_BUYER, tag, n), body, HEADER.pack(tag, len(body)))
        except InvalidTag:
            return None

    def open_chunk(self, index: int, clear: bytes, body: bytes) -> bytes | None:
        try:
            return self.aead.decrypt(nonce(TO_BUYER, CHUNK, index), body, clear)
        except InvalidTag:
            return None

    def seal(self, tag: int, payload: bytes) -> bytes:
        head = HEADER.pack(tag, len(payload) + SEAL)
        n = self._next(TO_SELLER, tag)
        return head + self.aead.encrypt(nonce(TO_SELLER, tag, n), payload, head)


@dataclass
class Stream:
    """What one data-channel connection delivered."""

    hashes: list[bytes] | None = None  # CHUNK_LIST
    chunks: dict[int, bytes] = field(default_factory=dict)  # verified chunks, by index
    controls: list[Statement] = field(default_factory=list)  # CONTROL frames (ERROR)
    ended: bool = False  # END arrived
    closed: bool = False  # the seller closed the connection
    fault: str = ""  # the first rule the seller broke, if any
    wire: bytearray = field(default_factory=bytearray)  # every byte the seller sent

    def payload(self, size: int) -> bytes:
        return b"".join(self.chunks[i] for i in sorted(self.chunks))[:size]


def read_exactly(sock: socket.socket, n: int, wire: bytearray | None = None) -> bytes | None:
    """`n` bytes, or None when the peer closed first; `wire` keeps a copy of what came."""
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            return None
        out += part
    if wire is not None:
        wire += out
    return bytes(out)


def open_stream(
    address: str,
    transfer: bytes,
    quote: Quote,
    pay: Callable[[int], bytes | None],
    *,
    first: int = 0,
    last: int | None = None,
    timeout: float = 10.0,
    key: bytes | None = None,
    shorten: tuple[int, bytes, int] | None = None,
) -> Stream:
    """Send CONTROL(TRANSFER) to `address` (HOST:PORT) and read the stream to its end,
    checking §9.2's rules and paying each payment window (§9.4) with `pay(bytes)` (None:
    this buyer stops paying there, and reads on); with
    the deal's `key`, every frame after the TRANSFER is sealed (§9.6). The stream runs
    from `first` to `last` (the TRANSFER's); `shorten` = (after chunk k, a TRANSFER frame,
    its `last`) sends that frame once chunk k has come and takes the END it asks for
    (§9.7)."""
    host, _, port = address.rpartition(":")
    stream = Stream()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(HEADER.pack(CONTROL, len(transfer)) + transfer)
        try:
            sealing = None if key is None else Sealing(key)
            return _receive(sock, stream, quote, pay, first, last, sealing, shorten)
        except TimeoutError:
            stream.fault = stream.fault or f"nothing for {timeout} s"
            return stream


def _receive(
    sock: socket.socket,
    stream: Stream,
    quote: Quote,
    pay: Callable[[int], bytes | None],
    first: int,
    last: int | None,
    sealing: Sealing | None,
    shorten: tuple[int, bytes, int] | None,
) -> Stream:
    deliver = quote.blocks * quote.layout.payload_bytes(1)
    stored = quote.stored * quote.layout.payload_bytes(1)
    count = -(-deliver // quote.chunk) if last is None else last + 1  # after the stream's last
    asked = count  # … and after the last this buyer still wants
    window = (quote.window or 0) // quote.chunk
    extra = SEAL if sealing is not None else 0
    paid = expect = first

    def send(frame: bytes) -> None:
        if sealing is None:
            sock.sendall(HEADER.pack(CONTROL, len(frame)) + frame)
        else:
            sock.sendall(sealing.seal(CONTROL, frame))

    while True:
        head = read_exactly(sock, HEADER.size, stream.wire)
        if head is None:
            stream.closed = True
            if not stream.ended and not stream.controls:
                stream.fault = stream.fault or "closed before END"
            return stream
        tag, length = HEADER.unpack(head)
        if stream.ended:
            stream.fault = "a frame after END"
            return stream
        if tag == CHUNK:
            size = min(quote.chunk, stored - expect * quote.chunk) + 4 + extra
            index_bytes = read_exactly(sock, 4, stream.wire) or b"\0\0\0\0"
            (index,) = struct.unpack("<I", index_bytes)
            if stream.hashes is None or index != expect or length != size:
                stream.fault = f"chunk {index} ({length} bytes) where {expect} was due"
                return stream
            data = read_exactly(sock, length - 4, stream.wire) or b""
            if sealing is not None:
                data = sealing.open_chunk(index, head + index_bytes, data)
                if data is None:
                    stream.fault = f"sealed chunk {index} does not open"
                    return stream
            if blake3.blake3(data).digest() != stream.hashes[index]:
                stream.fault = f"chunk {index} does not match its hash"
                return stream
            stream.chunks[index] = data
            expect += 1
            if shorten is not None and index == shorten[0]:
                send(shorten[1])
                asked = shorten[2] + 1
            if window and expect == paid + window and expect < asked:
                receipt = pay((expect - first) * quote.chunk)  # from this stream's start
                if receipt is None:  # a buyer that stops paying: read on, send nothing
                    paid = count
                    continue
                send(receipt)
                paid = expect
            continue
        body = read_exactly(sock, length, stream.wire) or b""
        # Before the chunk list, a CONTROL is the seller's refusal of the TRANSFER, in clear.
        if sealing is not None and (tag != CONTROL or stream.hashes is not None):
            opened = sealing.open(tag, body)
            if opened is None:
                stream.fault = f"a sealed frame of tag {tag} does not open"
                return stream
            body = opened
        if tag == CONTROL:
            stream.controls.append(open_envelope(body))
        elif tag == CHUNK_LIST:
            stream.hashes = [body[i : i + 32] for i in range(0, len(body), 32)]
            if root_of(stored, quote.chunk, stream.hashes) != quote.root:
                stream.fault = "CHUNK_LIST does not match the quoted root"
                return stream
        elif tag == END:
            stream.ended = True
            if not asked <= expect <= count:
                stream.fault = f"END after chunk {expect - 1}, before chunk {asked - 1}"
        else:
            stream.fault = f"an unknown frame tag {tag}"
            return stream
