"""A deal's life (spec §10.7), on the seller's market with a real store and ledger and a
clock the test moves: what no live node can show without waiting out a token's life."""

import secrets

import blake3
import pytest

from kvx.p2p import PublishRequest
from kvx.p2p._market import QUOTE_TTL_MS, Authorize, Market
from kvx.p2p._pricing import PricePolicy
from kvx.p2p._store import LocalStore
from kvx.protocol import (
    Accept,
    ErrorCode,
    KVLayout,
    Quote,
    QuoteRequest,
    Receipt,
    RemoteProtocolError,
    Transfer,
)
from kvx.transport import Sessions
from kvx.trust import Identity, Ledger, Memberships, Policy, Signer, open_envelope

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\x0f" * 32
CHAIN = tuple(blake3.blake3(f"doc/{i}".encode()).digest() for i in range(3))
SELLER, BUYER = Identity.generate(), Identity.generate()


class Frozen:
    """The time the test sets, in ms, which it passes to the market with each call."""

    def __init__(self, ms: int) -> None:
        self.ms = ms


@pytest.fixture
def books(tmp_path):
    clock = Frozen(1_800_000_000_000)
    # No memory tier: a deal's payload is read from disk, off the node's loop.
    store = LocalStore(tmp_path / "store", memory_bytes=1, disk_bytes=1 << 20)
    store.put(PublishRequest(FP, LAYOUT, CHAIN, bytes(6144), params=10**9))
    ledger = Ledger(tmp_path / "ledger.db", SELLER.node_id)

    def market() -> Market:
        return Market(
            signer=Signer(SELLER),
            store=store,
            ledger=ledger,
            sessions=Sessions(),
            policy=Policy(),
            memberships=Memberships(SELLER.node_id, Policy()),
            pricing=PricePolicy(),
            data={"tcp": "127.0.0.1:9"},
            tokens=secrets.token_bytes,
            now_ms=clock.ms,
        )

    yield market, ledger, clock
    ledger.close()
    store.close()


def deal(market: Market, clock: Frozen) -> Authorize:
    """A deal recorded: what the core asks its driver to load and serve."""
    buyer = Signer(BUYER)
    ask = QuoteRequest(fp=FP, blocks=CHAIN, transports=("tcp",), max_price=10**12)
    request = open_envelope(buyer.seal(ask, now_ms=clock.ms, to=SELLER.node_id))
    q = open_envelope(market.quote_request(request, clock.ms)).message
    accept = Accept(quote=q.quote, price=q.price, root=q.root)
    return market.accept(
        open_envelope(buyer.seal(accept, now_ms=clock.ms, to=SELLER.node_id)), clock.ms
    )


def accepted(market: Market, clock: Frozen) -> Quote:
    made = deal(market, clock)
    _, data, hashes = market.load(made)  # what the node does off its loop
    market.serve(made, data, hashes)
    return made.quote


def test_a_deal_no_stream_opened_expires_with_its_token(books):
    make, ledger, clock = books
    market = make()
    q = accepted(market, clock)
    assert ledger.exposure(BUYER.node_id) == q.price > 0
    clock.ms += QUOTE_TTL_MS + 60_000  # the token's last moment: the deal still lives
    market.expire(clock.ms)
    assert ledger.exposure(BUYER.node_id) == q.price
    clock.ms += 1
    market.expire(clock.ms)
    assert ledger.exposure(BUYER.node_id) == 0
    assert [e.ended for e in ledger.audit()] == ["no stream opened it in time"]
    assert ledger.unpaid_bytes(0, buyer=BUYER.node_id) == 0  # nothing was sent


