"""Negotiation: the rules against a seller core in memory (tests/pair.py), purchases
against a real seller node."""

import time

import blake3
import pytest
from pair import Pair
from swarm import NodeProcess, TestPeer, eventually

from kvx.p2p import Miss, PublishRequest, SyncPeerClient
from kvx.protocol import (
    Accept,
    Error,
    ErrorCode,
    KVLayout,
    Quote,
    QuoteRequest,
    Reject,
)
from kvx.trust import Identity, Signer

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32
CHAIN = [blake3.blake3(f"doc/{i}".encode()).digest() for i in range(3)]
PARAMS = 10**9  # what the seller says its model has: prices are then well above 1


def now() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def seller(tmp_path):
    node = NodeProcess(tmp_path / "seller").start()
    node.wait_ready()
    node.call(
        "publish",
        fp=FP,
        layout=LAYOUT.__dict__,
        blocks=CHAIN,
        chunk=1 << 16,
        payload=bytes(LAYOUT.payload_bytes(3)),
        params=PARAMS,
    )
    yield node
    node.stop()


@pytest.fixture
def market():
    """A seller core holding the payload, and a buyer it has never met, in memory."""
    with Pair() as pair:
        pair.publish(
            PublishRequest(FP, LAYOUT, tuple(CHAIN), bytes(LAYOUT.payload_bytes(3)), PARAMS)
        )
        yield pair, pair.stranger()


def request(max_price: int = 10**12, **kw) -> QuoteRequest:
    return QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("tcp",), max_price=max_price, **kw)


def refused(market, message, code: ErrorCode) -> None:
    pair, buyer = market
    answer = pair.ask(buyer, message)
    assert isinstance(answer, Error) and answer.code == code, answer


def test_counter_offers_down_to_the_floor_and_no_further(market):
    pair, buyer = market
    quote = pair.ask(buyer, request())
    assert isinstance(quote, Quote) and quote.blocks == 3 and quote.price > 2
    refused(market, Reject(quote=quote.quote, reason=0, counter=1), ErrorCode.PRICE_TOO_HIGH)
    quote = pair.ask(buyer, request())
    floor = -(-quote.price // 2)  # the default floor is half the ask
    countered = pair.ask(buyer, Reject(quote=quote.quote, reason=0, counter=floor))
    assert isinstance(countered, Quote) and countered.price == floor
    assert countered.quote != quote.quote and countered.root == quote.root
    # A counter-offer bids the price down, never up (§10.1).
    refused(
        market, Reject(quote=countered.quote, reason=0, counter=floor + 1), ErrorCode.INVALID_FIELD
    )


def test_at_most_three_counter_offers(market):
    pair, buyer = market
    quote = pair.ask(buyer, request())
    for _ in range(3):
        quote = pair.ask(buyer, Reject(quote=quote.quote, reason=0, counter=quote.price))
        assert isinstance(quote, Quote)
    refused(
        market, Reject(quote=quote.quote, reason=0, counter=quote.price), ErrorCode.PRICE_TOO_HIGH
    )


def test_a_bid_below_the_floor_is_refused_before_any_quote(market):
    refused(market, request(max_price=1), ErrorCode.PRICE_TOO_HIGH)


def test_a_quote_never_exceeds_the_bid(market):
    pair, buyer = market
    ask_price = pair.ask(buyer, request()).price
    lower = pair.ask(buyer, request(max_price=ask_price - 1))
    assert isinstance(lower, Quote) and lower.price == ask_price - 1


def test_a_conversion_the_seller_cannot_make_is_refused(market):
    refused(market, request(dtype="float8_e4m3fn"), ErrorCode.UNSUPPORTED_CONVERSION)


def test_a_conversion_it_can_make_is_named_in_the_quote(market):
    pair, buyer = market
    quote = pair.ask(buyer, request(dtype="float32"))
    assert isinstance(quote, Quote) and quote.layout.dtype == "float32"
    assert quote.deliver == 2 * LAYOUT.payload_bytes(3)  # twice the bytes of float16


def accept(q: Quote, **over) -> Accept:
    return Accept(**{"quote": q.quote, "price": q.price, "root": q.root, **over})


def test_every_illegal_step_of_a_quote_has_its_spec_code(market):
    """Spec §10.4's table."""
    pair, buyer = market
    refused(market, accept(pair.ask(buyer, request()), quote=b"\x00" * 16), ErrorCode.UNKNOWN_QUOTE)
    refused(market, Reject(quote=b"\x00" * 16, reason=0), ErrorCode.UNKNOWN_QUOTE)
    # An ACCEPT whose terms differ names no quote that was issued.
    quote = pair.ask(buyer, request())
    refused(market, accept(quote, price=quote.price - 1), ErrorCode.UNKNOWN_QUOTE)
    # A quote made to another buyer is not held for this one.
    refused((pair, pair.stranger()), accept(quote), ErrorCode.UNKNOWN_QUOTE)
    # ACCEPTED: neither a second ACCEPT nor a REJECT.
    assert pair.roundtrip(buyer, accept(quote)) == []
    refused(market, accept(quote), ErrorCode.UNEXPECTED_MESSAGE)
    refused(market, Reject(quote=quote.quote, reason=0), ErrorCode.UNEXPECTED_MESSAGE)
    # REJECTED: neither an ACCEPT nor another REJECT.
    quote = pair.ask(buyer, request())
    assert pair.roundtrip(buyer, Reject(quote=quote.quote, reason=0)) == []
    refused(market, accept(quote), ErrorCode.UNEXPECTED_MESSAGE)
    refused(market, Reject(quote=quote.quote, reason=0, counter=1), ErrorCode.UNEXPECTED_MESSAGE)


def test_no_common_transport(market):
    message = QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("rdma-x",), max_price=10**12)
    refused(market, message, ErrorCode.NO_COMMON_TRANSPORT)


