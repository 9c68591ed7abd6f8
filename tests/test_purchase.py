"""The buyer's purchase without I/O (p2p/_purchase.py): lookups, answers and time in,
actions out. PeerClient and the simulator drive this same object."""

import pytest

from kvx.p2p._buying import Step
from kvx.p2p._purchase import (
    HEDGE_S,
    Ask,
    Close,
    Exhausted,
    Lookup,
    Purchase,
    Ready,
    Renewed,
    Report,
    Send,
    Want,
)
from kvx.protocol import (
    Accept,
    Advertise,
    DataAddress,
    ErrorCode,
    KVLayout,
    Quote,
    Receipt,
    Reject,
    Transfer,
)
from kvx.trust import Identity, Signer, open_envelope

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)
FP = b"\xf0" * 32
CHAIN = (b"\x01" * 32, b"\x02" * 32)
ROOT = b"\x0a" * 32
CHUNK = 1 << 16
T0 = 1_800_000_000.0
BID = 100


def ad(seller: Identity, root: bytes = ROOT, layout: KVLayout = LAYOUT):
    message = Advertise(
        fp=FP,
        layout=layout,
        blocks=CHAIN,
        root=root,
        chunk=CHUNK,
        price=1,
        ctl="tcp://127.0.0.1:1",
        data=(DataAddress("tcp", "127.0.0.1:2"),),
    )
    return open_envelope(Signer(seller).seal(message, now_ms=int(T0 * 1000)))


def quote(seller: Identity, ask: Ask, *, price: int = 10, **change):
    a = ask.ad.message
    fields = {
        "re": open_envelope(ask.frame).header.seq,
        "quote": bytes([len(change)]) * 16,
        "blocks": len(CHAIN),
        "stored": len(CHAIN),
        "layout": a.layout,
        "root": a.root,
        "chunk": CHUNK,
        "price": price,
        "transport": "tcp",
        "data": "127.0.0.1:2",
        "token": b"\x07" * 32,
    } | change
    frame = Signer(seller).seal(Quote(**fields), now_ms=int(T0 * 1000), to=ask.provider)
    return open_envelope(frame)


@pytest.fixture
def buyer():
    return Identity.generate()


@pytest.fixture
def sellers():
    return [Identity.generate() for _ in range(3)]


def purchase(buyer, timeout_s: float = 5.0, layout: KVLayout | None = None) -> Purchase:
    want = Want(FP, CHAIN, lambda layout, tokens: BID, 1 << 30, timeout_s=timeout_s, layout=layout)
    return Purchase(want, Signer(buyer), T0)


def started(buyer, sellers, **kwargs) -> tuple[Purchase, list]:
    p = purchase(buyer, **kwargs)
    assert p.listed(len(CHAIN), [ad(s) for s in sellers], set(), T0) == []
    return p, p.wanted(T0)


def test_the_best_provider_is_asked_first_and_one_more_every_hedge_interval(buyer, sellers):
    p, actions = started(buyer, sellers)
    (first,) = actions
    assert isinstance(first, Ask) and first.provider == sellers[0].node_id
    request = open_envelope(first.frame)
    assert request.message.max_price == BID and request.header.to == sellers[0].node_id
    assert p.tick(T0 + HEDGE_S / 2) == []
    assert p.wait(T0 + HEDGE_S / 2) == pytest.approx(HEDGE_S / 2)
    (second,) = p.tick(T0 + HEDGE_S)
    assert second.provider == sellers[1].node_id
    (ready,) = p.answered(second.provider, quote(sellers[1], second), T0 + 0.3)
    assert isinstance(ready, Ready) and ready.quoted.provider == sellers[1].node_id
    assert p.tick(T0 + 1.0) == []  # nobody is wanted now: no third ask
    # The first answer, late, waits for the next want and is taken at once then.
    assert p.answered(first.provider, quote(sellers[0], first), T0 + 0.4) == []
    (again,) = p.wanted(T0 + 2.0)
    assert again.quoted.provider == sellers[0].node_id


def test_a_failure_asks_the_next_provider_at_once_and_closes_its_connection(buyer, sellers):
    p, (first,) = started(buyer, sellers)
    close, ask = p.failed(first.provider, ErrorCode.NOT_FOUND, "gone", T0 + 0.01)
    assert close == Close(first.provider) and ask.provider == sellers[1].node_id
    assert [(f.provider, f.code) for f in p.faults] == [(first.provider, ErrorCode.NOT_FOUND)]