def test_a_final_receipt_that_overtakes_its_streams_end_is_held_until_the_end_is_booked(books):
    """The two channels are not ordered against each other: a buyer reads END and pays on
    the control channel at once, and its RECEIPT may reach the seller's loop before the
    data port has booked the stream's end. Refused then, it was lost (the fresh-clone CI
    once found a seller paid a window short); it is held, and taken with the end."""
    make, ledger, clock = books
    market = make()
    q = accepted(market, clock)
    buyer, impostor = Signer(BUYER), Signer(Identity.generate())

    def receipt(by: Signer = buyer):
        paid = Receipt(
            quote=q.quote, seller=SELLER.node_id, root=q.root, bytes=q.deliver, price=q.price
        )
        return open_envelope(by.seal(paid, now_ms=clock.ms, to=SELLER.node_id))

    with pytest.raises(RemoteProtocolError) as never:  # no stream was opened: refused
        market.receipt(receipt(), clock.ms)
    assert never.value.code == ErrorCode.UNKNOWN_TRANSFER
    transfer = Transfer(quote=q.quote, token=q.token, first=0)
    offer = market.sessions.claim(transfer, BUYER.public_key, clock.ms)
    assert market.receipt(receipt(), clock.ms) is None  # streaming: held
    with pytest.raises(RemoteProtocolError) as other:  # only the buyer's own is held
        market.receipt(receipt(impostor), clock.ms)
    assert other.value.code == ErrorCode.UNKNOWN_TRANSFER
    assert ledger.balances() == {}
    held, paid = market.finished(offer, q.deliver, True, clock.ms)
    assert open_envelope(held.frame).signer == BUYER.public_key
    assert paid.credits == q.price and ledger.balances() == {BUYER.node_id: q.price}
    with pytest.raises(RemoteProtocolError) as again:  # booked: the ledger's rules apply
        market.receipt(receipt(), clock.ms)
    assert again.value.code == ErrorCode.REPLAYED


def test_a_seller_that_restarts_ends_the_deals_it_left_open(books):
    make, ledger, clock = books
    q = accepted(make(), clock)
    assert ledger.exposure(BUYER.node_id) == q.price
    make()  # the process that could have streamed it is gone
    assert ledger.exposure(BUYER.node_id) == 0
    assert [e.ended for e in ledger.audit()] == ["the seller restarted"]
    # What it may have streamed unpaid still counts against the buyer for the hour.
    assert ledger.unpaid_bytes(0, buyer=BUYER.node_id) == q.deliver


def test_deals_of_one_payload_share_its_bytes_while_they_wait_for_their_streams(books):
    """A seller holds one copy of a payload however many buyers accepted it at once: the
    second deal's load reads nothing from disk."""
    make, _, clock = books
    market = make()
    deals = [deal(market, clock) for _ in range(2)]
    first = market.load(deals[0])
    market.serve(deals[0], first[1], first[2])
    payload, data, hashes = market.load(deals[1])
    assert payload is None  # nothing was read for it
    assert data.obj is first[1] and hashes == first[2]


def test_a_transfer_waiting_for_its_accept_is_refused_as_soon_as_the_deal_is_off():
    """A TRANSFER may overtake its ACCEPT, so the data port waits for the token; a deal
    called off meanwhile (rejected, expired, a payload that failed its root) refuses the
    waiting TRANSFER then, not when the wait runs out."""
    import threading

    from kvx.protocol import ErrorCode, RemoteProtocolError, Transfer

    sessions = Sessions(accept_wait_s=3600.0)  # a wait no test outlives
    token = secrets.token_bytes(32)
    sessions.expect(token)
    refused: list[RemoteProtocolError] = []

    def claim() -> None:
        try:
            sessions.claim(Transfer(quote=b"\0" * 16, token=token, first=0), BUYER.public_key, 0)
        except RemoteProtocolError as exc:
            refused.append(exc)

    waiting = threading.Thread(target=claim, daemon=True)
    waiting.start()
    sessions.forget(token, "its payload failed its content root")
    waiting.join(timeout=60)
    assert not waiting.is_alive(), "the TRANSFER still waits for an ACCEPT that cannot come"
    assert [e.code for e in refused] == [ErrorCode.BAD_TOKEN]
    assert "failed its content root" in refused[0].detail
