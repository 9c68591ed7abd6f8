"""Signed envelopes (spec §5): seal a message, and open one — signature first, body after."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from kvx.protocol import (
    RELAYABLE,
    Error,
    ErrorCode,
    Header,
    Message,
    MessageType,
    RawEnvelope,
    RemoteProtocolError,
    decode_body,
    encode_body,
    encode_envelope,
    max_lifetime_ms,
    node_id,
    parse_envelope,
    signing_input,
)

from ._freshness import ReplayGuard
from ._identity import Identity, curve_public_key

DEFAULT_TTL_MS = 60_000


@dataclass(frozen=True)
class Statement:
    """A verified, decoded envelope; `frame` is the exact bytes, kept for relaying and audit."""

    header: Header
    message: Message
    signer: bytes
    frame: bytes

    @property
    def type(self) -> MessageType:
        return self.message.TYPE

    @property
    def signer_id(self) -> bytes:
        return node_id(self.signer)


def seal(identity: Identity, message: Message, header: Header) -> bytes:
    """Encode, sign and frame one statement."""
    body = encode_body(header, message)
    signature = identity.sign(signing_input(message.TYPE, body))
    return encode_envelope(message.TYPE, body, identity.public_key, signature)


def verify_envelope(frame: bytes) -> RawEnvelope:
    """Parse a frame and verify its signature, without decoding the body (§6.4 steps 1-7)."""
    raw = parse_envelope(frame)
    try:
        VerifyKey(raw.signer).verify(signing_input(raw.type, raw.body), raw.signature)
    except (CryptoError, ValueError, TypeError):
        # ValueError/TypeError: a signer that is no valid curve point.
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "signature does not verify") from None
    return raw


def open_envelope(frame: bytes) -> Statement:
    """Parse and verify a frame, then decode its body; raises only RemoteProtocolError."""
    raw = verify_envelope(frame)
    header, message = decode_body(raw.type, raw.body)
    return Statement(header, message, raw.signer, frame)


_COUNTERS: dict[bytes, list[int]] = {}
_COUNTERS_LOCK = threading.Lock()


def _shared_seq(key: bytes) -> int:
    with _COUNTERS_LOCK:
        counter = _COUNTERS.setdefault(key, [0])
        counter[0] = max(counter[0] + 1, time.time_ns() // 1000)
        return counter[0]


class Signer:
    """Seals statements under one identity with sequence numbers it never repeats.

    Every Signer of one identity in this process draws from one shared counter, which
    also keeps up with the wall clock in microseconds: so concurrent clients speaking for
    one node never collide, a restarted process never reuses a number (unless its clock
    steps back), and two processes of one identity collide only if they sign within the
    same microsecond.
    """

    def __init__(self, identity: Identity, *, seqs: Callable[[], int] | None = None) -> None:
        """`seqs`, if given, draws the sequence numbers instead: a simulation's, or a
        test's that pins them."""
        self.identity = identity
        self._seqs = seqs or functools.partial(_shared_seq, identity.public_key)

    def seal(
        self, message: Message, *, now_ms: int, to: bytes | None = None, ttl_ms: int | None = None
    ) -> bytes:
        ttl = min(DEFAULT_TTL_MS, max_lifetime_ms(message.TYPE)) if ttl_ms is None else ttl_ms
        header = Header(iat=now_ms, exp=now_ms + ttl, seq=self._seqs(), to=to)
        return seal(self.identity, message, header)

    def seal_error(
        self, exc: RemoteProtocolError, *, re: int | None, to: bytes, now_ms: int
    ) -> bytes:
        """The ERROR (spec §8.15) that reports `exc` to node `to`, about its statement `re`."""
        error = Error(code=int(exc.code), msg=exc.detail[:256], re=re)
        return self.seal(error, now_ms=now_ms, to=to)


class Inbox:
    """The receive-side checks of spec §6.4, in their normative order, for one node.

    For a relayable statement, REPLAYED means a duplicate that gossip delivered twice
    (§6.3): the caller drops it without blaming the peer that relayed it.
    """

    def __init__(self, me: bytes, guard: ReplayGuard | None = None) -> None:
        self.me = me
        self.guard = guard if guard is not None else ReplayGuard()

    def receive(self, frame: bytes, *, now_ms: int, peer_curve_key: bytes | None) -> Statement:
        """Open a frame that arrived from the socket peer with `peer_curve_key` (None: unknown)."""
        st = open_envelope(frame)
        if st.header.to is not None and st.header.to != self.me:
            raise RemoteProtocolError(ErrorCode.WRONG_RECIPIENT, "addressed to another node")
        if (
            peer_curve_key is not None
            and st.type not in RELAYABLE
            and curve_public_key(st.signer) != peer_curve_key
        ):
            raise RemoteProtocolError(
                ErrorCode.SIGNER_MISMATCH,
                f"{st.type.name} is signed by a key other than the sender's",
            )
        # A relayed statement is remembered once the node has taken it (see ReplayGuard).
        self.guard.check(st.signer, st.header, now_ms, remember=st.type not in RELAYABLE)
        return st
