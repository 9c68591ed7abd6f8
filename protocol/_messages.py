"""Every control message of spec §8 as a frozen dataclass, with its wire type and bounds."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from ._address import CtlAddress, check_data_address
from ._content import valid_chunk_size
from ._errors import ErrorCode
from ._limits import (
    MAX_ADVERT_LIFETIME_MS,
    MAX_CHAIN_BLOCKS,
    MAX_EVIDENCE_BYTES,
    MAX_EVIDENCE_PART,
    MAX_FRAME_BYTES,
    MAX_LIFETIME_MS,
    MAX_PROOF_BYTES,
    MAX_UINT64,
    PROTOCOL_VERSION,
)
from ._payload import DTYPE_SIZES, KVLayout
from ._schema import Array, Bin, Bool, Invalid, OneOf, Str, Struct, UInt, wire


class MessageType(IntEnum):
    HELLO = 1
    PEERS = 2
    ADVERTISE = 3
    WITHDRAW = 4
    DIGEST = 5
    LOOKUP = 6
    LOOKUP_RESULT = 7
    QUOTE_REQUEST = 8
    QUOTE = 9
    ACCEPT = 10
    REJECT = 11
    TRANSFER = 12
    RECEIPT = 13
    ERROR = 14
    MEMBERSHIP = 15
    PROBE = 16
    PROBE_ACK = 17
    ACCUSE = 18
    EVIDENCE_REQUEST = 19
    EVIDENCE = 20
    LEAVE = 21

    @property
    def purpose(self) -> bytes:
        """The domain-separation string signed before the body (spec §5.2)."""
        return f"kvx/{self.name.lower().replace('_', '-')}/{PROTOCOL_VERSION}".encode()


HASH = Bin(32, 32)
KEY = Bin(32, 32)
QUOTE_ID = Bin(16, 16)
CHALLENGE = Bin(16, 16)
ADDRESS = Str(1, 256)
CTL = CtlAddress()
TRANSPORT = Str(1, 32, r"[a-z0-9][a-z0-9._-]*")
CHAIN = Array(HASH, 1, MAX_CHAIN_BLOCKS)
DTYPE = OneOf(tuple(DTYPE_SIZES))


def _chunk_size_ok(chunk: int) -> None:
    if not valid_chunk_size(chunk):
        raise Invalid("chunk", f"{chunk} is not a power of two in [64 KiB, 64 MiB]")


@dataclass(frozen=True)
class Header:
    """Freshness and addressing fields present in every body (spec §6)."""

    iat: int = wire(UInt())
    exp: int = wire(UInt())
    seq: int = wire(UInt())
    to: bytes | None = wire(HASH, default=None)


@dataclass(frozen=True)
class DataAddress:
    t: str = wire(TRANSPORT)
    addr: str = wire(ADDRESS)

    def check(self) -> None:
        check_data_address(self.t, self.addr, "addr")


@dataclass(frozen=True)
class PeerEntry:
    key: bytes = wire(KEY)
    ctl: str = wire(CTL)
    inc: int = wire(UInt())
    state: int = wire(UInt(0, 2))


@dataclass(frozen=True)
class DigestEntry:
    key: bytes = wire(KEY)
    seq: int = wire(UInt())


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar = MessageType.HELLO
    ctl: str = wire(CTL)
    data: tuple[DataAddress, ...] = wire(Array(Struct(DataAddress), 0, 8))
    inc: int = wire(UInt())
    agent: str | None = wire(Str(0, 64), default=None)


@dataclass(frozen=True)
class Peers:
    TYPE: ClassVar = MessageType.PEERS
    peers: tuple[PeerEntry, ...] = wire(Array(Struct(PeerEntry), 0, 64))
    re: int | None = wire(UInt(), default=None)
    challenge: bytes | None = wire(CHALLENGE, default=None)
    recent: tuple[DigestEntry, ...] | None = wire(Array(Struct(DigestEntry), 0, 64), default=None)


@dataclass(frozen=True)
class NamespaceProof:
    ns: bytes = wire(HASH)
    mac: bytes = wire(HASH)


@dataclass(frozen=True)
class Membership:
    TYPE: ClassVar = MessageType.MEMBERSHIP
    challenge: bytes = wire(CHALLENGE)
    proofs: tuple[NamespaceProof, ...] = wire(Array(Struct(NamespaceProof), 1, 16))


@dataclass(frozen=True)
class Probe:
    """Ask a peer to probe `target` for us: SWIM's indirect probe (ping-req)."""

    TYPE: ClassVar = MessageType.PROBE
    target: bytes = wire(KEY)


@dataclass(frozen=True)
class ProbeAck:
    """The target answered the prober: `proof` is a frame the target signed, which the
    asker checks itself, so that a helper can vouch only with the target's own words."""

    TYPE: ClassVar = MessageType.PROBE_ACK
    re: int = wire(UInt())
    target: bytes = wire(KEY)
    proof: bytes = wire(Bin(1, MAX_PROOF_BYTES))


