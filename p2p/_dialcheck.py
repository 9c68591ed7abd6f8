"""Is a kvx node at this address with this key? Asked before a user's command waits on it.

A peer is named by an address and an Ed25519 public key; the commonest mistake is to give
the node id (a hash of the key) instead. ZeroMQ then retries a failing CURVE handshake
forever and says nothing, so a command that just connected would hang. The handshake's
monitor events tell the three cases apart within a second or two.
"""

from __future__ import annotations

import enum
import time

import zmq
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as NaclRuntimeError
from zmq.utils.monitor import recv_monitor_message

from kvx.protocol import ConfigError
from kvx.trust import Identity, curve_public_key, make_curve_client

KEY_HINT = (
    "give the node's public key, not its node id: `kvx id DATA_DIR` prints both, "
    "and a running node's DATA_DIR/node.json holds its public_key"
)


class Probe(enum.Enum):
    ANSWERS = "a node with this key answers"
    WRONG_KEY = "the node there refused the handshake: it does not hold this key"
    CLOSED = "nothing listens there"
    SILENT = "nothing answered in time"


def check_public_key(text: str, what: str) -> bytes:
    """The Ed25519 public key in `text` (hex), or a one-line error that says what to give."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{what} {text!r} is not 64 hex digits; {KEY_HINT}")
    try:
        curve_public_key(key)
    except (CryptoError, NaclRuntimeError):
        raise ConfigError(f"{what} {text[:16]}… is not an Ed25519 public key; {KEY_HINT}") from None
    return key


def probe(ctl: str, key: bytes, timeout_s: float = 3.0) -> Probe:
    """Connect to `ctl` expecting the node with `key`, with a throwaway identity."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    make_curve_client(sock, Identity.generate(), key)
    monitor = sock.get_monitor_socket()
    sock.connect(ctl)
    deadline = time.monotonic() + timeout_s
    outcome = Probe.SILENT
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000)):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                outcome = Probe.ANSWERS
                break
            if event in (
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
            ):
                outcome = Probe.WRONG_KEY
                break
            if event == zmq.EVENT_CONNECT_RETRIED:
                outcome = Probe.CLOSED
                break
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()
        ctx.term()
    return outcome
