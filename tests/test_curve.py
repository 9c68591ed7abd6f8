"""The encrypted control channel on real ZeroMQ sockets: CURVE keys derived from identities,
and the rule that a direct statement's signer is the socket's peer."""

import asyncio

import pytest
import zmq
import zmq.asyncio

from kvx.protocol import (
    Advertise,
    DataAddress,
    ErrorCode,
    Hello,
    KVLayout,
    RemoteProtocolError,
    encode_envelope,
    parse_envelope,
)
from kvx.trust import (
    Identity,
    Inbox,
    Signer,
    curve_public_key,
    make_curve_client,
    make_curve_server,
    peer_curve_key,
    start_authenticator,
)

BOB = Identity.from_seed(b"\x0b" * 32)  # the server
ALICE = Identity.from_seed(b"\x0a" * 32)
EVE = Identity.from_seed(b"\x0e" * 32)
HELLO = Hello(ctl="tcp://127.0.0.1:1", data=(), inc=0)
NOW = 5_000_000


class Server:
    """Bob's CURVE router, and every client socket a test opens to it (closed at the end)."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.auth = start_authenticator(self.ctx)
        self.router = self.ctx.socket(zmq.ROUTER)
        make_curve_server(self.router, BOB)
        self.address = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.sockets = [self.router]

    def client(self, me: Identity | None, server_key: bytes = BOB.public_key) -> zmq.Socket:
        """A DEALER to Bob: CURVE as `me` expecting `server_key`, or plain when `me` is None."""
        sock = self.ctx.socket(zmq.DEALER)
        if me is not None:
            make_curve_client(sock, me, server_key)
        sock.connect(self.address)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        self.auth.stop()
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
async def server():
    srv = Server()
    yield srv
    srv.close()


async def receive(router, timeout: float = 5.0):
    """One kvx message from the router: (its frame, the sender's CURVE key)."""
    _routing_id, frame = await asyncio.wait_for(router.recv_multipart(copy=False), timeout)
    return frame.bytes, peer_curve_key(frame)


async def deliver(server: Server, sender: Identity, frame: bytes):
    await server.client(sender).send(frame)
    data, peer = await receive(server.router)
    return Inbox(BOB.node_id).receive(data, now_ms=NOW, peer_curve_key=peer)


async def test_a_statement_from_the_socket_peer_is_accepted(server):
    st = await deliver(server, ALICE, Signer(ALICE).seal(HELLO, now_ms=NOW, to=BOB.node_id))
    assert st.signer == ALICE.public_key


async def test_a_statement_signed_by_another_key_is_refused(server):
    frame = Signer(EVE).seal(HELLO, now_ms=NOW, to=BOB.node_id)
    with pytest.raises(RemoteProtocolError) as err:
        await deliver(server, ALICE, frame)  # Eve's statement down Alice's connection
    assert err.value.code == ErrorCode.SIGNER_MISMATCH


async def test_relayed_gossip_from_another_signer_is_accepted(server):
    ad = Advertise(
        fp=b"\x01" * 32,
        layout=KVLayout("float16", 1, 1, 8, 16),
        blocks=(b"\x02" * 32,),
        root=b"\x03" * 32,
        chunk=1 << 16,
        price=1,
        ctl="tcp://127.0.0.1:1",
        data=(DataAddress("tcp", "127.0.0.1:2"),),
    )
    st = await deliver(server, ALICE, Signer(EVE).seal(ad, now_ms=NOW))
    assert st.signer == EVE.public_key


async def test_a_forged_signature_is_refused(server):
    raw = parse_envelope(Signer(ALICE).seal(HELLO, now_ms=NOW, to=BOB.node_id))
    forged = encode_envelope(raw.type, raw.body, raw.signer, bytes(64))
    with pytest.raises(RemoteProtocolError) as err:
        await deliver(server, ALICE, forged)
    assert err.value.code == ErrorCode.BAD_SIGNATURE


async def test_a_client_expecting_another_server_key_never_gets_through(server):
    await server.client(ALICE, server_key=EVE.public_key).send(b"hello?")
    await server.client(None).send(b"hello?")  # no CURVE at all
    assert await server.router.poll(timeout=500) == 0
    # The server still serves a correct client afterwards.
    await server.client(ALICE).send(b"ok")
    assert await receive(server.router) == (b"ok", curve_public_key(ALICE.public_key))
