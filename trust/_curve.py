"""The encrypted control channel: ZeroMQ CURVE with keys derived from node identities.

Deriving the CURVE pair from the Ed25519 key (spec §3.3) makes the socket peer and the
signer of what it sends one identity, which Inbox checks per statement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ._identity import Identity, curve_public_key


def _own_keys(sock: zmq.Socket[Any], identity: Identity) -> None:
    public, secret = identity.curve_keypair()
    sock.curve_publickey = z85.encode(public)
    sock.curve_secretkey = z85.encode(secret)


def make_curve_server(sock: zmq.Socket[Any], identity: Identity) -> None:
    """Configure a socket, before bind, to accept only CURVE-encrypted connections."""
    _own_keys(sock, identity)
    sock.curve_server = True


def make_curve_client(sock: zmq.Socket[Any], identity: Identity, server_public_key: bytes) -> None:
    """Configure a socket, before connect, to reach the node whose Ed25519 key is given."""
    _own_keys(sock, identity)
    sock.curve_serverkey = z85.encode(curve_public_key(server_public_key))


class _Admitting(AsyncioAuthenticator):
    """An authenticator that first asks whether a handshake from this source address is
    admitted, and says no (ZAP 400) to one that is not: a client churning connections
    then costs the node the handshake's crypto in libzmq's thread, and no session."""

    def __init__(self, ctx: zmq.asyncio.Context, admit: Callable[[str], bool]) -> None:
        super().__init__(ctx)
        self.admit = admit

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6 and not self.admit(msg[3].decode("ascii", "replace")):
            self._send_zap_reply(msg[1], b"400", b"too many new connections from this address")
            return
        await super().handle_zap_message(msg)


def start_authenticator(
    ctx: zmq.Context[Any], admit: Callable[[str], bool] | None = None
) -> ThreadAuthenticator | AsyncioAuthenticator:
    """Let any CURVE client connect and tag its messages with its key as User-Id; with
    `admit` (an asyncio context), only handshakes from source addresses it admits.

    Who may *do* anything is decided per statement (policy, scores), after the signer is
    known; the handshake only fixes which key is on the other end.
    """
    auth: ThreadAuthenticator | AsyncioAuthenticator
    if not isinstance(ctx, zmq.asyncio.Context):
        auth = ThreadAuthenticator(ctx)
    elif admit is not None:
        auth = _Admitting(ctx, admit)
    else:
        auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    return auth


def peer_curve_key(frame: zmq.Frame) -> bytes:
    """The CURVE public key of the connection a frame (received with copy=False) came on."""
    user = frame.get("User-Id")
    assert isinstance(user, str)  # the authenticator sets it on every CURVE connection
    return z85.decode(user)
