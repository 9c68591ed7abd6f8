"""Fetching one payload from the providers of one content root, several at once.

Each provider streams its own range of chunks (spec §9.7; transport/_stripes.py decides
which). A provider that fails — a bad chunk, a wrong list, a stall, a dead socket — ends
its stream, and the chunks its receipts did not pay for go to the others. With nobody
left the fetch is a miss that says why, the destination is wiped, and the caller
prefills itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvx.protocol import ErrorCode, KvxError, RemoteProtocolError

from ._destination import Destination
from ._receiving import Receiving
from ._stripes import Abandon, Shorten, Stripes
from ._tcp import TcpReceiver
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


MAX_STRIPES = 4
"""Providers one purchase streams from at once, at most (§9.7)."""
TICK_S = 0.1
"""How often the fetch looks at its streams' progress."""
GATHER_S = 0.25
"""How long the first provider waits for the others before the payload is split."""


@dataclass(frozen=True)
class Source:
    """One provider's accepted quote: where to stream from and how to open the stream."""

    provider: bytes
    transport: str
    address: str
    expected: Expected
    transfer: Callable[[int, int | None], bytes]  # the sealed TRANSFER for (first, last)
    pay: Callable[[int], bytes] | None = None  # the signed receipt for a paid prefix (§9.4)
    key: bytes | None = None  # the deal's channel key, when the stream is sealed (§9.6)
    deal: bytes = b""  # the quote id: what tells two deals with one provider apart
    renew: Callable[[], Awaitable[Source | None]] | None = field(default=None, compare=False)
    """A new deal with the same provider, for more of the payload once this one is spent."""
    accept: Callable[[], Awaitable[None]] | None = field(default=None, compare=False)
    """For a deal quoted but not yet accepted: accept it (once it has a range to stream)."""


@dataclass(frozen=True)
class Fault:
    provider: bytes
    code: ErrorCode
    detail: str


@dataclass(frozen=True)
class Streamed:
    """What one deal's stream gave the buyer: chunks [first, stop) it keeps."""

    source: Source
    first: int
    stop: int
    ended: bool  # it sent END: its final RECEIPT, for `carried` bytes, is due (§10.6)

    @property
    def carried(self) -> int:
        chunk = self.source.expected.chunk
        return min(self.stop * chunk, self.source.expected.deliver) - self.first * chunk


@dataclass(frozen=True)
class Fetched:
    size: int  # bytes of the delivery
    streams: tuple[Streamed, ...]  # every stream the buyer keeps chunks of, by first chunk
    faults: tuple[Fault, ...]  # those that failed, for the caller to score
    hashes: bytes  # the payload's chunk list, verified against the root
    destination: Destination  # where it landed (Destination.read gives it back)

    @property
    def providers(self) -> tuple[bytes, ...]:
        """Those that delivered verified chunks the buyer keeps, in the payload's order."""
        return tuple(dict.fromkeys(s.source.provider for s in self.streams))

    @property
    def delivered(self) -> dict[bytes, int]:
        """Bytes each provider delivered that the buyer keeps (and pays it for)."""
        out: dict[bytes, int] = {}
        for streamed in self.streams:
            provider = streamed.source.provider
            out[provider] = out.get(provider, 0) + streamed.carried
        return out


class FetchMiss(KvxError):
    """No provider delivered the whole payload; `faults` says what each one did."""

    def __init__(self, faults: Sequence[Fault]) -> None:
        reasons = "; ".join(f"{f.provider.hex()[:12]}: {f.code.name} ({f.detail})" for f in faults)
        super().__init__(f"fetch failed: {reasons or 'no provider'}")
        self.faults = tuple(faults)


def _receiver(
    source: Source, verifier: StreamVerifier, dest: Destination, timeout_s: float
) -> Receiving:
    opening = source.transfer(verifier.start, verifier.last)
    args = (source.address, opening, verifier, dest, timeout_s, source.pay, source.key)
    if source.transport == "tcp":
        return TcpReceiver(*args)
    if source.transport == "ucx":
        from ._ucx import UcxReceiver  # ucxx is an optional extra

        return UcxReceiver(*args)
    raise RemoteProtocolError(ErrorCode.NO_COMMON_TRANSPORT, f"unknown {source.transport}")


