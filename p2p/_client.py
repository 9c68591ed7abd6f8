"""The peer client an agent embeds: look up, buy and publish KV caches.

It asks its node (over the node's admin socket) what the swarm advertises, then deals
with each seller itself under the node's identity — QUOTE_REQUEST, QUOTE, ACCEPT, the
data channel, RECEIPT — so that KV bytes travel from the seller straight into the
agent's own tensor. Without a node to talk to, it starts one inside its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import zmq
import zmq.asyncio

from kvx.protocol import (
    DEFAULT_CHUNK_BYTES,
    Accept,
    Advertise,
    DataAddress,
    Ephemeral,
    Error,
    ErrorCode,
    Hello,
    KVLayout,
    KvxError,
    Membership,
    Message,
    MessageType,
    Namespace,
    NamespaceProof,
    Peers,
    Quote,
    QuoteRequest,
    Receipt,
    Reject,
    RemoteProtocolError,
    Transfer,
    channel_key,
)
from kvx.transport import (
    MAX_STRIPES,
    Destination,
    Expected,
    Fault,
    Fetched,
    FetchMiss,
    Offers,
    Source,
    Streamed,
    available_transports,
    fetch,
)
from kvx.trust import (
    DEFAULT_VERIFY,
    Evidence,
    Identity,
    Inbox,
    Ledger,
    Signer,
    Statement,
    VerifyPolicy,
    covering_chunks,
    curve_public_key,
    make_curve_client,
    open_envelope,
)

from ._admin import AdminError, admin_socket, request, result
from ._buying import MAX_PROVIDERS, Deal, Step, Walk, blame, check_layout, check_quote
from ._config import ADMIN_SOCKET, INFO_FILE, KEY_FILE, LEDGER_FILE, NodeConfig
from ._pricing import PricePolicy, prefill_flops

if TYPE_CHECKING:
    import torch

    from ._node import Node

T = TypeVar("T")


@dataclass(frozen=True)
class Refusal:
    """Why the buyer's own check refused a delivery that matched its signed root."""

    check: str  # the check that failed, e.g. "layer0" or "deep"
    detail: str
    position: int | None = None  # a layer-0 lie's token index: evidence can prove it
    tokens: tuple[int, ...] = ()  # the buyer's token ids of the bought prefix

    def __str__(self) -> str:
        return f"{self.check}: {self.detail}"


Check = Callable[["torch.Tensor | None", Quote], Awaitable[Refusal | None]]
"""Looks at a verified delivery (the payload tensor, or None when fetched `into` the
caller's own memory) under its quote, before the buyer pays for it."""


class Miss(KvxError):
    """Nothing could be bought: the caller prefills itself. `faults` says why, per provider."""

    def __init__(self, reason: str, faults: tuple[Fault, ...] = ()) -> None:
        super().__init__(reason)
        self.faults = faults


@dataclass(frozen=True)
class Bought:
    """What a fetch delivered and what it cost."""

    tensor: torch.Tensor | None  # the payload prefix, verified; None when fetched `into`
    layout: KVLayout  # as delivered
    blocks: int
    tokens: int
    bytes: int
    price: int  # micro-credits paid, to every provider that streamed part of it
    saved_flops: float  # the prefill the buyer did not run
    seller: bytes  # node id of the provider that carried the most of it
    faults: tuple[Fault, ...]  # providers that failed on the way
    delivered: dict[bytes, int]  # bytes each provider delivered, kept and paid for (§9.7)
    seconds: float
    timings: dict[str, float]  # where the seconds went: lookup, negotiation, transfer, receipt


MAX_FETCH_BYTES = 16 << 30
"""The largest payload a client allocates unless told otherwise (spec §12.6)."""
HEDGE_S = 0.25
"""How long a buyer waits for a provider's quote before it asks the next one as well."""
HEDGE_MAX = 16
"""Providers asked for a quote at once, at most: as many as HEDGE_S apart fill 4 s."""


