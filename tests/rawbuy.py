"""A buyer by hand, for attacks on a live seller: each step of a purchase is a call, so a
test can stop, lie or vanish between any two."""

from __future__ import annotations

import socket
import time

from swarm import NodeProcess, TestPeer

from kvx.conformance._data import read_exactly
from kvx.protocol import (
    Accept,
    Error,
    FrameTag,
    Hello,
    Quote,
    QuoteRequest,
    Receipt,
    Transfer,
    frame_header,
    parse_frame_header,
)
from kvx.trust import Identity, Signer, open_envelope


def now() -> int:
    return time.time_ns() // 1_000_000


def read_frame(sock: socket.socket) -> tuple[FrameTag, bytes] | None:
    """One data-channel frame, or None when the seller closed the connection first."""
    head = read_exactly(sock, 5)
    if head is None:
        return None
    tag, length = parse_frame_header(head)
    body = read_exactly(sock, length)
    return None if body is None else (tag, body)


class RawBuyer:
    """One identity's control connection to a seller, from `source` if given."""

    def __init__(self, seller: NodeProcess, source: str | None = None) -> None:
        """`seller`: anything with the node's `info` (its node.json)."""
        self.identity = Identity.generate()
        self.signer = Signer(self.identity)
        self.peer = TestPeer(seller, self.identity, source=source)
        self.seller_id = self.peer.node_id
        self.peer.send(self.seal(Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)))
        self.peer.recv()

    def seal(self, message) -> bytes:
        return self.signer.seal(message, now_ms=now(), to=self.seller_id)

    def quote(self, fp: bytes, chain, **fields) -> Quote | Error:
        request = QuoteRequest(
            fp=fp, blocks=tuple(chain), transports=("tcp",), max_price=10**12, **fields
        )
        self.peer.send(self.seal(request))
        return self.peer.recv().message

    def accept(self, q: Quote) -> None:
        self.peer.send(self.seal(Accept(quote=q.quote, price=q.price, root=q.root)))

    def open(self, q: Quote, first: int = 0) -> socket.socket:
        """The data connection, its TRANSFER sent."""
        host, port = q.data.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
        transfer = self.seal(Transfer(quote=q.quote, token=q.token, first=first))
        sock.sendall(frame_header(FrameTag.CONTROL, len(transfer)) + transfer)
        return sock

    def receipt(self, q: Quote, paid: int) -> bytes:
        """A RECEIPT for the first `paid` bytes of `q`'s delivery, at their share."""
        share = q.price * paid // q.deliver
        return self.seal(
            Receipt(quote=q.quote, seller=self.seller_id, root=q.root, bytes=paid, price=share)
        )

    def close(self) -> None:
        self.peer.close()


def pay_on_stream(sock: socket.socket, receipt: bytes) -> None:
    sock.sendall(frame_header(FrameTag.CONTROL, len(receipt)) + receipt)


def error_of(body: bytes) -> Error:
    message = open_envelope(body).message
    assert isinstance(message, Error), message
    return message