def test_the_sync_client_buys_and_reports_a_price_too_high(seller, tmp_path):
    agent_node = NodeProcess(tmp_path / "agent", [seller.dir / "node.json"]).start()
    agent_node.wait_ready()
    client = SyncPeerClient(agent_node.dir)
    try:
        eventually(lambda: client.lookup(FP, CHAIN)[0] == 3)
        bought = client.fetch(FP, CHAIN, params=PARAMS)
        assert bought.tensor.numel() == LAYOUT.payload_bytes(3) and bought.blocks == 3
        with pytest.raises(Miss) as miss:
            client.fetch(FP, CHAIN, params=PARAMS, max_price=1)
        assert [f.code for f in miss.value.faults] == [ErrorCode.PRICE_TOO_HIGH]
    finally:
        client.close()
        agent_node.stop()


def test_a_seller_serving_ucx_delivers_over_ucx(tmp_path):
    pytest.importorskip("ucxx", reason="ucxx is not installed (extra 'ucx')")
    seller = NodeProcess(tmp_path / "ucx-seller", ucx=True).start()
    seller.wait_ready()
    seller.call(
        "publish",
        fp=FP,
        layout=LAYOUT.__dict__,
        blocks=CHAIN,
        chunk=1 << 16,
        payload=bytes(range(256)) * (LAYOUT.payload_bytes(3) // 256),
        params=PARAMS,
    )
    assert [d["t"] for d in seller.info["data"]] == ["ucx", "tcp"]
    peer = TestPeer(seller, Identity.generate())
    signer = Signer(peer.identity)
    both = QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("ucx", "tcp"), max_price=10**12)
    peer.send(signer.seal(both, now_ms=now(), to=peer.node_id))
    quote = peer.recv().message
    peer.close()
    assert isinstance(quote, Quote) and quote.transport == "ucx"
    agent = NodeProcess(tmp_path / "agent", [seller.dir / "node.json"]).start()
    agent.wait_ready()
    client = SyncPeerClient(agent.dir)
    try:
        eventually(lambda: client.lookup(FP, CHAIN)[0] == 3)
        bought = client.fetch(FP, CHAIN, params=PARAMS)
        assert bytes(bought.tensor.numpy()) == bytes(range(256)) * (LAYOUT.payload_bytes(3) // 256)
    finally:
        client.close()
        agent.stop()
        seller.stop()


def test_a_converted_purchase_delivers_the_converted_bytes(seller, tmp_path):
    import torch

    agent_node = NodeProcess(tmp_path / "agent", [seller.dir / "node.json"]).start()
    agent_node.wait_ready()
    client = SyncPeerClient(agent_node.dir)
    try:
        eventually(lambda: client.lookup(FP, CHAIN)[0] == 3)
        bought = client.fetch(FP, CHAIN, params=PARAMS, dtype="float32")
        stored = torch.zeros(LAYOUT.payload_bytes(3) // 2, dtype=torch.float16)  # the fixture
        assert bought.layout.dtype == "float32"
        assert torch.equal(bought.tensor.view(torch.float32), stored.to(torch.float32))
    finally:
        client.close()
        agent_node.stop()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stored": 4}, "stored"),
        ({"chunk": 1 << 17}, "chunk"),
        ({"root": b"\x09" * 32}, "root"),
        ({"blocks": 2}, "blocks"),
        ({"data": "127.0.0.1:9"}, "data"),
        (
            {"layout": KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=16, block=16)},
            "layout",
        ),
    ],
)
def test_a_quote_unlike_its_sellers_advertisement_is_refused_before_allocation(change, field):
    import dataclasses

    from kvx.p2p._buying import check_quote
    from kvx.protocol import Advertise, DataAddress, Header, RemoteProtocolError
    from kvx.trust import open_envelope, seal

    seller = Identity.generate()
    ad = Advertise(
        fp=FP, layout=LAYOUT, blocks=tuple(CHAIN), root=b"\x07" * 32, chunk=1 << 16, price=1,
        ctl="tcp://127.0.0.1:1", data=(DataAddress("tcp", "127.0.0.1:2"),),
    )  # fmt: skip
    st = open_envelope(seal(seller, ad, Header(iat=now(), exp=now() + 60_000, seq=1)))
    honest = Quote(
        re=1, quote=b"\x01" * 16, blocks=3, stored=3, layout=LAYOUT, root=b"\x07" * 32,
        chunk=1 << 16, price=5, transport="tcp", data="127.0.0.1:2", token=bytes(32),
    )  # fmt: skip
    check_quote(st, honest, 3, None)
    with pytest.raises(RemoteProtocolError, match=field) as err:
        check_quote(st, dataclasses.replace(honest, **change), 3, None)
    assert err.value.code == ErrorCode.ROOT_MISMATCH
    # A conversion the buyer asked for changes the dtype and the root, and nothing else.
    f32 = dataclasses.replace(LAYOUT, dtype="float32")
    check_quote(st, dataclasses.replace(honest, layout=f32, root=b"\x08" * 32), 3, "float32")