class Offers:
    """Providers as fetches take them, one negotiated at a time. A negotiation under way
    when a fetch ends, and providers of another payload, are kept for the next fetch of
    the same purchase (after the buyer's check refused the first payload, say)."""

    def __init__(self, sources: Iterable[Source] | AsyncIterable[Source]) -> None:
        if isinstance(sources, AsyncIterator):
            self._it = sources
        elif isinstance(sources, AsyncIterable):
            self._it = aiter(sources)
        else:

            async def each() -> AsyncIterator[Source]:
                for source in sources:
                    yield source

            self._it = each()
        self._pending: asyncio.Task[Source | None] | None = None
        self.standby: list[Source] = []
        self.exhausted = False

    def pull(self) -> asyncio.Task[Source | None]:
        """The next provider's negotiation (the one under way, if there is one)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._it, None))
        return self._pending

    @property
    def pending(self) -> asyncio.Task[Source | None] | None:
        """The negotiation under way, if there is one."""
        return self._pending

    def took(self) -> Source | None:
        """The provider the finished negotiation gave (None: there are no more)."""
        assert self._pending is not None and self._pending.done()
        source, self._pending = self._pending.result(), None
        self.exhausted = source is None
        return source

    async def next(self) -> Source | None:
        if self.standby:
            return self.standby.pop(0)
        if self.exhausted:
            return None
        await self.pull()
        return self.took()

    async def aclose(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()


Target = Callable[[Expected], "torch.Tensor | Destination"]


async def fetch(
    sources: Offers | Iterable[Source] | AsyncIterable[Source],
    tensor: torch.Tensor | Target,
    *,
    timeout_s: float = 30.0,
    faults: list[Fault] | None = None,
    width: int = 1,
    settle: Callable[[Streamed], Awaitable[None]] | None = None,
) -> Fetched:
    """Fill the destination with the verified payload prefix, or raise FetchMiss.

    `sources` are taken as the fetch needs them, up to `width` streaming at once (a buyer
    negotiates with a provider only when it is wanted); `tensor` may be a function that
    allocates the destination once a source's quote has fixed its size (again, should a
    later source offer another payload after every provider of the first failed), or
    that returns a Destination of its own. A caller that fetches again from the
    providers one fetch did not reach passes the same Offers. Faults met before (a
    refused quote, say) can be passed in `faults`, to be reported with the rest.
    `settle`, if given, pays each stream as soon as its END came; a provider is asked
    for another deal only once that payment went out.
    """
    faults = [] if faults is None else faults
    offers = sources if isinstance(sources, Offers) else Offers(sources)
    while True:
        first = await offers.next()
        if first is None:
            raise FetchMiss(faults)
        target = tensor(first.expected) if callable(tensor) else tensor
        dest = target if isinstance(target, Destination) else Destination(target, first.expected)
        striping = _Striping(first, offers, dest, timeout_s, faults, width, settle)
        fetched = await striping.run()
        if fetched is not None:
            return fetched
        dest.scrub(0)  # a miss hands back nothing, not even the verified part


@dataclass
class _Lane:
    source: Source
    verifier: StreamVerifier
    task: asyncio.Task[None] | None = None
    receiver: Receiving | None = None  # once its deal is accepted and its stream opens
    abandoned: str | None = None  # why the buyer cut it

    def cancel(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()
        elif self.task is not None:
            self.task.cancel()  # still accepting: nothing has landed


class _Striping:
    """Drives Stripes for one payload: opens streams, feeds them progress and time, and
    acts on what it says. Providers of another payload wait in the offers' standby."""

    def __init__(
        self,
        first: Source,
        offers: Offers,
        dest: Destination,
        timeout_s: float,
        faults: list[Fault],
        width: int,
        settle: Callable[[Streamed], Awaitable[None]] | None = None,
    ) -> None:
        self.expected = first.expected
        self.offers, self.dest, self.settle = offers, dest, settle
        self.timeout_s, self.faults = timeout_s, faults
        width = max(1, min(width, MAX_STRIPES)) if dest.concurrent else 1
        self.plan = Stripes(self.expected.needed, width)
        self.lanes: dict[bytes, _Lane] = {}
        self.sources: dict[bytes, Source] = {}
        self.ended: set[bytes] = set()
        self.parked: list[Source] = [first]  # deals waiting for chunks to stream
        self.renewing: set[asyncio.Task[Source | None]] = set()
        self.settling: set[asyncio.Task[None]] = set()
        self.hashes = b""
        self.gathering = self.plan.width > 1
        self.started = time.monotonic()

    async def run(self) -> Fetched | None:
        try:
            while not self.plan.complete:
                now = time.monotonic()
                self._progress(now)
                self._open_parked(now)
                if self.plan.complete:
                    break
                pulling = self._pull(now)
                if not (self.lanes or self.parked or self.renewing or pulling):
                    return None  # nobody left who could stream the rest
                waiting: list[asyncio.Task[Any]] = [*self._tasks(), *self.renewing]
                if pulling is not None:
                    waiting.append(pulling)
                done, _ = await asyncio.wait(
                    waiting, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    self._took(task, time.monotonic())
        finally:
            await self._stop()
        return Fetched(
            self.expected.deliver,
            tuple(
                Streamed(self.sources[key], first, stop, key in self.ended)
                for first, stop, key in sorted(self.plan.done)
            ),
            tuple(self.faults),
            self.hashes,
            self.dest,
        )

    def _pull(self, now: float) -> asyncio.Task[Source | None] | None:
        """The negotiation with one more provider: under way, or begun now if the plan
        wants one; None if none is."""
        if self.offers.pending is None and not self.offers.exhausted and self.plan.wants(now):
            self.offers.pull()
        return self.offers.pending

    def _progress(self, now: float) -> None:
        for key, lane in self.lanes.items():
            v = lane.verifier
            self.plan.verified(key, v.verified, v.paid, now)
        for action in self.plan.tick(now):
            self._abandon(action)

    def _abandon(self, action: Abandon) -> None:
        """Cut a stream; it counts as failed once its receiver has let go of the
        destination (its task ends), so that nobody else's chunks land under it."""
        lane = self.lanes.get(action.key)
        if lane is not None and lane.abandoned is None:
            lane.abandoned = action.why
            lane.cancel()

    def _open_parked(self, now: float) -> None:
        if self.gathering:
            # The first streams split the payload among the providers whose deals came
            # in the first moment, not among those asked: one that refuses takes no share.
            enough = len(self.parked) >= self.plan.width or self.offers.exhausted
            if not enough and now - self.started < GATHER_S:
                return
            self.gathering = False
            self.plan.width = len(self.parked)
        parked, self.parked = self.parked, []
        for n, source in enumerate(parked):
            opened = self.plan.open(source.deal, source.provider, now, len(parked) - n)
            if opened is None:
                if self.plan.lanes:
                    self.parked.append(source)  # a running stream's rest may come free
                continue  # else nothing is left for it: its deal goes unused
            if isinstance(opened, Shorten):
                self._shorten(opened)
                self.parked.append(source)  # it takes the rest once the other ends
                continue
            first, stop = opened
            lane = _Lane(source, StreamVerifier(self.expected, first, stop))
            lane.task = asyncio.ensure_future(self._stream(lane))
            self.sources[source.deal] = source
            self.lanes[source.deal] = lane

    async def _stream(self, lane: _Lane) -> None:
        """Accept the lane's deal if it is not yet, then open and receive its stream (the
        TRANSFER may overtake the ACCEPT: the seller waits for it, §9.2)."""
        if lane.source.accept is not None:
            await lane.source.accept()
        lane.receiver = _receiver(lane.source, lane.verifier, self.dest, self.timeout_s)
        await lane.receiver.run()

    def _shorten(self, action: Shorten) -> None:
        lane = self.lanes[action.key]
        receiver = lane.receiver  # None while its deal is still being accepted
        if receiver is None or not receiver.shorten(
            action.stop, lane.source.transfer(lane.verifier.start, action.stop - 1)
        ):
            self.plan.declined(action.key)

    def _took(self, task: asyncio.Task[Any], now: float) -> None:
        if task is self.offers.pending:
            source = self.offers.took()
            if source is not None and source.expected.content != self.expected.content:
                self.offers.standby.append(source)  # honest providers may hold other bytes
            elif source is not None:
                self.parked.append(source)
            return
        if task in self.renewing:
            self.renewing.discard(task)
            if (error := task.exception()) is not None:
                raise error  # a provider's refusal is a fault, not an exception
            source = task.result()
            if source is not None and source.expected.content == self.expected.content:
                self.parked.append(source)
            return
        key, lane = next((k, lane) for k, lane in self.lanes.items() if lane.task is task)
        del self.lanes[key]
        v = lane.verifier
        self.plan.verified(key, v.verified, v.paid, now)
        if not self.hashes:
            self.hashes = v.chunk_list_bytes
        # A lane's task is cancelled only when the buyer abandoned it while accepting.
        if not task.cancelled() and task.exception() is None:
            self.ended.add(key)
            self.plan.ended(key, v.stop, now)
            paid = None
            if self.settle is not None:  # paid at once, whatever else the fetch does
                paid = asyncio.ensure_future(
                    self.settle(Streamed(lane.source, v.start, v.stop, True))
                )
                self.settling.add(paid)
            self.renewing.add(asyncio.ensure_future(self._renew(lane, paid)))
            return
        self.plan.failed(key)
        if lane.abandoned is not None:  # whatever the cut made the receiver raise
            self.faults.append(Fault(lane.source.provider, ErrorCode.TIMEOUT, lane.abandoned))
            return
        error = task.exception()
        if not isinstance(error, RemoteProtocolError):
            assert error is not None  # a task that ended well was taken above
            raise error  # a fault of the buyer itself: receivers raise only protocol errors
        self.faults.append(Fault(lane.source.provider, error.code, error.detail))

    async def _renew(self, lane: _Lane, paid: asyncio.Task[None] | None) -> Source | None:
        """Ask a provider whose stream ended for another deal while there is work it may
        take (free chunks, or a running stream's rest), once that stream was paid."""
        if paid is not None:
            await asyncio.shield(paid)
        if lane.source.renew is None or not (self.plan.free or self.plan.lanes):
            return None  # nothing is left that it could take, now or later
        return await lane.source.renew()

    def _tasks(self) -> list[asyncio.Task[None]]:
        """The lanes' tasks (a lane has one from the moment it opens)."""
        return [lane.task for lane in self.lanes.values() if lane.task is not None]

    async def _stop(self) -> None:
        """Nothing runs on once the fetch is over: streams (none, after a success) and
        renewals. A negotiation under way stays with the offers, for a next fetch."""
        tasks: list[asyncio.Task[Any]] = [*self._tasks(), *self.renewing]
        for lane in self.lanes.values():
            lane.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self.settling)  # a payment under way is never cut off
