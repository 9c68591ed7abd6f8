"""One purchase from the buyer's side, sans-I/O: time and answers in, actions out.

A Purchase walks the providers a lookup lists (p2p/_buying.py's Walk), asks them for
quotes — the best first, one more every HEDGE_S while none has answered — checks each
quote against its advertisement and the buyer's model, holds one Deal per quote, seals
what the buyer sends (QUOTE_REQUEST, REJECT, ACCEPT, TRANSFER, RECEIPT) and records each
provider's faults. It never waits and never reads a clock: every input carries `now`,
and `wait` says when it next needs one. PeerClient (p2p/_client.py) drives it over
ZeroMQ and the data channel; the simulator (kvx/testing/_sim.py) drives it in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from kvx.protocol import (
    Accept,
    Advertise,
    Ephemeral,
    ErrorCode,
    KVLayout,
    Message,
    MessageType,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    RemoteProtocolError,
    Transfer,
    channel_key,
)
from kvx.transport import MAX_STRIPES, Expected, Fault
from kvx.trust import Signer, Statement

from ._buying import Deal, Step, Walk, check_layout, check_quote

HEDGE_S = 0.25
"""How long a buyer waits for a provider's quote before it asks the next one as well."""
HEDGE_MAX = 16
"""Providers asked for a quote at once, at most: as many as HEDGE_S apart fill 4 s."""


@dataclass(frozen=True)
class Want:
    """What the buyer wants and what it will take."""

    fp: bytes
    chain: tuple[bytes, ...]
    bid: Callable[[KVLayout, int], int]  # its highest price for so many tokens of a layout
    max_bytes: int  # a larger delivery is not bought
    timeout_s: float  # each wait for a seller, over all providers together
    transports: tuple[str, ...] = ("tcp",)
    ns: bytes | None = None  # the private namespace it buys in (None: public)
    dtype: str | None = None  # the dtype it asks the seller to convert to
    layout: KVLayout | None = None  # what its own model implies for `fp` (None: unchecked)
    seal: bool = False  # ask for a sealed stream (§9.6)


@dataclass(frozen=True)
class Quoted:
    """A quote the buyer could take, with its deal and the stream's key (§9.6)."""

    ad: Statement
    quote: Statement
    deal: Deal
    kx: bytes | None  # the buyer's half of the channel key, for the ACCEPT
    key: bytes | None  # the deal's channel key, when the seller seals the stream

    @property
    def provider(self) -> bytes:
        return self.ad.signer_id

    @property
    def terms(self) -> Quote:
        q = self.quote.message
        assert isinstance(q, Quote)
        return q


@dataclass(frozen=True)
class Ask:
    """Send this QUOTE_REQUEST to the provider (after proving membership, if the purchase
    is private) and answer with `answered` or `failed`. A renewal goes on the connection
    of the provider's last deal, so that its receipt arrives first."""

    provider: bytes
    ad: Statement
    frame: bytes
    renewal: bool
    timeout_s: float  # how long to wait for its answer


@dataclass(frozen=True)
class Send:
    """Send this frame on the provider's connection."""

    provider: bytes
    frame: bytes


@dataclass(frozen=True)
class Close:
    """The provider failed before any deal with it began: close its connection."""

    provider: bytes


@dataclass(frozen=True)
class Lookup:
    """Every listed provider was tried: ask the node again, and answer with `listed`."""


@dataclass(frozen=True)
class Report:
    """Tell the node what these providers did wrong, so that it ranks them last."""

    faults: tuple[Fault, ...]


@dataclass(frozen=True)
class Ready:
    """A quote to stream from, for the provider the stream layer asked for."""

    quoted: Quoted


@dataclass(frozen=True)
class Renewed:
    """The quote a provider gave for another deal (§9.7)."""

    quoted: Quoted


@dataclass(frozen=True)
class Exhausted:
    """No provider is left to ask, or none answered in time."""

    reason: str


Action = Ask | Send | Close | Lookup | Report | Ready | Renewed | Exhausted


