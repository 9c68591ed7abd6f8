"""Sellers for transport tests: an honest TcpDataServer, and a hostile one that speaks the
frame format over a real socket but lies in a chosen way; and an embedded node made to
serve bytes that do not match the root it signed."""

import contextlib
import dataclasses
import socket
import threading
import time
from dataclasses import dataclass, field

import blake3

from kvx.protocol import (
    CHUNK_INDEX,
    FrameTag,
    Receipt,
    Transfer,
    chunk_hashes,
    content_root,
    frame_header,
)
from kvx.transport import Expected, Offer, Sessions, Source, TcpDataServer
from kvx.trust import Identity, Inbox, Signer, open_envelope


@dataclass(frozen=True)
class SlowOffer(Offer):
    """An offer read from a slow disk: each chunk takes `delay` seconds to come."""

    delay: float = 0.0

    def chunk(self, index: int) -> memoryview:
        time.sleep(self.delay)
        return super().chunk(index)


CHUNK = 1 << 16
SELLER = Identity.from_seed(b"\x5e" * 32)
BUYER = Identity.from_seed(b"\xb0" * 32)
QUOTE = b"\x71" * 16
TOKEN = b"\x7a" * 32


def payload(size: int = 5 * CHUNK + 1000) -> bytes:
    return blake3.blake3(b"kv payload").digest(length=size)


def expected_for(data: bytes, deliver: int | None = None) -> Expected:
    root = content_root(len(data), CHUNK, chunk_hashes(data, CHUNK))
    return Expected(root=root, size=len(data), chunk=CHUNK, deliver=deliver or len(data))


def transfer_maker(seller: Identity = SELLER, token: bytes = TOKEN, buyer: Identity = BUYER):
    signer = Signer(buyer)
    opened: list[int] = []

    def make(first: int, last: int | None = None) -> bytes:
        opened.append(first)
        return signer.seal(
            Transfer(quote=QUOTE, token=token, first=first, last=last),
            now_ms=now(),
            to=seller.node_id,
        )

    make.opened = opened  # the first chunk each TRANSFER named
    return make


def payer(
    expected: Expected,
    *,
    price_off: int = 0,
    claim=lambda due: due,
    quote: bytes = QUOTE,
    buyer: Identity = BUYER,
):
    """Seals the buyer's window receipts (spec §9.4); `price_off`, `claim` (the bytes
    stated for the bytes due) and `quote` make them wrong."""
    signer = Signer(buyer)
    paid: list[int] = []

    def pay(size: int) -> bytes:
        paid.append(size)
        stated = claim(size)
        receipt = Receipt(
            quote=quote,
            seller=SELLER.node_id,
            root=expected.root,
            bytes=stated,
            price=expected.paid_price(stated) + price_off,
        )
        return signer.seal(receipt, now_ms=now(), to=SELLER.node_id)

    pay.paid = paid  # the sizes receipted, in order
    return pay


def now() -> int:
    return time.time_ns() // 1_000_000


def offer_of(
    data: bytes, expected: Expected, token: bytes = TOKEN, key=None, delay: float = 0.0
) -> SlowOffer:
    """An accepted quote of `data` to BUYER, ready to stream; each chunk read in `delay`."""
    offer = SlowOffer.build(
        quote=QUOTE,
        token=token,
        buyer=BUYER.public_key,
        payload=data,
        hashes=chunk_hashes(data, CHUNK),
        expected=expected,
        expires_ms=now() + 60_000,
        key=key,
    )
    return dataclasses.replace(offer, delay=delay)


async def honest_server(
    data: bytes,
    expected: Expected,
    token: bytes = TOKEN,
    server_class=TcpDataServer,
    on_receipt=None,
    more_tokens: tuple[bytes, ...] = (),
    key: bytes | None = None,
    delay: float = 0.0,
    **options,
):
    """A real data server (TCP, or UcxDataServer) with an authorised offer of `data` for
    `token` (and as many again for `more_tokens`), each chunk read in `delay` seconds."""
    sessions = Sessions()
    for each in (token, *more_tokens):
        sessions.authorize(offer_of(data, expected, each, key, delay))
    server = server_class(
        sessions, Inbox(SELLER.node_id), Signer(SELLER), on_receipt=on_receipt, **options
    )
    await server.start()
    return server


