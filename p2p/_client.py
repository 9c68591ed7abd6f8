"""The peer client an agent embeds: look up, buy and publish KV caches.

It asks its node (over the node's admin socket) what the swarm advertises, then deals
with each seller itself under the node's identity — QUOTE_REQUEST, QUOTE, ACCEPT, the
data channel, RECEIPT — so that KV bytes travel from the seller straight into the
agent's own tensor. Without a node to talk to, it starts one inside its event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import zmq
import zmq.asyncio

from kvx.protocol import (
    DEFAULT_CHUNK_BYTES,
    Advertise,
    DataAddress,
    Error,
    ErrorCode,
    Hello,
    KVLayout,
    KvxError,
    Membership,
    Message,
    Namespace,
    NamespaceProof,
    Peers,
    Quote,
    Receipt,
    RemoteProtocolError,
)
from kvx.transport import (
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
from ._buying import MAX_PROVIDERS, blame
from ._config import ADMIN_SOCKET, INFO_FILE, KEY_FILE, LEDGER_FILE, NodeConfig
from ._pricing import PricePolicy, prefill_flops
from ._purchase import (
    Action,
    Ask,
    Close,
    Exhausted,
    Lookup,
    Purchase,
    Quoted,
    Ready,
    Renewed,
    Report,
    Send,
    Want,
)
from ._store import PublishRequest

if TYPE_CHECKING:
    import torch

    from ._node import Node

T = TypeVar("T")
P = ParamSpec("P")


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
    # `bytes` is a field here: the type is named builtins.bytes below it.
    seller: builtins.bytes  # node id of the provider that carried the most of it
    faults: tuple[Fault, ...]  # providers that failed on the way
    delivered: dict[builtins.bytes, int]  # bytes each provider delivered, kept and paid for
    seconds: float
    timings: dict[str, float]  # where the seconds went: lookup, negotiation, transfer, receipt


MAX_FETCH_BYTES = 16 << 30
"""The largest payload a client allocates unless told otherwise (spec §12.6)."""


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

    async def _admin(self, op: str, **args: Any) -> dict[str, Any]:
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
        request = PublishRequest(fp, layout, tuple(blocks), payload, params, ns, chunk)
        root: bytes = (await self._admin("publish", **request.to_admin()))["root"]
        return root

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
        frame: bytes,
        want: type[Message],
        timeout_s: float,
    ) -> Statement:
        """Send one sealed statement to a seller and wait for its answer to it, a `want`."""
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
                return st
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

        def bid(offered: KVLayout, tokens: int) -> int:
            return self.pricing.bid(params, offered, tokens) if max_price is None else max_price

        want = Want(
            fp=fp,
            chain=tuple(chain),
            ns=ns,
            dtype=dtype,
            layout=layout,
            max_bytes=self.max_bytes,
            bid=bid,
            timeout_s=timeout,
            transports=available_transports(),
            seal=self.seal,
        )
        purchase = Purchase(want, self.signer, time.time())
        driver = _Driver(self, purchase, namespace)
        # Every provider the node knows, best first: hedging walks through silent ones in
        # a moment each, and must not miss the honest one behind a page of liars.
        nothing = await driver.perform(purchase.listed(*await driver.lookup(), time.time()))
        timings = {"lookup": time.monotonic() - started, "check": 0.0}
        if isinstance(nothing, Exhausted):
            await self._tell("missed", reason="nothing advertised")
            raise Miss(nothing.reason)
        allocated: list[torch.Tensor | None] = [None]

        def allocate(expected: Expected) -> torch.Tensor | Destination:
            if into is not None:
                return into(expected)
            tensor = torch.empty(expected.deliver, dtype=torch.uint8, device=device)
            allocated[:] = [tensor]
            return tensor

        offers = Offers(driver.sources())
        try:
            streaming = time.monotonic()
            while True:
                # With no check to pass, a stream is paid at its END (§9.4, §12.2): its
                # seller then sees the buyer's history when asked for more of it.
                fetched = await fetch(
                    offers,
                    allocate,
                    timeout_s=timeout,
                    faults=purchase.faults,
                    width=purchase.width,
                    settle=driver.settle if check is None else None,
                )
                # The provider that carried most stands for the purchase in what it reports.
                main = max(fetched.streams, key=lambda s: s.carried).source
                seller = main.provider
                q = purchase.deals[main.deal].terms
                if check is None:
                    break
                checking = time.monotonic()
                refusal = await check(allocated[0], q)
                timings["check"] += time.monotonic() - checking
                if refusal is None:
                    break
                evidence = _evidence(purchase.claims[seller], q, fetched, refusal)
                fetched.destination.scrub(0)  # none of it may be read by anyone now
                # Every provider of this root signed it: each is a liar, none is paid more.
                purchase.refute(q.root, fetched.providers, str(refusal))
                await self._tell("refused", seller=seller, check=refusal.check, detail=str(refusal))
                if evidence is not None:
                    await self._tell("accuse", evidence=evidence.encode())
            timings["negotiation"] = driver.negotiating
            timings["transfer"] = (
                time.monotonic() - streaming - driver.negotiating - timings["check"]
            )
            receipting = time.monotonic()
            # Each stream that ended is paid for what it carried, at its own quote's price;
            # one that broke, by the window receipts it got (§9.4, §9.7).
            for streamed in fetched.streams:
                if streamed.ended:
                    await driver.settle(streamed)
            timings["receipt"] = time.monotonic() - receipting
        except FetchMiss as miss:
            await driver.report()
            await self._tell("missed", reason="every provider failed")
            raise Miss("every provider failed", miss.faults) from None
        finally:
            await offers.aclose()  # the providers not reached: no deal is opened with them
            await driver.close()
        await driver.report()
        bought = Bought(
            tensor=allocated[0],
            layout=q.layout,
            blocks=q.blocks,
            tokens=q.blocks * q.layout.block,
            bytes=q.deliver,
            price=sum(_price(frame) for frame in purchase.paid.values()),
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
        frame = self.signer.seal(hello, now_ms=_now(), to=seller.signer_id)
        peers = (await self._ask(sock, seller, frame, Peers, timeout)).message
        assert isinstance(peers, Peers)
        if peers.challenge is None:
            raise RemoteProtocolError(ErrorCode.NOT_A_MEMBER, "the seller gave no challenge")
        assert namespace.id is not None
        mac = namespace.proof(self.identity.node_id, seller.signer_id, peers.challenge)
        proof = Membership(
            challenge=peers.challenge, proofs=(NamespaceProof(ns=namespace.id, mac=mac),)
        )
        await sock.send(self.signer.seal(proof, now_ms=_now(), to=seller.signer_id))

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


class _Driver:
    """Drives one Purchase over ZeroMQ: a connection to each provider asked, its asks
    and the node's lookups as tasks whose results go back in, with the time."""

    def __init__(self, client: PeerClient, purchase: Purchase, namespace: Namespace | None):
        self.client, self.purchase, self.namespace = client, purchase, namespace
        self.socks: dict[bytes, zmq.asyncio.Socket] = {}
        self.tasks: set[asyncio.Task[Callable[[float], list[Action]]]] = set()
        self.negotiating = 0.0  # seconds the stream layer waited for a provider

    async def perform(self, actions: list[Action]) -> Ready | Renewed | Exhausted | None:
        """Carry out what the purchase asked for; returns its outcome, if it gave one."""
        outcome = None
        for action in actions:
            match action:
                case Ask():
                    self.tasks.add(asyncio.ensure_future(self._ask(action)))
                case Send():
                    await self.socks[action.provider].send(action.frame)
                case Close():
                    if (sock := self.socks.pop(action.provider, None)) is not None:
                        sock.close()
                case Lookup():
                    self.tasks.add(asyncio.ensure_future(self._relist()))
                case Report():
                    await self.client._report(action.faults)
                case Ready() | Renewed() | Exhausted():
                    outcome = action
        return outcome

    async def sources(self) -> AsyncIterator[Source]:
        """The providers the stream layer asks for, each found by hedged quotes."""
        purchase = self.purchase
        while True:
            started = time.monotonic()
            outcome = await self.perform(purchase.wanted(time.time()))
            while outcome is None:
                assert self.tasks, "a purchase waits on nothing"
                done, self.tasks = await asyncio.wait(
                    self.tasks,
                    timeout=purchase.wait(time.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                now = time.time()
                actions = [a for task in done for a in task.result()(now)]
                outcome = await self.perform(actions + purchase.tick(now))
            self.negotiating += time.monotonic() - started
            if isinstance(outcome, Exhausted):
                return
            await self.accept(outcome.quoted)
            yield self.source(outcome.quoted, accepting=False)

    def source(self, quoted: Quoted, accepting: bool) -> Source:
        """What the stream layer needs of a deal; `accepting`: a renewal, accepted only
        once it gets a range to stream (§9.7)."""
        q, purchase = quoted.terms, self.purchase
        return Source(
            quoted.provider,
            q.transport,
            q.data,
            Expected.from_quote(q),
            lambda first, last: purchase.transfer(q.quote, first, last, time.time()),
            lambda size: purchase.receipt(q.quote, size, time.time()),
            key=quoted.key,
            deal=q.quote,
            renew=functools.partial(self.renew, quoted.provider),
            accept=functools.partial(self.accept, quoted) if accepting else None,
        )

    async def accept(self, quoted: Quoted) -> None:
        frame = self.purchase.accept(quoted, time.time())
        await self.socks[quoted.provider].send(frame)
        self.client.ledger.record_accept(quoted.quote, open_envelope(frame), _now(), limit=0)

    async def renew(self, provider: bytes) -> Source | None:
        """Another deal with a provider whose stream ended, asked on the same connection,
        so that the receipt for the last deal reaches it first."""
        ask = self.purchase.renew(provider, time.time())
        if ask is None:
            return None
        answer = await self._ask(ask)
        outcome = await self.perform(answer(time.time()))
        return self.source(outcome.quoted, accepting=True) if isinstance(outcome, Renewed) else None

    async def settle(self, streamed: Streamed) -> None:
        """The final RECEIPT of a stream that ended (§10.6)."""
        send = self.purchase.settle(streamed.source.deal, streamed.carried, time.time())
        if send is not None:
            await self.perform([send])

    async def lookup(self) -> tuple[int, list[Statement], set[bytes]]:
        want = self.purchase.want
        return await self.client._lookup(want.fp, list(want.chain), ns=want.ns, limit=MAX_PROVIDERS)

    async def report(self) -> None:
        if (report := self.purchase.unreported()) is not None:
            await self.client._report(report.faults)

    async def close(self) -> None:
        """Nothing is asked any more; every deal is booked, and its connection closes once
        its last receipt has left."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        receipts = self.purchase.close()
        for sock in self.socks.values():
            sock.close(linger=2000)
        for frame in receipts:  # what we owe those that streamed part of it
            with contextlib.suppress(RemoteProtocolError):
                self.client.ledger.record_receipt(open_envelope(frame), _now())

    async def _relist(self) -> Callable[[float], list[Action]]:
        return functools.partial(self.purchase.listed, *await self.lookup())

    async def _ask(self, ask: Ask) -> Callable[[float], list[Action]]:
        """One provider's answer to an Ask, to be fed back with the time it is read."""
        sock = self.socks.get(ask.provider)
        if sock is None:
            sock = self.socks[ask.provider] = self.client._dealer(ask.ad)
        try:
            if self.namespace is not None and self.namespace.secret is not None:
                await self.client._prove(sock, ask.ad, self.namespace, ask.timeout_s)
            quote = await self.client._ask(sock, ask.ad, ask.frame, Quote, ask.timeout_s)
        except RemoteProtocolError as exc:
            return functools.partial(self.purchase.failed, ask.provider, exc.code, exc.detail)
        return functools.partial(self.purchase.answered, ask.provider, quote)


def _price(receipt: bytes) -> int:
    """What a sealed RECEIPT pays."""
    message = open_envelope(receipt).message
    assert isinstance(message, Receipt)
    return message.price


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
    if min(covering.stop * chunk, ad.size) > fetched.size:
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


def _blocking(
    method: Callable[Concatenate[PeerClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SyncPeerClient, P], T]:
    """The blocking twin of a PeerClient coroutine method, with its very signature."""

    def run(self: SyncPeerClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self._client, *args, **kwargs))

    functools.update_wrapper(run, method)  # its name, docstring and signature
    return run


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

    def call(
        self,
        helper: Callable[Concatenate[PeerClient, P], Coroutine[Any, Any, T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run an async helper whose first argument is a PeerClient (those of
        kvx.integrations.hf) with this client, on its loop."""
        return self._run(helper(self._client, *args, **kwargs))

    publish = _blocking(PeerClient.publish)
    lookup = _blocking(PeerClient.lookup)
    fetch = _blocking(PeerClient.fetch)
    report_first_token = _blocking(PeerClient.report_first_token)

    @property
    def verify(self) -> VerifyPolicy:
        return self._client.verify

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.close()
