"""One exception tree for the whole protocol, each error carrying its wire code.

Local faults (our own caller broke a rule) are kept apart from remote ones (a peer
sent something the spec forbids), as h11 does, so that a node can score a peer down
for the second kind and crash loudly on the first.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes of spec/PROTOCOL.md §9; the numbers are on the wire and never reused."""

    # framing and codec
    MALFORMED = 10
    FRAME_TOO_LARGE = 11
    UNSUPPORTED_VERSION = 12
    UNKNOWN_TYPE = 13
    INVALID_FIELD = 14
    # authenticity and freshness
    BAD_SIGNATURE = 20
    SIGNER_MISMATCH = 21
    WRONG_RECIPIENT = 22
    EXPIRED = 23
    NOT_YET_VALID = 24
    REPLAYED = 25
    LIFETIME_TOO_LONG = 26
    # policy
    DENIED = 30
    NOT_A_MEMBER = 31
    RATE_LIMITED = 32
    CREDIT_LIMIT = 33
    OVER_BUDGET = 34
    # negotiation
    FINGERPRINT_MISMATCH = 40
    NOT_FOUND = 41
    PRICE_TOO_HIGH = 42
    UNKNOWN_QUOTE = 43
    NO_COMMON_TRANSPORT = 44
    UNSUPPORTED_CONVERSION = 45
    UNEXPECTED_MESSAGE = 46
    UNKNOWN_TRANSFER = 47
    # data transfer
    BAD_TOKEN = 50
    CHUNK_HASH_MISMATCH = 51
    ROOT_MISMATCH = 52
    SIZE_MISMATCH = 53
    STREAM_TRUNCATED = 54
    KV_MISMATCH = 55
    BAD_SEAL = 56
    # the node itself
    INTERNAL = 60
    UNAVAILABLE = 61
    TIMEOUT = 62


class KvxError(Exception):
    """Root of every error kvx raises on purpose."""


class ConfigError(KvxError):
    """Local set-up is unusable (a key file, a config file); the message says how to fix it."""


class IntegrityError(KvxError):
    """Data this node stored itself failed its check (a corrupt or tampered file)."""


class ProtocolError(KvxError):
    """A violation of the spec; `code` is what goes into an ERROR message."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.name}: {detail}")
        self.code = code
        self.detail = detail


class RemoteProtocolError(ProtocolError):
    """The peer broke the spec: the only error that decoding peer input may raise."""


class LocalProtocolError(ProtocolError):
    """Our own caller asked for something the spec forbids (an out-of-bounds field, say)."""