class PeerClient:
    """What an agent embeds to buy and sell KV caches through its host's node.

    The node (`kvx node --data-dir DIR`, or `PeerClient.embedded`) keeps the swarm's
    advertisements, the identity and the ledger; the client asks it what is advertised,
    then negotiates with each seller itself and receives the KV straight into the agent's
    memory. Use it as `async with PeerClient(DIR) as client:`; `SyncPeerClient` is the same
    for code without an event loop. A call raises AdminError at once when no node serves
    DIR, and `Miss` when nothing can be bought (the caller then prefills).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        pricing: PricePolicy | None = None,
        timeout_s: float = 30.0,
        max_bytes: int = MAX_FETCH_BYTES,
        verify: VerifyPolicy | str | None = None,
        seal: bool | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._verify = None if verify is None else VerifyPolicy.of(verify)
        self._seal = seal
        self.max_bytes = max_bytes
        self.identity = Identity.load(self.data_dir / KEY_FILE)
        self.signer = Signer(self.identity)
        self.inbox = Inbox(self.identity.node_id)
        self.pricing = pricing if pricing is not None else PricePolicy()
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context()
        self._ledger: Ledger | None = None
        self._embedded: tuple[Node, asyncio.Task[None]] | None = None

    @classmethod
    async def embedded(cls, config: NodeConfig, **kwargs: Any) -> PeerClient:
        """A client with its own node running in this event loop (no daemon needed)."""
        from ._node import Node

        node = Node(config)
        task = asyncio.ensure_future(node.run())
        admin = config.data_dir / ADMIN_SOCKET
        while not (config.data_dir / "node.json").exists():
            if task.done():
                task.result()  # surfaces why it failed to start
            await asyncio.sleep(0.02)
        assert admin.exists()
        client = cls(config.data_dir, **kwargs)
        client._embedded = (node, task)
        return client

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._embedded is not None:
            node, task = self._embedded
            node.stop()
            await task
        if self._ledger is not None:
            self._ledger.close()
        self._ctx.destroy(linger=0)

    # ---- the local node --------------------------------------------------------------

    async def _admin(self, op: str, **args: Any) -> dict:
        address = admin_socket(self.data_dir)
        sock = self._ctx.socket(zmq.REQ)
        sock.linger = 0
        try:
            sock.connect(address)
            await sock.send(request(op, args))
            if not await sock.poll(int(self.timeout_s * 1000)):
                raise AdminError(int(ErrorCode.TIMEOUT), f"no node answers in {self.data_dir}")
            return result(await sock.recv())
        finally:
            sock.close()

    @property
    def verify(self) -> VerifyPolicy:
        """What this client checks of bought KV (spec §12.2): as it was made with, else its
        node's `[policy] verify`, else the default."""
        if self._verify is None:
            try:
                text = json.loads((self.data_dir / INFO_FILE).read_text()).get("verify")
            except (OSError, ValueError):
                text = None
            self._verify = VerifyPolicy.parse(text) if text else DEFAULT_VERIFY
        return self._verify

    @property
    def seal(self) -> bool:
        """Whether this client asks for public KV's streams to be sealed (§9.6): as it was
        made with, else its node's `[policy] seal_public`. Private ones always are."""
        if self._seal is None:
            try:
                info = json.loads((self.data_dir / INFO_FILE).read_text())
            except (OSError, ValueError):
                info = {}
            self._seal = bool(info.get("seal_public", False))
        return self._seal

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.data_dir / LEDGER_FILE, self.identity.node_id)
        return self._ledger

    async def publish(
        self,
        *,
        fp: bytes,
        layout: KVLayout,
        blocks: list[bytes],
        payload: bytes,
        params: int,
        ns: bytes | None = None,
        chunk: int = DEFAULT_CHUNK_BYTES,
    ) -> bytes:
        """Store a payload in the local node and advertise it; returns its content root."""
        reply = await self._admin(
            "publish",
            fp=fp,
            ns=ns,
            layout=layout.__dict__,
            blocks=list(blocks),
            payload=payload,
            chunk=chunk,
            params=params,
        )
        return reply["root"]

    async def lookup(
        self, fp: bytes, chain: list[bytes], *, ns: bytes | None = None, limit: int = 8
    ) -> tuple[int, list[Statement]]:
        """The longest prefix of `chain` the swarm advertises, with the signed ads, best first.

        Every advertisement is verified here; the node that relayed them vouches for nothing.
        """
        matched, ads, _ = await self._lookup(fp, chain, ns=ns, limit=limit)
        return matched, ads

    async def _lookup(
        self, fp: bytes, chain: list[bytes], *, ns: bytes | None, limit: int
    ) -> tuple[int, list[Statement], set[bytes]]:
        """lookup, and the node ids of the providers that failed the node before."""
        reply = await self._admin("lookup", fp=fp, ns=ns, blocks=list(chain), limit=limit)
        matched, ads = reply["matched"], []
        for frame in reply["ads"]:
            with contextlib.suppress(RemoteProtocolError):
                st = open_envelope(frame)
                ad = st.message
                if (
                    isinstance(ad, Advertise)
                    and ad.fp == fp
                    and ad.ns == ns
                    and list(ad.blocks[:matched]) == list(chain[:matched])
                ):
                    ads.append(st)
        return (matched if ads else 0), ads, set(reply.get("failed", ()))

    # ---- buying ----------------------------------------------------------------------

    async def _ask(
        self,
        sock: zmq.asyncio.Socket,
        seller: Statement,
        message: Message,
        want: type[T],
        timeout_s: float,
    ) -> T | None:
        """Send one statement to a seller and wait for its answer to it (or None)."""
        frame = self.signer.seal(message, now_ms=_now(), to=seller.signer_id)
        await sock.send(frame)
        seq = open_envelope(frame).header.seq
        curve = curve_public_key(seller.signer)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not await sock.poll(int(left * 1000)):
                break
            st = self.inbox.receive(await sock.recv(), now_ms=_now(), peer_curve_key=curve)
            if getattr(st.message, "re", None) != seq:
                continue
            if isinstance(st.message, Error):
                code = (
                    ErrorCode(st.message.code)
                    if st.message.code in ErrorCode._value2member_map_
                    else ErrorCode.INTERNAL
                )
                raise RemoteProtocolError(code, st.message.msg)
            if isinstance(st.message, want):
                return st  # type: ignore[return-value]
        raise RemoteProtocolError(ErrorCode.TIMEOUT, "the seller did not answer")

    def _dealer(self, seller: Statement) -> zmq.asyncio.Socket:
        ad = seller.message
        assert isinstance(ad, Advertise)
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        make_curve_client(sock, self.identity, seller.signer)
        sock.connect(ad.ctl)
        return sock

    async def fetch(
        self,
        fp: bytes,
        chain: list[bytes],
        *,
        params: int,
        device: str = "cpu",
        namespace: Namespace | None = None,
        dtype: str | None = None,
        max_price: int | None = None,
        timeout_s: float | None = None,
        into: Callable[[Expected], Destination] | None = None,
        layout: KVLayout | None = None,
        check: Check | None = None,
    ) -> Bought:
        """Buy the longest advertised prefix of `chain` into a tensor on `device`, or
        `into` the destination that function makes for a quote (one copy from the socket
        into the caller's own memory; Bought.tensor is then None).

        `params` is the buyer's own model size, from which it prices its own prefill and so
        its highest bid (unless `max_price` is given); `timeout_s` bounds each wait for a
        seller, over all providers together, and each stalled stream (default: the
        client's): providers are asked in turn, the next one after HEDGE_S without an
        answer, so silent ones cost a moment each, not a timeout each. `layout` is what
        the buyer's own model implies for this fingerprint (in the dtype asked for): an
        advertisement or quote of another shape is refused before anything is allocated.
        `check` looks at a delivery that verified against its root before the final
        RECEIPT is sent (spec §12.2): a Refusal moves the purchase to a provider of another
        root, unpaid beyond the window receipts already sent, and the providers of the
        refused root are scored as liars. Raises Miss when nothing can be bought.
        """
        import torch

        started = time.monotonic()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        ns = None if namespace is None else namespace.id
        # Every provider the node knows, best first: hedging walks through silent ones in
        # a moment each, and must not miss the honest one behind a page of liars.
        matched, found, failed = await self._lookup(fp, chain, ns=ns, limit=MAX_PROVIDERS)
        timings = {"lookup": time.monotonic() - started, "negotiation": 0.0}

        # An advertisement whose delivery would pass our bound is skipped, not bought.
        def fits(ad: Statement) -> bool:
            return ad.message.layout.payload_bytes(matched) <= self.max_bytes

        ads = [ad for ad in found if fits(ad)]
        refused: set[bytes] = set()  # roots whose KV the buyer's own check refuted
        if not matched or not ads:
            await self._tell("missed", reason="nothing advertised")
            raise Miss("no provider advertises any block of this prefix within the size bound")
        faults: list[Fault] = []
        reported = [0]  # faults the node has been told of
        deals: dict[bytes, tuple[Statement, zmq.asyncio.Socket, Deal]] = {}  # by quote id
        claims: dict[bytes, Statement] = {}  # seller -> the ADVERTISE it was bought by
        paid: dict[bytes, bytes] = {}  # quote id -> the last receipt its seller was sent

        # The timeout bounds each wait for a seller, over all providers together: a
        # provider that never answers costs a hedge's delay, not the buyer's whole wait.
        deadline = [time.monotonic() + timeout]

        def left() -> float:
            return max(0.0, deadline[0] - time.monotonic())

        async def providers() -> AsyncIterator[Statement]:
            walk, listed = Walk(lambda ad: ad.signer_id), ads
            while batch := walk.take(listed):
                for ad in batch:
                    yield ad
                await self._report(faults[reported[0] :])  # so that the node ranks them last
                reported[0] = len(faults)
                if not left():
                    return
                again, found = await self.lookup(fp, chain, ns=ns, limit=MAX_PROVIDERS)
                listed = [ad for ad in found if fits(ad)] if again == matched else []

        async def quote_from(
            ad: Statement, known: zmq.asyncio.Socket | None = None
        ) -> Quoted | None:
            """One provider's quote we could take, or None (its fault recorded); `known`:
            the connection of an earlier deal with it, whose receipt went ahead on it."""
            if ad.message.root in refused and dtype is None:
                return None  # it signed KV already refuted: no second chance in a purchase
            try:
                check_layout(ad, dtype, layout)
            except RemoteProtocolError as exc:
                faults.append(Fault(ad.signer_id, exc.code, exc.detail))
                return None
            ad_layout = ad.message.layout
            tokens = matched * ad_layout.block
            bid = self.pricing.bid(params, ad_layout, tokens) if max_price is None else max_price
            request = QuoteRequest(
                fp=fp,
                blocks=tuple(chain[:matched]),
                transports=available_transports(),
                max_price=bid,
                ns=ns,
                dtype=dtype,
                seal=True if self.seal else None,
            )
            sock = known if known is not None else self._dealer(ad)
            deal = Deal()
            try:
                if namespace is not None and namespace.secret is not None:
                    await self._prove(sock, ad, namespace, left())
                quote = await self._ask(sock, ad, request, Quote, left())
                deal.advance(MessageType.QUOTE)
                q = quote.message
                assert isinstance(q, Quote)
                check_quote(ad, q, matched, dtype, layout)
                if q.root in refused:
                    raise RemoteProtocolError(ErrorCode.KV_MISMATCH, "a refuted root")
                if q.price > bid:
                    deal.advance(MessageType.REJECT)
                    reject = Reject(quote=q.quote, reason=int(ErrorCode.PRICE_TOO_HIGH))
                    await sock.send(self.signer.seal(reject, now_ms=_now(), to=ad.signer_id))
                    raise RemoteProtocolError(ErrorCode.PRICE_TOO_HIGH, f"{q.price} > {bid}")
                kx = key = None
                if q.kx is not None:  # the stream will be sealed: agree on its key now
                    ephemeral = Ephemeral()
                    kx = ephemeral.public
                    key = channel_key(ephemeral.shared(q.kx), q.quote, q.kx, kx)
            except RemoteProtocolError as exc:
                if deal.step is not Step.FAILED:
                    deal.advance(MessageType.ERROR)
                faults.append(Fault(ad.signer_id, exc.code, exc.detail))
                if known is None:  # an earlier deal's connection closes with that deal
                    sock.close()
                return None
            except asyncio.CancelledError:  # another provider answered first
                if known is None:
                    sock.close()
                raise
            return Quoted(ad, quote, sock, deal, kx, key)

        def refuted(quoted: Quoted) -> bool:
            if quoted.quote.message.root not in refused:
                return False
            quoted.deal.advance(MessageType.ERROR)
            faults.append(Fault(quoted.ad.signer_id, ErrorCode.KV_MISMATCH, "a refuted root"))
            quoted.sock.close()
            return True

        async def accept(quoted: Quoted) -> None:
            """ACCEPT a quote: from here the buyer owes on verified delivery."""
            ad, quote, sock, deal, kx, _ = quoted
            q = quote.message
            assert isinstance(q, Quote)
            frame = self.signer.seal(
                Accept(quote=q.quote, price=q.price, root=q.root, kx=kx),
                now_ms=_now(),
                to=ad.signer_id,
            )
            await sock.send(frame)
            deal.advance(MessageType.ACCEPT)
            self.ledger.record_accept(quote, open_envelope(frame), _now(), limit=0)
            deals[q.quote] = (quote, sock, deal)
            claims[ad.signer_id] = ad

        def source(quoted: Quoted, accepting: bool) -> Source:
            ad, quote, sock, deal, _, key = quoted
            q = quote.message
            assert isinstance(q, Quote)

            async def renew() -> Source | None:
                """A quote for another deal with this provider, for more of the payload
                (§9.7), on the same connection, so that the receipt for the last deal
                reaches it first; it is accepted only once there is a range for it."""
                again = await quote_from(ad, sock)
                return None if again is None else source(again, accepting=True)

            async def accept_it() -> None:
                await accept(quoted)

            return Source(
                ad.signer_id,
                q.transport,
                q.data,
                Expected.from_quote(q),
                self._transfer(q, ad.signer_id, deal),
                self._payer(q, ad.signer_id, paid),
                key=key,
                deal=q.quote,
                renew=renew,
                accept=accept_it if accepting else None,
            )

        async def take(quoted: Quoted) -> Source:
            await accept(quoted)
            return source(quoted, accepting=False)

        async def sources() -> AsyncIterator[Source]:
            """Sellers in turn, each found by hedged quotes: the best provider is asked
            first, and while no answer has come, one more every HEDGE_S (at most HEDGE_MAX
            at once); the first quote we could take is taken."""
            asking: set[asyncio.Task[Quoted | None]] = set()
            ready: list[Quoted] = []  # quotes that came while another was being used
            listed = providers()
            more = True
            try:
                while True:
                    # A quote that waited while another was used may be of a root the
                    # buyer's check has refuted since: no second chance for that root.
                    ready = [quoted for quoted in ready if not refuted(quoted)]
                    negotiating = time.monotonic()
                    while not ready and left() and (asking or more):
                        if more and len(asking) < HEDGE_MAX:
                            ad = await anext(listed, None)
                            if ad is None:
                                more = False
                            else:
                                asking.add(asyncio.ensure_future(quote_from(ad)))
                        if not asking:
                            continue
                        wait = min(HEDGE_S, left()) if more and len(asking) < HEDGE_MAX else left()
                        done, asking = await asyncio.wait(
                            asking, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                        )
                        ready += [quoted for task in done if (quoted := task.result())]
                    timings["negotiation"] += time.monotonic() - negotiating
                    if not ready:
                        return  # every provider failed, or none answered in time
                    yield await take(ready.pop(0))
                    deadline[0] = time.monotonic() + timeout  # a new wait for a seller
            finally:
                for task in asking:
                    task.cancel()
                await asyncio.gather(*asking, return_exceptions=True)
                for quoted in ready:
                    quoted.sock.close()
                await listed.aclose()

        allocated: list[torch.Tensor | None] = [None]

        def allocate(expected: Expected) -> torch.Tensor | Destination:
            if into is not None:
                return into(expected)
            allocated[:] = [torch.empty(expected.deliver, dtype=torch.uint8, device=device)]
            return allocated[0]

        async def settle(streamed: Streamed) -> None:
            await self._settle(streamed, deals[streamed.source.deal], paid)

        offers = Offers(sources())
        timings["check"] = 0.0
        # Providers streamed from at once (§9.7): those in good standing, up to the cap; one
        # that failed this node before is tried only when nobody else is left.
        width = min(MAX_STRIPES, max(1, sum(ad.signer_id not in failed for ad in ads)))
        try:
            streaming = time.monotonic()
            while True:
                # With no check to pass, a stream is paid at its END (§9.4, §12.2): its
                # seller then sees the buyer's history when asked for more of it.
                fetched = await fetch(
                    offers,
                    allocate,
                    timeout_s=timeout,
                    faults=faults,
                    width=width,
                    settle=settle if check is None else None,
                )
                # The provider that carried most stands for the purchase in what it reports.
                main = max(fetched.streams, key=lambda s: s.carried).source
                seller = main.provider
                q = deals[main.deal][0].message
                assert isinstance(q, Quote)
                if check is None:
                    break
                checking = time.monotonic()
                refusal = await check(allocated[0], q)
                timings["check"] += time.monotonic() - checking
                if refusal is None:
                    break
                refused.add(q.root)
                evidence = _evidence(claims[seller], q, fetched, refusal)
                fetched.destination.scrub(0)  # none of it may be read by anyone now
                # Every provider of this root signed it: each is a liar, none is paid more.
                for provider in fetched.providers:
                    faults.append(Fault(provider, ErrorCode.KV_MISMATCH, str(refusal)))
                await self._tell("refused", seller=seller, check=refusal.check, detail=str(refusal))
                if evidence is not None:
                    await self._tell("accuse", evidence=evidence.encode())
            timings["transfer"] = (
                time.monotonic() - streaming - timings["negotiation"] - timings["check"]
            )
            receipting = time.monotonic()
            # Each stream that ended is paid for what it carried, at its own quote's price;
            # one that broke, by the window receipts it got (§9.4, §9.7).
            for streamed in fetched.streams:
                if streamed.ended and deals[streamed.source.deal][2].step is Step.STREAMING:
                    await self._settle(streamed, deals[streamed.source.deal], paid)
            timings["receipt"] = time.monotonic() - receipting
        except FetchMiss as miss:
            await self._report(miss.faults[reported[0] :])
            await self._tell("missed", reason="every provider failed")
            raise Miss("every provider failed", miss.faults) from None
        finally:
            await offers.aclose()  # the providers not reached: no deal is opened with them
            for _, sock, deal in deals.values():
                if deal.step in (Step.ACCEPTED, Step.STREAMING):  # it failed mid-way
                    deal.advance(MessageType.ERROR)
                sock.close(linger=2000)  # the receipt must leave before the socket goes
            for frame in paid.values():  # what we owe those that streamed part of it
                with contextlib.suppress(RemoteProtocolError):
                    self.ledger.record_receipt(open_envelope(frame), _now())
        await self._report(fetched.faults[reported[0] :])
        bought = Bought(
            tensor=allocated[0],
            layout=q.layout,
            blocks=q.blocks,
            tokens=q.blocks * q.layout.block,
            bytes=q.deliver,
            price=sum(open_envelope(frame).message.price for frame in paid.values()),
            saved_flops=prefill_flops(params, q.layout, q.blocks * q.layout.block),
            seller=seller,
            faults=fetched.faults,
            delivered=fetched.delivered,
            seconds=time.monotonic() - started,
            timings=timings,
        )
        await self._tell(
            "bought",
            seller=seller,
            sellers=list(bought.delivered),
            bytes=bought.bytes,
            tokens=bought.tokens,
            price=bought.price,
            seconds=bought.seconds,
            saved_flops=bought.saved_flops,
            timings=timings,
        )
        return bought

    async def report_first_token(
        self, seconds: float, *, bought: bool, prefill_flops: float = 0.0
    ) -> None:
        """Tell the node how long the agent waited for its first token, for its
        `kvx_time_to_first_token_seconds` histogram (the hf helpers and the vLLM connector
        call this). A whole local prefill also gives its FLOPs: the node prices the
        prefill its clients bought at the rate they measured (`kvx_prefill_seconds_saved`)."""
        await self._tell(
            "first_token",
            seconds=seconds,
            source="bought" if bought else "prefill",
            flops=0.0 if bought else prefill_flops,
        )

    async def _prove(
        self, sock: zmq.asyncio.Socket, seller: Statement, namespace: Namespace, timeout: float
    ) -> None:
        """Open a session with the seller and prove membership of a private namespace (§7.6)."""
        info = json.loads((self.data_dir / INFO_FILE).read_text())  # we speak for our node
        hello = Hello(
            ctl=info["ctl"],
            data=tuple(DataAddress(**d) for d in info["data"]),
            inc=info["incarnation"],
        )
        peers = (await self._ask(sock, seller, hello, Peers, timeout)).message
        assert isinstance(peers, Peers)
        if peers.challenge is None:
            raise RemoteProtocolError(ErrorCode.NOT_A_MEMBER, "the seller gave no challenge")
        assert namespace.id is not None
        mac = namespace.proof(self.identity.node_id, seller.signer_id, peers.challenge)
        proof = Membership(
            challenge=peers.challenge, proofs=(NamespaceProof(ns=namespace.id, mac=mac),)
        )
        await sock.send(self.signer.seal(proof, now_ms=_now(), to=seller.signer_id))

    async def _settle(
        self,
        streamed: Streamed,
        deal: tuple[Statement, zmq.asyncio.Socket, Deal],
        paid: dict[bytes, bytes],
    ) -> None:
        """The final RECEIPT of a stream that ended, on the control channel (§10.6)."""
        quote, sock, steps = deal
        q = quote.message
        assert isinstance(q, Quote)
        pay = self._payer(q, streamed.source.provider, paid)
        await sock.send(pay(streamed.carried))
        steps.advance(MessageType.RECEIPT)

    def _payer(self, quote: Quote, seller: bytes, paid: dict[bytes, bytes]):
        """Seals the receipts that pay a seller: each window (§9.4), and at the end what
        its stream carried; `paid` keeps the last one of each deal."""
        expected = Expected.from_quote(quote)

        def pay(size: int) -> bytes:
            frame = self.signer.seal(
                Receipt(
                    quote=quote.quote,
                    seller=seller,
                    root=quote.root,
                    bytes=size,
                    price=expected.paid_price(size),
                ),
                now_ms=_now(),
                to=seller,
            )
            paid[quote.quote] = frame
            return frame

        return pay

    def _transfer(self, quote: Quote, seller: bytes, deal: Deal):
        """Seals the TRANSFER that opens the deal's stream of chunks first … last, and
        those that ask it to end sooner (§9.7)."""

        def make(first: int, last: int | None) -> bytes:
            if deal.step is Step.ACCEPTED:  # asking a stream to end sooner is the same step
                deal.advance(MessageType.TRANSFER)
            return self.signer.seal(
                Transfer(quote=quote.quote, token=quote.token, first=first, last=last),
                now_ms=_now(),
                to=seller,
            )

        return make

    async def _report(self, faults: tuple[Fault, ...] | list[Fault]) -> None:
        """Tell our node what each provider did wrong, so that it scores them."""
        for fault in faults:
            event = blame(fault.code)
            if event is not None:
                await self._tell("report", peer=fault.provider, event=event.name)

    async def _tell(self, op: str, **args: Any) -> None:
        """Inform the node; a purchase already made stands even if the node is gone."""
        with contextlib.suppress(AdminError):
            await self._admin(op, **args)