@pytest.mark.parametrize(
    "change", [{"root": b"\x0b" * 32}, {"blocks": 1}, {"chunk": CHUNK * 2}, {"data": "10.0.0.1:9"}]
)
def test_a_quote_unlike_its_advertisement_is_a_fault_of_its_seller(buyer, sellers, change):
    p, (first,) = started(buyer, sellers)
    close, ask = p.answered(first.provider, quote(sellers[0], first, **change), T0)
    assert close == Close(first.provider) and ask.provider == sellers[1].node_id
    assert p.faults[0].code == ErrorCode.ROOT_MISMATCH


def test_a_quote_in_a_layout_other_than_the_buyers_model_is_kv_mismatch(buyer, sellers):
    other = KVLayout(dtype="float16", layers=3, kv_heads=2, head_dim=8, block=16)
    p = purchase(buyer, layout=other)
    p.listed(len(CHAIN), [ad(s) for s in sellers], set(), T0)
    report, lookup = p.wanted(T0)  # no ask is even sent
    assert lookup == Lookup() and report == Report(tuple(p.faults))
    assert {f.code for f in p.faults} == {ErrorCode.KV_MISMATCH}
    assert len(p.faults) == len(sellers)


def test_a_price_above_the_bid_is_rejected_and_the_next_provider_asked(buyer, sellers):
    p, (first,) = started(buyer, sellers)
    reject, close, ask = p.answered(first.provider, quote(sellers[0], first, price=BID + 1), T0)
    assert isinstance(reject, Send) and reject.provider == first.provider
    message = open_envelope(reject.frame).message
    assert isinstance(message, Reject) and message.reason == ErrorCode.PRICE_TOO_HIGH
    assert close == Close(first.provider) and ask.provider == sellers[1].node_id
    assert p.faults[0].code == ErrorCode.PRICE_TOO_HIGH


def test_when_every_listed_provider_failed_the_node_is_told_and_asked_again(buyer, sellers):
    p, (ask,) = started(buyer, sellers[:1])
    close, report, lookup = p.failed(ask.provider, ErrorCode.NOT_FOUND, "gone", T0)
    assert close == Close(ask.provider) and lookup == Lookup()
    assert report == Report(tuple(p.faults))
    # The node lists the same provider again and one it learnt of since: only that one
    # is asked, and with it failing too, the purchase is over.
    (fresh,) = p.listed(len(CHAIN), [ad(sellers[0]), ad(sellers[1])], set(), T0 + 0.1)
    assert fresh.provider == sellers[1].node_id
    *_, lookup = p.failed(fresh.provider, ErrorCode.TIMEOUT, "silent", T0 + 0.2)
    assert lookup == Lookup()
    assert p.listed(len(CHAIN), [ad(sellers[0]), ad(sellers[1])], set(), T0 + 0.3) == [
        Exhausted("every provider failed")
    ]


def test_a_lookup_of_another_prefix_lists_nobody(buyer, sellers):
    p, (ask,) = started(buyer, sellers[:1])
    p.failed(ask.provider, ErrorCode.NOT_FOUND, "gone", T0)
    assert p.listed(1, [ad(sellers[1])], set(), T0) == [Exhausted("every provider failed")]


def test_nothing_listed_is_exhausted_before_any_ask(buyer, sellers):
    p = purchase(buyer)
    (gone,) = p.listed(0, [], set(), T0)
    assert isinstance(gone, Exhausted)
    assert p.wanted(T0) == [] and p.tick(T0 + 100) == []


def test_silence_until_the_timeout_gives_up_and_closes_every_ask(buyer, sellers):
    p, (first,) = started(buyer, sellers, timeout_s=1.0)
    asked = [a.provider for t in (HEDGE_S, 2 * HEDGE_S) for a in p.tick(T0 + t)]
    assert len(asked) == 2
    *closes, gone = p.tick(T0 + 1.0)
    assert gone == Exhausted("no provider answered in time")
    assert {c.provider for c in closes} == {s.node_id for s in sellers}
    # An answer after that is not taken.
    assert p.answered(first.provider, quote(sellers[0], first), T0 + 2) == []