def test_a_private_namespaces_quote_in_clear_is_refused_before_allocation():
    import dataclasses

    from kvx.p2p._buying import check_quote
    from kvx.protocol import Advertise, DataAddress, Header, RemoteProtocolError
    from kvx.trust import open_envelope, seal

    ad = Advertise(
        fp=FP, layout=LAYOUT, blocks=tuple(CHAIN), root=b"\x07" * 32, chunk=1 << 16, price=1,
        ctl="tcp://127.0.0.1:1", data=(DataAddress("tcp", "127.0.0.1:2"),), ns=b"\x0a" * 32,
    )  # fmt: skip
    st = open_envelope(seal(Identity.generate(), ad, Header(iat=now(), exp=now() + 60_000, seq=1)))
    sealed = Quote(
        re=1, quote=b"\x01" * 16, blocks=3, stored=3, layout=LAYOUT, root=b"\x07" * 32,
        chunk=1 << 16, price=5, transport="tcp", data="127.0.0.1:2", token=bytes(32),
        kx=b"\x09" * 32,
    )  # fmt: skip
    check_quote(st, sealed, 3, None)
    with pytest.raises(RemoteProtocolError, match="kx") as err:
        check_quote(st, dataclasses.replace(sealed, kx=None), 3, None)  # §9.6: never in clear
    assert err.value.code == ErrorCode.ROOT_MISMATCH