@dataclass
class _Asking:
    ad: Statement
    deal: Deal
    bid: int
    renewal: bool


class Purchase:
    def __init__(self, want: Want, signer: Signer, now: float) -> None:
        self.want = want
        self.signer = signer
        self.matched = 0
        self.width = 1  # providers to stream from at once (§9.7)
        self.faults: list[Fault] = []  # every provider's, the stream layer's included
        self.refused: set[bytes] = set()  # roots whose KV the buyer's own check refuted
        self.deals: dict[bytes, Quoted] = {}  # accepted, by quote id
        self.claims: dict[bytes, Statement] = {}  # provider -> the ad it was bought by
        self.paid: dict[bytes, bytes] = {}  # quote id -> the last receipt sent for it
        self._walk: Walk[Statement] = Walk(lambda ad: ad.signer_id)
        self._batch: list[Statement] = []
        self._more = True  # a lookup may list providers not yet tried
        self._looking = False
        self._asking: dict[bytes, _Asking] = {}  # hedged asks, for the stream layer's want
        self._renewing: dict[bytes, _Asking] = {}  # asks for another deal (§9.7)
        self._ready: list[Quoted] = []
        self._wanted = False
        self._exhausted = False
        self._asked_at = now
        self._deadline = now + want.timeout_s
        self._reported = 0

    # ---- inputs --------------------------------------------------------------------

    def listed(
        self, matched: int, ads: Sequence[Statement], failed: Collection[bytes], now: float
    ) -> list[Action]:
        """A lookup's answer: how many blocks the best ads match, the ads, and the providers
        that failed this node before. The first one fixes the purchase's prefix."""
        fitting = [
            ad
            for ad in ads
            if isinstance(ad.message, Advertise)
            and ad.message.layout.payload_bytes(matched) <= self.want.max_bytes
        ]
        self._looking = False
        if not self.matched:
            if not matched or not fitting:
                return self._exhaust(
                    "no provider advertises any block of this prefix within the size bound"
                )
            self.matched = matched
            # Providers in good standing stream at once, up to the cap; one that failed
            # this node before is tried only when nobody else is left.
            good = sum(ad.signer_id not in failed for ad in fitting)
            self.width = min(MAX_STRIPES, max(1, good))
        elif matched != self.matched:
            fitting = []  # the swarm changed under us: only the first prefix is bought
        self._batch = self._walk.take(fitting)
        self._more = bool(self._batch)
        return self.tick(now)

    def wanted(self, now: float) -> list[Action]:
        """The stream layer wants one more provider."""
        self._wanted = True
        self._deadline = now + self.want.timeout_s  # a new wait for a seller
        out: list[Action] = []
        for quoted in [q for q in self._ready if q.terms.root in self.refused]:
            # A quote that waited while another was used, of a root refuted since.
            self._ready.remove(quoted)
            quoted.deal.advance(MessageType.ERROR)
            self.faults.append(Fault(quoted.provider, ErrorCode.KV_MISMATCH, "a refuted root"))
            out.append(Close(quoted.provider))
        return out + self.tick(now)

    def answered(self, provider: bytes, quote: Statement, now: float) -> list[Action]:
        """A provider's QUOTE to the request its Ask sent."""
        asking = self._asking.pop(provider, None) or self._renewing.pop(provider, None)
        if asking is None:
            return []  # the purchase stopped waiting for it
        out: list[Action] = []
        deal = asking.deal
        try:
            deal.advance(MessageType.QUOTE)
            q = quote.message
            assert isinstance(q, Quote)
            want = self.want
            check_quote(asking.ad, q, self.matched, want.dtype, want.layout)
            if q.root in self.refused:
                raise RemoteProtocolError(ErrorCode.KV_MISMATCH, "a refuted root")
            if q.price > asking.bid:
                deal.advance(MessageType.REJECT)
                reject = Reject(quote=q.quote, reason=int(ErrorCode.PRICE_TOO_HIGH))
                out.append(Send(provider, self._seal(reject, provider, now)))
                raise RemoteProtocolError(ErrorCode.PRICE_TOO_HIGH, f"{q.price} > {asking.bid}")
            kx = key = None
            if q.kx is not None:  # the stream will be sealed: agree on its key now
                ephemeral = Ephemeral()
                kx = ephemeral.public
                key = channel_key(ephemeral.shared(q.kx), q.quote, q.kx, kx)
        except RemoteProtocolError as exc:
            return out + self._failed(provider, asking, exc.code, exc.detail, now)
        quoted = Quoted(asking.ad, quote, deal, kx, key)
        if asking.renewal:
            return [*out, Renewed(quoted)]
        self._ready.append(quoted)
        return out + self.tick(now)

    def failed(self, provider: bytes, code: ErrorCode, detail: str, now: float) -> list[Action]:
        """A provider's ERROR to the request its Ask sent, or no answer in time."""
        asking = self._asking.pop(provider, None) or self._renewing.pop(provider, None)
        if asking is None:
            return []
        return self._failed(provider, asking, code, detail, now)

    def tick(self, now: float) -> list[Action]:
        """What time alone makes due: the next hedged ask, a new lookup, or giving up."""
        if not self._wanted or self._exhausted:
            return []
        if self._ready:
            self._wanted = False
            return [Ready(self._ready.pop(0))]
        if now >= self._deadline:
            return self._exhaust("no provider answered in time")
        out: list[Action] = []
        while not self._looking and self._hedge(now):
            if not self._batch:
                if not self._more:
                    break
                # Every listed provider was tried: tell the node of their faults, so that
                # it ranks them last, and ask it for the ones it knows now.
                if report := self.unreported():
                    out.append(report)
                self._looking = True
                out.append(Lookup())
                break
            ask = self._ask(self._batch.pop(0), False, now)
            if ask is not None:
                out.append(ask)
                self._asked_at = now
        if not (self._asking or self._looking or self._batch or self._more):
            return out + self._exhaust("every provider failed")
        return out

    def wait(self, now: float) -> float:
        """Seconds until `tick` has something to do, if no answer comes first."""
        if not self._wanted or self._exhausted:
            return self.want.timeout_s
        due = self._deadline
        if not self._looking and len(self._asking) < HEDGE_MAX and (self._batch or self._more):
            due = min(due, self._asked_at + HEDGE_S)
        return max(0.0, due - now)

    # ---- the deals -----------------------------------------------------------------

    def renew(self, provider: bytes, now: float) -> Ask | None:
        """Ask a provider whose deal ended for another one, for more of the payload (§9.7)."""
        return self._ask(self.claims[provider], True, now)

    def accept(self, quoted: Quoted, now: float) -> bytes:
        """The ACCEPT that takes a quote: from here the buyer owes on verified delivery."""
        q = quoted.terms
        frame = self._seal(
            Accept(quote=q.quote, price=q.price, root=q.root, kx=quoted.kx), quoted.provider, now
        )
        quoted.deal.advance(MessageType.ACCEPT)
        self.deals[q.quote] = quoted
        self.claims[quoted.provider] = quoted.ad
        return frame

    def transfer(self, quote: bytes, first: int, last: int | None, now: float) -> bytes:
        """The TRANSFER that opens a deal's stream of chunks first … last, or asks it to
        end sooner (§9.7)."""
        quoted = self.deals[quote]
        if quoted.deal.step is Step.ACCEPTED:  # asking a stream to end sooner is the same step
            quoted.deal.advance(MessageType.TRANSFER)
        q = quoted.terms
        return self._seal(
            Transfer(quote=q.quote, token=q.token, first=first, last=last), quoted.provider, now
        )

    def receipt(self, quote: bytes, size: int, now: float) -> bytes:
        """The RECEIPT for a deal's first `size` bytes: a window's (§9.4), or the last."""
        quoted = self.deals[quote]
        q = quoted.terms
        receipt = Receipt(
            quote=q.quote,
            seller=quoted.provider,
            root=q.root,
            bytes=size,
            price=Expected.from_quote(q).paid_price(size),
        )
        self.paid[quote] = frame = self._seal(receipt, quoted.provider, now)
        return frame

    def settle(self, quote: bytes, carried: int, now: float) -> Send | None:
        """The final RECEIPT of a stream that ended, for what it carried (§10.6); None if
        it was settled already."""
        quoted = self.deals[quote]
        if quoted.deal.step is not Step.STREAMING:
            return None
        frame = self.receipt(quote, carried, now)
        quoted.deal.advance(MessageType.RECEIPT)
        return Send(quoted.provider, frame)

    def refute(self, root: bytes, providers: Sequence[bytes], why: str) -> None:
        """The buyer's own check refused the KV of `root`: each provider that streamed it
        signed it and is a liar, and no provider of it is asked again."""
        self.refused.add(root)
        self.faults.extend(Fault(p, ErrorCode.KV_MISMATCH, why) for p in providers)

    def close(self) -> list[bytes]:
        """The purchase is over: deals cut mid-way fail. Returns the last receipt sent
        for each deal, which the ledger books."""
        for quoted in self.deals.values():
            if quoted.deal.step in (Step.ACCEPTED, Step.STREAMING):
                quoted.deal.advance(MessageType.ERROR)
        self._exhausted = True
        return list(self.paid.values())

    # ---- helpers -------------------------------------------------------------------

    def _hedge(self, now: float) -> bool:
        """Whether one more provider may be asked now."""
        if len(self._asking) >= HEDGE_MAX:
            return False
        return not self._asking or now >= self._asked_at + HEDGE_S

    def _ask(self, ad: Statement, renewal: bool, now: float) -> Ask | None:
        a = ad.message
        assert isinstance(a, Advertise)
        want = self.want
        if a.root in self.refused and want.dtype is None:
            return None  # it signed KV already refuted: no second chance in a purchase
        try:
            check_layout(ad, want.dtype, want.layout)
        except RemoteProtocolError as exc:
            self.faults.append(Fault(ad.signer_id, exc.code, exc.detail))
            return None
        bid = want.bid(a.layout, self.matched * a.layout.block)
        request = QuoteRequest(
            fp=want.fp,
            blocks=want.chain[: self.matched],
            transports=want.transports,
            max_price=bid,
            ns=want.ns,
            dtype=want.dtype,
            seal=True if want.seal else None,
        )
        (self._renewing if renewal else self._asking)[ad.signer_id] = _Asking(
            ad, Deal(), bid, renewal
        )
        # A hedged ask waits as long as the purchase still waits for a seller; a renewal,
        # asked after a stream that may have run longer than that, a whole wait.
        wait = self.want.timeout_s if renewal else max(0.0, self._deadline - now)
        return Ask(ad.signer_id, ad, self._seal(request, ad.signer_id, now), renewal, wait)

    def _failed(
        self, provider: bytes, asking: _Asking, code: ErrorCode, detail: str, now: float
    ) -> list[Action]:
        if asking.deal.step is not Step.FAILED:
            asking.deal.advance(MessageType.ERROR)
        self.faults.append(Fault(provider, code, detail))
        if asking.renewal:
            return []  # its connection stays: the earlier deal's receipts go on it
        return [Close(provider), *self.tick(now)]

    def _exhaust(self, reason: str) -> list[Action]:
        self._exhausted = True
        self._wanted = False
        out: list[Action] = [Close(p) for p in self._asking]
        self._asking.clear()
        return [*out, Exhausted(reason)]

    def unreported(self) -> Report | None:
        """The faults the node has not been told of yet."""
        faults, self._reported = self.faults[self._reported :], len(self.faults)
        return Report(tuple(faults)) if faults else None

    def _seal(self, message: Message, to: bytes, now: float) -> bytes:
        return self.signer.seal(message, now_ms=int(now * 1000), to=to)