def test_width_counts_the_providers_in_good_standing(buyer, sellers):
    p = purchase(buyer)
    p.listed(len(CHAIN), [ad(s) for s in sellers], {sellers[0].node_id}, T0)
    assert p.width == 2
    p = purchase(buyer)
    p.listed(len(CHAIN), [ad(s) for s in sellers], {s.node_id for s in sellers}, T0)
    assert p.width == 1


def test_a_deal_is_accepted_streamed_paid_once_and_booked(buyer, sellers):
    p, (ask,) = started(buyer, sellers)
    (ready,) = p.answered(ask.provider, quote(sellers[0], ask, price=10), T0)
    quoted = ready.quoted
    accept = open_envelope(p.accept(quoted, T0)).message
    assert isinstance(accept, Accept) and accept.price == 10 and accept.root == ROOT
    q = quoted.terms
    transfer = open_envelope(p.transfer(q.quote, 0, None, T0)).message
    assert isinstance(transfer, Transfer) and transfer.token == q.token
    assert quoted.deal.step is Step.STREAMING
    window = open_envelope(p.receipt(q.quote, CHUNK, T0)).message
    assert isinstance(window, Receipt) and window.bytes == CHUNK
    settled = p.settle(q.quote, q.deliver, T0)
    final = open_envelope(settled.frame).message
    assert final.bytes == q.deliver and final.price == 10
    assert quoted.deal.step is Step.PAID
    assert p.settle(q.quote, q.deliver, T0) is None  # never paid twice
    assert [open_envelope(f).message for f in p.close()] == [final]


def test_a_deal_cut_mid_stream_fails_and_books_its_last_window_receipt(buyer, sellers):
    p, (ask,) = started(buyer, sellers)
    (ready,) = p.answered(ask.provider, quote(sellers[0], ask), T0)
    q = ready.quoted.terms
    p.accept(ready.quoted, T0)
    p.transfer(q.quote, 0, None, T0)
    p.receipt(q.quote, CHUNK, T0)
    (booked,) = p.close()
    assert open_envelope(booked).message.bytes == CHUNK
    assert ready.quoted.deal.step is Step.FAILED


def test_a_refuted_root_is_not_bought_again_in_the_purchase(buyer, sellers):
    other = b"\x0b" * 32
    p = purchase(buyer)
    p.listed(len(CHAIN), [ad(sellers[0]), ad(sellers[1]), ad(sellers[2], other)], set(), T0)
    (first,) = p.wanted(T0)
    (second,) = p.tick(T0 + HEDGE_S)
    (ready,) = p.answered(first.provider, quote(sellers[0], first), T0 + 0.3)
    assert p.answered(second.provider, quote(sellers[1], second), T0 + 0.3) == []  # waits
    p.refute(ROOT, [first.provider], "layer0: lies")
    # The waiting quote is of that root: dropped and its seller blamed too; the provider
    # of another root is asked next.
    close, third = p.wanted(T0 + 1)
    assert close == Close(second.provider) and third.provider == sellers[2].node_id
    assert [(f.provider, f.code) for f in p.faults] == [
        (first.provider, ErrorCode.KV_MISMATCH),
        (second.provider, ErrorCode.KV_MISMATCH),
    ]
    assert ready.quoted.terms.root == ROOT


def test_a_provider_of_a_refuted_root_is_not_asked(buyer, sellers):
    p = purchase(buyer)
    p.listed(len(CHAIN), [ad(sellers[0]), ad(sellers[1], b"\x0b" * 32)], set(), T0)
    p.refute(ROOT, [sellers[2].node_id], "deep: lies")
    (ask,) = p.wanted(T0)
    assert ask.provider == sellers[1].node_id


def test_a_renewal_waits_a_whole_timeout_and_its_failure_keeps_the_connection(buyer, sellers):
    p, (ask,) = started(buyer, sellers, timeout_s=5.0)
    (ready,) = p.answered(ask.provider, quote(sellers[0], ask), T0)
    p.accept(ready.quoted, T0)
    renewal = p.renew(ask.provider, T0 + 60)  # long after the purchase's own wait
    assert renewal.renewal and renewal.timeout_s == 5.0
    assert p.failed(ask.provider, ErrorCode.CREDIT_LIMIT, "owes", T0 + 61) == []
    renewal = p.renew(ask.provider, T0 + 62)
    (renewed,) = p.answered(ask.provider, quote(sellers[0], renewal, quote=b"\x09" * 16), T0 + 62)
    assert isinstance(renewed, Renewed) and renewed.quoted.terms.quote == b"\x09" * 16