@dataclass
class Hostile:
    """Serves one stream of `data` (the chunks its TRANSFER names), lying as told: flip a
    bit of chunk `flip`, change the length of chunk `resize` by `delta`, send a wrong chunk
    list, close after `stop_after` chunks or hold the connection silent after
    `stall_after`, or say nothing at all."""

    data: bytes
    flip: int | None = None
    resize: int | None = None
    delta: int = 0
    wrong_list: bool = False
    stop_after: int | None = None
    stall_after: int | None = None
    silent: bool = False
    address: str = ""
    _listener: socket.socket = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return  # closed before anyone came
        with conn, contextlib.suppress(OSError):  # the buyer may hang up on a liar
            head = conn.recv(5, socket.MSG_WAITALL)
            body = conn.recv(int.from_bytes(head[1:], "little"), socket.MSG_WAITALL)
            transfer = open_envelope(body).message
            if self.silent:
                conn.recv(1)  # until the buyer gives up
                return
            hashes = chunk_hashes(self.data, CHUNK)
            if self.wrong_list:
                hashes[0] = bytes(32)
            listing = b"".join(hashes)
            conn.sendall(frame_header(FrameTag.CHUNK_LIST, len(listing)) + listing)
            last = len(hashes) - 1 if transfer.last is None else transfer.last
            for sent, index in enumerate(range(transfer.first, last + 1)):
                if sent == self.stop_after:
                    return  # the seller dies mid-stream
                if sent == self.stall_after:
                    while conn.recv(1 << 16):  # holds the stream open, sending nothing
                        pass
                    return
                chunk = bytearray(self.data[index * CHUNK : (index + 1) * CHUNK])
                if index == self.flip:
                    chunk[len(chunk) // 2] ^= 0x10
                if index == self.resize:
                    chunk = (
                        chunk[: len(chunk) + self.delta]
                        if self.delta < 0
                        else chunk + bytes(self.delta)
                    )
                conn.sendall(frame_header(FrameTag.CHUNK, 4 + len(chunk)) + CHUNK_INDEX.pack(index))
                conn.sendall(bytes(chunk))
            conn.sendall(frame_header(FrameTag.END, 0))
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(1 << 16):  # what the buyer sent meanwhile, unread: no reset
                pass

    def close(self) -> None:
        self._listener.close()


def source(
    address: str,
    expected: Expected,
    provider: bytes,
    make,
    transport="tcp",
    pay=None,
    key=None,
    deal: bytes = b"",
) -> Source:
    return Source(
        provider=provider,
        transport=transport,
        address=address,
        expected=expected,
        transfer=make,
        pay=pay,
        key=key,
        deal=deal or provider,
    )


def scattered(size: int, piece: int = 1000):
    """Memory that payload bytes land in out of order: piece i of the payload goes to
    slot `order[i]` of a buffer, as a KV cache's layers take a block-major payload."""
    count = -(-size // piece)
    order = list(reversed(range(count)))
    memory = bytearray(count * piece)
    view = memoryview(memory)

    def place(start: int, stop: int) -> list[memoryview]:
        pieces = []
        while start < stop:
            index, offset = divmod(start, piece)
            n = min(piece - offset, stop - start)
            at = order[index] * piece + offset
            pieces.append(view[at : at + n])
            start += n
        return pieces

    def payload_of() -> bytes:
        return b"".join(bytes(p) for p in place(0, size))

    return place, payload_of, memory


def tamper_stored(seller, root: bytes) -> None:
    """Flip one bit of a payload an embedded node (`PeerClient.embedded`) holds, keeping
    the chunk hashes and root it advertised: what a lying seller serves."""
    from kvx.p2p._store import Payload

    node, _task = seller._embedded
    honest = node.core.store.get(root)
    tampered = bytearray(honest.data)
    tampered[len(tampered) // 2] ^= 0x01
    node.core.store._memory[root] = Payload(honest.entry, bytes(tampered), honest.hashes)