class Quoted(NamedTuple):
    """A quote a provider gave that the buyer could take, with its connection."""

    ad: Statement
    quote: Statement
    sock: zmq.asyncio.Socket
    deal: Deal
    kx: bytes | None  # our half of the channel key, to go in the ACCEPT (§9.6)
    key: bytes | None  # the deal's channel key, when the seller seals the stream


def _evidence(
    claim: Statement, quote: Quote, fetched: Fetched, refusal: Refusal
) -> Evidence | None:
    """The proof of a layer-0 lie that anyone with the weights can check (§8.19), when
    the buyer holds all it needs: a public advertisement that signed this very root, and
    every byte of the chunks holding the lying block's layer 0."""
    ad = claim.message
    assert isinstance(ad, Advertise)
    if refusal.position is None or ad.ns is not None or ad.root != quote.root:
        return None
    layout, chunk = ad.layout, ad.chunk
    covering = covering_chunks(layout, chunk, refusal.position)
    if min(covering.stop * chunk, ad.size) > fetched.bytes:
        return None  # part of a chunk lies past what was delivered: not ours to show
    return Evidence(
        claim=claim.frame,
        tokens=refusal.tokens[: (refusal.position // layout.block + 1) * layout.block],
        position=refusal.position,
        hashes=fetched.hashes,
        chunks=tuple(
            (i, fetched.destination.read(i * chunk, min((i + 1) * chunk, ad.size)))
            for i in covering
        ),
    )


def _now() -> int:
    return time.time_ns() // 1_000_000


class SyncPeerClient:
    """The same client for code without an event loop: each call runs on a private loop."""

    def __init__(self, data_dir: str | Path, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = PeerClient(data_dir, **kwargs)

    def __enter__(self) -> SyncPeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def call(self, helper: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run an async helper whose first argument is a PeerClient (those of
        kvx.integrations.hf) with this client, on its loop."""
        return self._run(helper(self._client, *args, **kwargs))

    def publish(self, **kwargs: Any) -> bytes:
        return self._run(self._client.publish(**kwargs))

    def lookup(self, fp: bytes, chain: list[bytes], **kwargs: Any) -> tuple[int, list[Statement]]:
        return self._run(self._client.lookup(fp, chain, **kwargs))

    def fetch(self, fp: bytes, chain: list[bytes], **kwargs: Any) -> Bought:
        return self._run(self._client.fetch(fp, chain, **kwargs))

    def report_first_token(self, seconds: float, **kwargs: Any) -> None:
        self._run(self._client.report_first_token(seconds, **kwargs))

    @property
    def verify(self) -> VerifyPolicy:
        return self._client.verify

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.close()
