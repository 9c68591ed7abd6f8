"""Fetching one payload from a list of providers of the same content root.

A provider that fails — a bad chunk, a wrong list, a stall, a dead socket — ends its
stream; the next provider resumes from the first unverified chunk. With nobody left the
fetch is a miss that says why, the unverified part of the destination is wiped, and the
caller prefills itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvx.protocol import ErrorCode, KvxError, RemoteProtocolError

from ._destination import Destination
from ._tcp import fetch_tcp
from ._verify import Expected, StreamVerifier

if TYPE_CHECKING:
    import torch

PREFERENCE = ("ucx", "tcp")
"""Transports from best to last resort; every node offers tcp (spec §10.3)."""


def available_transports() -> tuple[str, ...]:
    """What this process can speak: tcp always, ucx when ucxx is installed."""
    has_ucx = importlib.util.find_spec("ucxx") is not None
    return tuple(t for t in PREFERENCE if t == "tcp" or has_ucx)


def choose_transport(buyer: Sequence[str], seller: Collection[str]) -> str:
    """The first of the buyer's transports, in its order, that the seller offers."""
    for name in buyer:
        if name in seller:
            return name
    raise RemoteProtocolError(
        ErrorCode.NO_COMMON_TRANSPORT, f"buyer offers {list(buyer)}, seller {sorted(seller)}"
    )


@dataclass(frozen=True)
class Source:
    """One provider's accepted quote: where to stream from and how to open the stream."""

    provider: bytes
    transport: str
    address: str
    expected: Expected
    transfer: Callable[[int], bytes]  # the sealed TRANSFER frame for a first chunk
    pay: Callable[[int], bytes] | None = None  # the signed receipt for a paid prefix (§9.4)
    key: bytes | None = None  # the deal's channel key, when the stream is sealed (§9.6)


@dataclass(frozen=True)
class Fault:
    provider: bytes
    code: ErrorCode
    detail: str


@dataclass(frozen=True)
class Fetched:
    bytes: int
    providers: tuple[bytes, ...]  # those that delivered verified chunks, in order
    faults: tuple[Fault, ...]  # those that failed, for the caller to score
    hashes: bytes  # the payload's chunk list, verified against the root
    destination: Destination  # where it landed (Destination.read gives it back)
    carried: int  # bytes the last provider's stream carried: what its final receipt pays


class FetchMiss(KvxError):
    """No provider delivered the whole payload; `faults` says what each one did."""

    def __init__(self, faults: Sequence[Fault]) -> None:
        reasons = "; ".join(f"{f.provider.hex()[:12]}: {f.code.name} ({f.detail})" for f in faults)
        super().__init__(f"fetch failed: {reasons or 'no provider'}")
        self.faults = tuple(faults)


async def _stream(source: Source, verifier: StreamVerifier, dest: Destination, timeout_s: float):
    verifier.begin_stream(source.expected)
    frame = source.transfer(verifier.verified)
    if source.transport == "tcp":
        await asyncio.to_thread(
            fetch_tcp, source.address, frame, verifier, dest, timeout_s, source.pay, source.key
        )
    elif source.transport == "ucx":
        from ._ucx import fetch_ucx  # ucxx is an optional extra

        await asyncio.wait_for(
            fetch_ucx(source.address, frame, verifier, dest, source.pay, source.key), timeout_s
        )
    else:
        raise RemoteProtocolError(ErrorCode.NO_COMMON_TRANSPORT, f"unknown {source.transport}")


def _each(sources: Iterable[Source] | AsyncIterable[Source]) -> AsyncIterator[Source]:
    """The sources as one async iterator; an iterator passed in is taken as it is, so that
    a caller can fetch again from the providers one fetch did not reach."""
    if isinstance(sources, AsyncIterator):
        return sources
    if isinstance(sources, AsyncIterable):
        return aiter(sources)

    async def each() -> AsyncIterator[Source]:
        for source in sources:
            yield source

    return each()


async def fetch(
    sources: Iterable[Source] | AsyncIterable[Source],
    tensor: torch.Tensor | Callable[[Expected], torch.Tensor | Destination],
    *,
    timeout_s: float = 30.0,
    faults: list[Fault] | None = None,
) -> Fetched:
    """Fill the destination with the verified payload prefix, or raise FetchMiss.

    `sources` may be produced lazily (a buyer negotiates with the next provider only when
    the last one failed); `tensor` may be a function that allocates the destination once
    a source's quote has fixed its size (again, should a later source offer another
    payload after the earlier ones failed), or that returns a Destination of its own.
    Faults met before (a refused quote, say) can be passed in `faults`, to be reported
    with the rest.
    """
    faults = [] if faults is None else faults
    served: list[bytes] = []
    dest: Destination | None = None
    verifier: StreamVerifier | None = None
    async for source in _each(sources):
        if verifier is None or source.expected.content != verifier.expected.content:
            # Another payload (honest providers may hold different bytes for one chain):
            # start over with it, and blame nobody for the difference.
            if dest is not None:
                dest.scrub(0)
            served = []
            target = tensor(source.expected) if callable(tensor) else tensor
            if not isinstance(target, Destination):
                target = Destination(target, source.expected)
            dest, verifier = target, StreamVerifier(source.expected)
        expected = source.expected
        before = verifier.verified
        try:
            await _stream(source, verifier, dest, timeout_s)
        except RemoteProtocolError as exc:
            faults.append(Fault(source.provider, exc.code, exc.detail))
        except TimeoutError:
            faults.append(Fault(source.provider, ErrorCode.TIMEOUT, "the stream stalled"))
        if verifier.verified > before:
            served.append(source.provider)
        if verifier.complete:
            return Fetched(
                expected.deliver,
                tuple(served),
                tuple(faults),
                verifier.chunk_list_bytes,
                dest,
                verifier.carried,
            )
    if dest is not None:
        dest.scrub(0)  # a miss hands back nothing, not even the verified part
    raise FetchMiss(faults)