@dataclass(frozen=True)
class Advertise:
    TYPE: ClassVar = MessageType.ADVERTISE
    fp: bytes = wire(HASH)
    layout: KVLayout = wire(Struct(KVLayout))
    blocks: tuple[bytes, ...] = wire(CHAIN)
    root: bytes = wire(HASH)
    chunk: int = wire(UInt())
    price: int = wire(UInt())
    ctl: str = wire(CTL)
    data: tuple[DataAddress, ...] = wire(Array(Struct(DataAddress), 1, 8))
    ns: bytes | None = wire(HASH, default=None)

    @property
    def size(self) -> int:
        """Bytes of the advertised payload, which the root covers."""
        return self.layout.payload_bytes(len(self.blocks))

    def check(self) -> None:
        _chunk_size_ok(self.chunk)


@dataclass(frozen=True)
class Withdraw:
    TYPE: ClassVar = MessageType.WITHDRAW
    ad: int = wire(UInt())


@dataclass(frozen=True)
class Leave:
    """The sender stops serving (spec §8.22): its peers mark it left and drop its
    advertisements at once, rather than suspecting it for seconds while buyers try it."""

    TYPE: ClassVar = MessageType.LEAVE
    inc: int = wire(UInt())


@dataclass(frozen=True)
class Digest:
    TYPE: ClassVar = MessageType.DIGEST
    have: tuple[DigestEntry, ...] = wire(Array(Struct(DigestEntry), 0, 4096))


@dataclass(frozen=True)
class Lookup:
    TYPE: ClassVar = MessageType.LOOKUP
    fp: bytes = wire(HASH)
    blocks: tuple[bytes, ...] = wire(CHAIN)
    limit: int = wire(UInt(1, 16))
    ns: bytes | None = wire(HASH, default=None)


@dataclass(frozen=True)
class LookupResult:
    TYPE: ClassVar = MessageType.LOOKUP_RESULT
    re: int = wire(UInt())
    matched: int = wire(UInt(0, MAX_CHAIN_BLOCKS))
    ads: tuple[bytes, ...] = wire(Array(Bin(1, MAX_FRAME_BYTES), 0, 16))

    def check(self) -> None:
        if (self.matched == 0) != (not self.ads):
            raise Invalid("ads", "a match lists at least one advertisement, a miss none")


@dataclass(frozen=True)
class QuoteRequest:
    TYPE: ClassVar = MessageType.QUOTE_REQUEST
    fp: bytes = wire(HASH)
    blocks: tuple[bytes, ...] = wire(CHAIN)
    transports: tuple[str, ...] = wire(Array(TRANSPORT, 1, 8))
    max_price: int = wire(UInt())
    ns: bytes | None = wire(HASH, default=None)
    dtype: str | None = wire(DTYPE, default=None)
    seal: bool | None = wire(Bool(), default=None)  # the buyer asks for a sealed stream (§9.6)


@dataclass(frozen=True)
class Quote:
    TYPE: ClassVar = MessageType.QUOTE
    re: int = wire(UInt())
    quote: bytes = wire(QUOTE_ID)
    blocks: int = wire(UInt(1, MAX_CHAIN_BLOCKS))
    stored: int = wire(UInt(1, MAX_CHAIN_BLOCKS))
    layout: KVLayout = wire(Struct(KVLayout))
    root: bytes = wire(HASH)
    chunk: int = wire(UInt())
    price: int = wire(UInt())
    transport: str = wire(TRANSPORT)
    data: str = wire(ADDRESS)
    token: bytes = wire(Bin(32, 32))
    window: int | None = wire(UInt(1, MAX_UINT64), default=None)
    kx: bytes | None = wire(Bin(32, 32), default=None)  # the seller's key for sealing (§9.6)

    @property
    def size(self) -> int:
        """Bytes the root covers: all `stored` blocks in the delivered dtype."""
        return self.layout.payload_bytes(self.stored)

    @property
    def deliver(self) -> int:
        """Bytes the buyer keeps: the matched prefix."""
        return self.layout.payload_bytes(self.blocks)

    def check(self) -> None:
        _chunk_size_ok(self.chunk)
        check_data_address(self.transport, self.data, "data")
        if self.window is not None and self.window % self.chunk:
            raise Invalid("window", f"{self.window} is not a multiple of the chunk {self.chunk}")
        if self.blocks > self.stored:
            raise Invalid("blocks", f"{self.blocks} matched blocks exceed {self.stored} stored")


@dataclass(frozen=True)
class Accept:
    TYPE: ClassVar = MessageType.ACCEPT
    quote: bytes = wire(QUOTE_ID)
    price: int = wire(UInt())
    root: bytes = wire(HASH)
    kx: bytes | None = wire(Bin(32, 32), default=None)  # the buyer's, iff the QUOTE has one


