"""The encrypted control channel: ZeroMQ CURVE with keys derived from node identities.

Deriving the CURVE pair from the Ed25519 key (spec §3.3) makes the socket peer and the
signer of what it sends one identity, which Inbox checks per statement.
"""

from __future__ import annotations

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ._identity import Identity, curve_public_key


def _own_keys(sock: zmq.Socket, identity: Identity) -> None:
    public, secret = identity.curve_keypair()
    sock.curve_publickey = z85.encode(public)
    sock.curve_secretkey = z85.encode(secret)


def make_curve_server(sock: zmq.Socket, identity: Identity) -> None:
    """Configure a socket, before bind, to accept only CURVE-encrypted connections."""
    _own_keys(sock, identity)
    sock.curve_server = True


def make_curve_client(sock: zmq.Socket, identity: Identity, server_public_key: bytes) -> None:
    """Configure a socket, before connect, to reach the node whose Ed25519 key is given."""
    _own_keys(sock, identity)
    sock.curve_serverkey = z85.encode(curve_public_key(server_public_key))


def start_authenticator(ctx: zmq.Context) -> ThreadAuthenticator | AsyncioAuthenticator:
    """Let any CURVE client connect and tag its messages with its key as User-Id.

    Who may *do* anything is decided per statement (policy, scores), after the signer is
    known; the handshake only fixes which key is on the other end.
    """
    auth_cls = AsyncioAuthenticator if isinstance(ctx, zmq.asyncio.Context) else ThreadAuthenticator
    auth = auth_cls(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    return auth


def peer_curve_key(frame: zmq.Frame) -> bytes:
    """The CURVE public key of the connection a frame (received with copy=False) came on."""
    return z85.decode(frame.get("User-Id"))