@dataclass(frozen=True)
class Reject:
    TYPE: ClassVar = MessageType.REJECT
    quote: bytes = wire(QUOTE_ID)
    reason: int = wire(UInt(0, 65535))
    counter: int | None = wire(UInt(), default=None)


@dataclass(frozen=True)
class Transfer:
    TYPE: ClassVar = MessageType.TRANSFER
    quote: bytes = wire(QUOTE_ID)
    token: bytes = wire(Bin(32, 32))
    first: int = wire(UInt(0, MAX_UINT64))
    last: int | None = wire(UInt(0, MAX_UINT64), default=None)  # a stripe's end (§9.7)

    def check(self) -> None:
        if self.last is not None and self.last < self.first:
            raise Invalid("last", f"chunk {self.last} comes before first, {self.first}")


@dataclass(frozen=True)
class Receipt:
    TYPE: ClassVar = MessageType.RECEIPT
    quote: bytes = wire(QUOTE_ID)
    seller: bytes = wire(HASH)
    root: bytes = wire(HASH)
    bytes: int = wire(UInt())
    price: int = wire(UInt())


def receipt_price(price: int, paid_bytes: int, deliver: int) -> int:
    """What a RECEIPT for the first `paid_bytes` of a `deliver`-byte delivery states, for
    a deal at `price` (spec §8.14): its share, rounded down."""
    return price * paid_bytes // deliver


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar = MessageType.ERROR
    code: int = wire(UInt(1, 65535))
    msg: str = wire(Str(0, 256))
    re: int | None = wire(UInt(), default=None)


@dataclass(frozen=True)
class Accuse:
    """A buyer's signed word that `seller` signed KV its own fingerprint refutes; the
    evidence it names is served on request, and checked by whoever holds the weights."""

    TYPE: ClassVar = MessageType.ACCUSE
    seller: bytes = wire(HASH)
    fp: bytes = wire(HASH)
    root: bytes = wire(HASH)
    evidence: bytes = wire(HASH)
    size: int = wire(UInt(1, MAX_EVIDENCE_BYTES))
    kind: str = wire(OneOf(("layer0",)))


@dataclass(frozen=True)
class EvidenceRequest:
    TYPE: ClassVar = MessageType.EVIDENCE_REQUEST
    evidence: bytes = wire(HASH)
    offset: int = wire(UInt(0, MAX_EVIDENCE_BYTES - 1))


@dataclass(frozen=True)
class EvidencePart:
    TYPE: ClassVar = MessageType.EVIDENCE
    re: int = wire(UInt())
    evidence: bytes = wire(HASH)
    offset: int = wire(UInt(0, MAX_EVIDENCE_BYTES - 1))
    total: int = wire(UInt(1, MAX_EVIDENCE_BYTES))
    part: bytes = wire(Bin(1, MAX_EVIDENCE_PART))

    def check(self) -> None:
        if self.offset + len(self.part) > self.total:
            raise Invalid("part", "runs past the evidence's total size")


Message = (
    Hello
    | Peers
    | Advertise
    | Withdraw
    | Leave
    | Digest
    | Lookup
    | LookupResult
    | QuoteRequest
    | Quote
    | Accept
    | Reject
    | Transfer
    | Receipt
    | Error
    | Membership
    | Probe
    | ProbeAck
    | Accuse
    | EvidenceRequest
    | EvidencePart
)

MESSAGE_CLASSES: dict[MessageType, type] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Peers,
        Advertise,
        Withdraw,
        Digest,
        Lookup,
        LookupResult,
        QuoteRequest,
        Quote,
        Accept,
        Reject,
        Transfer,
        Receipt,
        Error,
        Membership,
        Probe,
        ProbeAck,
        Accuse,
        EvidenceRequest,
        EvidencePart,
        Leave,
    )
}

RELAYABLE = frozenset({MessageType.ADVERTISE, MessageType.WITHDRAW, MessageType.ACCUSE})
"""Statements that travel through third parties; they carry no recipient (spec §6.3)."""


def max_lifetime_ms(mtype: MessageType) -> int:
    return MAX_ADVERT_LIFETIME_MS if mtype in RELAYABLE else MAX_LIFETIME_MS


def check_header(mtype: MessageType, header: Header) -> None:
    """Rules on the header that need the message type, and no clock."""
    name = mtype.name
    if header.exp <= header.iat:
        raise Invalid(f"{name}.exp", "expires-at must be later than issued-at")
    if header.exp - header.iat > max_lifetime_ms(mtype):
        raise Invalid(
            f"{name}.exp",
            f"lifetime {header.exp - header.iat} ms exceeds {max_lifetime_ms(mtype)} ms",
            ErrorCode.LIFETIME_TOO_LONG,
        )
    if mtype in RELAYABLE and header.to is not None:
        raise Invalid(f"{name}.to", "a relayable statement names no recipient")
    if mtype not in RELAYABLE and header.to is None:
        raise Invalid(f"{name}.to", "a direct statement must name its recipient")
