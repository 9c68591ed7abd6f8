"""Striped fetch (spec §9.7): one payload from several providers at once, against real
TCP data servers — honest, slow, stalling and lying — and the plan that assigns the
chunks, in memory."""

import asyncio
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sellers import (
    BUYER,
    CHUNK,
    QUOTE,
    SELLER,
    TOKEN,
    expected_for,
    honest_server,
    now,
    offer_of,
    payer,
    payload,
    source,
    transfer_maker,
)

from kvx.protocol import ErrorCode, Receipt, Transfer
from kvx.transport import (
    Destination,
    Expected,
    StreamVerifier,
    Stripes,
    TcpReceiver,
    fetch,
)
from kvx.transport._serving import Next, Serving
from kvx.transport._stripes import Abandon, Shorten
from kvx.trust import Inbox, Signer

P1, P2, P3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
DATA = payload(24 * CHUNK)
TOKENS = [bytes([0x40 + i]) * 32 for i in range(8)]


def windowed(window: int = 2, price: int = 24_000) -> Expected:
    return dataclasses.replace(expected_for(DATA), window=window, price=price)


def dest() -> torch.Tensor:
    return torch.full((len(DATA),), 0xAA, dtype=torch.uint8)


@pytest.fixture
def hostile24(hostiles):
    """Make hostile sellers of DATA."""
    return lambda **lie: hostiles(DATA, **lie)


def renewing(address: str, expected: Expected, provider: bytes, tokens: list[bytes], made=None):
    """A source whose `renew` gives a new deal with the same server, one token each;
    `made` collects (provider, the TRANSFER maker) of each deal."""
    make = transfer_maker(token=tokens[0])
    if made is not None:
        made.append((provider, make))
    pay = payer(expected) if expected.window else None
    src = source(address, expected, provider, make, pay=pay, deal=tokens[0])

    async def renew():
        return renewing(address, expected, provider, tokens[1:], made) if tokens[1:] else None

    return dataclasses.replace(src, renew=renew)


def covered(got) -> list[tuple[int, int]]:
    return [(s.first, s.stop) for s in got.streams]


def assert_disjoint_and_whole(got, needed: int) -> None:
    at = 0
    for first, stop in covered(got):
        assert first == at, covered(got)
        at = stop
    assert at == needed


async def test_two_providers_stream_disjoint_halves_each_paid_from_its_own_first_chunk():
    expected = windowed(window=4)
    receipts = {P1: [], P2: []}
    one = await honest_server(DATA, expected, token=TOKENS[0], on_receipt=receipts[P1].append)
    two = await honest_server(DATA, expected, token=TOKENS[1], on_receipt=receipts[P2].append)
    target = dest()
    got = await fetch(
        [
            renewing(one.address, expected, P1, TOKENS[:1]),
            renewing(two.address, expected, P2, TOKENS[1:2]),
        ],
        target,
        width=2,
    )
    await one.close()
    await two.close()
    assert target.numpy().tobytes() == DATA and got.faults == ()
    assert covered(got) == [(0, 12), (12, 24)] and all(s.ended for s in got.streams)
    assert [s.carried for s in got.streams] == [12 * CHUNK, 12 * CHUNK]
    # Each seller's window receipts count from its own stream's first chunk (§9.4).
    for key in (P1, P2):
        assert [r.message.bytes for r in receipts[key]] == [4 * CHUNK, 8 * CHUNK]


async def test_a_slow_provider_is_asked_to_end_sooner_and_the_fast_one_takes_its_rest():
    expected = windowed(window=4)
    fast = await honest_server(DATA, expected, token=TOKENS[0], more_tokens=tuple(TOKENS[1:4]))
    slow = await honest_server(DATA, expected, token=TOKENS[4], delay=0.1)
    made: list = []
    got = await fetch(
        [
            renewing(fast.address, expected, P1, TOKENS[:4], made),
            renewing(slow.address, expected, P2, TOKENS[4:5], made),
        ],
        dest(),
        width=2,
    )
    await fast.close()
    await slow.close()
    assert got.destination.read(0, len(DATA)) == DATA and got.faults == ()
    assert_disjoint_and_whole(got, 24)
    by = {P1: 0, P2: 0}
    for s in got.streams:
        by[s.source.provider] += s.stop - s.first
    assert by[P2] < 12 < by[P1]  # the slow one kept less than its first half
    # The slow one was sent a second TRANSFER, naming a sooner last chunk; the fast one
    # opened a stream of a new deal for the rest, and every stream ended with END.
    [slow_deal] = [make for provider, make in made if provider == P2]
    assert len(slow_deal.opened) == 2
    assert len([make for provider, make in made if provider == P1 and make.opened]) >= 2
    assert all(s.ended for s in got.streams)


@pytest.mark.parametrize(
    ("lie", "code", "detail"),
    [
        # Cut by the plan for standing still, long before the 60 s socket timeout.
        ({"stall_after": 3}, ErrorCode.TIMEOUT, "no chunk in"),
        ({"flip": 12}, ErrorCode.CHUNK_HASH_MISMATCH, "chunk 12"),  # its range's first
    ],
)
async def test_a_staller_or_a_liar_in_a_stripe_loses_its_rest_and_nothing_unpaid_is_kept(
    hostile24, lie, code, detail
):
    expected = expected_for(DATA)
    bad = hostile24(**lie)
    honest = await honest_server(DATA, expected, token=TOKENS[0], more_tokens=(TOKENS[1],))
    got = await fetch(
        [
            renewing(honest.address, expected, P1, TOKENS[:2]),
            source(bad.address, expected, P2, transfer_maker(token=TOKENS[5])),
        ],
        dest(),
        width=2,
        timeout_s=60,
    )
    await honest.close()
    assert got.destination.read(0, len(DATA)) == DATA
    assert [(f.provider, f.code) for f in got.faults] == [(P2, code)]
    assert got.faults[0].detail.startswith(detail)
    assert got.providers == (P1,)  # nothing of the bad one's is kept: no receipt paid it
    assert_disjoint_and_whole(got, 24)


async def test_a_stream_of_a_range_carries_those_chunks_and_the_seller_books_them():
    expected = expected_for(DATA)
    finished = []
    server = await honest_server(
        DATA, expected, on_finished=lambda offer, sent, whole: finished.append((sent, whole))
    )
    verifier = StreamVerifier(expected, 5, 9)
    target = dest()
    make = transfer_maker()
    receiver = TcpReceiver(
        server.address, make(5, 8), verifier, Destination(target, expected), timeout_s=5
    )
    await receiver.run()
    await server.close()
    assert verifier.complete and verifier.carried == 4 * CHUNK
    assert target.numpy().tobytes()[5 * CHUNK : 9 * CHUNK] == DATA[5 * CHUNK : 9 * CHUNK]
    assert finished == [(4 * CHUNK, True)]


@pytest.mark.parametrize(
    ("after", "stop"),
    [
        (1, 3),  # asked before chunk 3 arrived
        (5, 2),  # asked for less than has arrived already: it ends after what was sent
    ],
)
async def test_a_shortened_stream_ends_after_what_was_asked_or_already_sent(after, stop):
    expected = windowed(window=4)
    finished = []
    server = await honest_server(
        DATA,
        expected,
        delay=0.05,
        on_finished=lambda offer, sent, whole: finished.append((sent, whole)),
    )
    verifier = StreamVerifier(expected)
    make = transfer_maker()
    receiver = TcpReceiver(
        server.address,
        make(0, None),
        verifier,
        Destination(dest(), expected),
        timeout_s=5,
        pay=payer(expected),
    )
    running = asyncio.ensure_future(receiver.run())
    while verifier.verified < after:
        await asyncio.sleep(0.01)
    assert receiver.shorten(stop, make(0, stop - 1))
    await running
    await server.close()
    assert verifier.complete and max(stop, after) <= verifier.stop < 24
    assert finished == [(verifier.carried, True)]  # the seller booked what it carried


# ---- the seller's side of a stream, in memory (transport/_serving.py) ------------------


def serving(first: int = 0, last: int | None = None, window: int = 4) -> Serving:
    expected = windowed(window=window)
    transfer = Transfer(quote=QUOTE, token=TOKEN, first=first, last=last)
    return Serving(offer_of(DATA, expected), transfer, Inbox(SELLER.node_id), Signer(SELLER))


def send(s: Serving, chunks: int) -> None:
    for _ in range(chunks):
        assert s.next() is Next.CHUNK
        s.chunk_sent()


BUYER_SIGNER = Signer(BUYER)


def frame(message) -> bytes:
    return BUYER_SIGNER.seal(message, now_ms=now(), to=SELLER.node_id)


def test_a_range_ends_after_its_last_chunk_and_waits_at_each_window():
    s = serving(first=3, last=9)
    send(s, 4)
    assert s.next() is Next.RECEIPT
    pay = Receipt(
        quote=QUOTE,
        seller=SELLER.node_id,
        root=s.offer.expected.root,
        bytes=4 * CHUNK,
        price=s.offer.expected.paid_price(4 * CHUNK),
    )
    assert s.control(frame(pay), now()) is None and s.refused is None
    send(s, 3)
    assert s.next() is Next.END and s.sent_bytes == 7 * CHUNK


def test_a_shorter_last_ends_the_stream_there_or_after_what_was_sent():
    s = serving()
    send(s, 2)
    assert s.control(frame(Transfer(quote=QUOTE, token=TOKEN, first=0, last=5)), now()) is None
    send(s, 2)
    assert s.next() is Next.RECEIPT  # the window still waits: chunk 4 is wanted
    s = serving()
    send(s, 3)
    assert s.control(frame(Transfer(quote=QUOTE, token=TOKEN, first=0, last=0)), now()) is None
    assert s.next() is Next.END and s.stop == 3  # what was sent stands


@pytest.mark.parametrize(
    "change",
    [
        {"last": 23},  # not sooner than the stream's last chunk
        {"last": None},  # no last at all
        {"token": b"\x01" * 32},  # another stream's
        {"first": 1, "last": 2},  # another first
    ],
)
def test_a_mid_stream_transfer_that_does_not_end_this_stream_sooner_is_invalid_field(change):
    s = serving()
    send(s, 1)
    fields = {"quote": QUOTE, "token": TOKEN, "first": 0, "last": 5, **change}
    reply = s.control(frame(Transfer(**fields)), now())
    assert s.refused is not None and s.refused.code == ErrorCode.INVALID_FIELD
    assert reply is not None


def test_a_receipt_read_before_the_window_is_full_must_cover_what_was_sent():
    s = serving()
    send(s, 3)
    early = Receipt(
        quote=QUOTE,
        seller=SELLER.node_id,
        root=s.offer.expected.root,
        bytes=2 * CHUNK,
        price=s.offer.expected.paid_price(2 * CHUNK),
    )
    s.control(frame(early), now())
    assert s.refused is not None and s.refused.code == ErrorCode.UNKNOWN_TRANSFER


# ---- the plan, in memory (transport/_stripes.py) --------------------------------------


def test_the_first_streams_share_the_payload_and_a_finished_one_takes_the_slowest_rest():
    plan = Stripes(needed=30, width=3)
    assert [plan.open(k, bytes([k]), 0.0) for k in range(3)] == [(0, 10), (10, 20), (20, 30)]
    plan.verified(0, 10, 10, 1.0)
    plan.verified(1, 18, 18, 1.0)  # 8 chunks a second
    plan.verified(2, 22, 22, 1.0)  # 2 chunks a second: it would end last
    plan.ended(0, 10, 1.0)
    cut = plan.open(3, bytes([0]), 1.0)  # provider 0 again, at 10 chunks a second
    assert isinstance(cut, Shorten) and cut.key == 2
    assert cut.stop == 22 + 1  # 8 left: 8 · 2/(2 + 10) rounds down to 1 kept
    plan.verified(2, 23, 23, 1.2)
    plan.ended(2, 23, 1.2)
    # The rest is shared with the stream still running, which will want some once it ends.
    assert plan.open(3, bytes([0]), 1.2) == (23, 27)


def test_a_failed_stream_gives_back_everything_its_receipts_did_not_pay():
    plan = Stripes(needed=10, width=1)
    assert plan.open("a", b"a", 0.0) == (0, 10)
    plan.verified("a", 7, 4, 1.0)  # 7 verified, 4 paid for
    plan.failed("a")
    assert plan.done == [(0, 4, "a")] and plan.free == [(4, 10)]


def test_a_stream_that_stands_still_is_abandoned_but_a_slow_one_is_not():
    plan = Stripes(needed=40, width=2)
    plan.open("stalled", b"s", 0.0)
    plan.open("slow", b"w", 0.0)
    plan.verified("stalled", 10, 10, 0.5)  # fast, then nothing
    plan.verified("slow", 21, 21, 2.0)  # a chunk every 2 s
    assert plan.tick(2.0) == [Abandon("stalled", "no chunk in 1.5 s")]
    assert plan.tick(5.0)[1:] == []  # the slow one moved 3 s ago: 1.5 intervals


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 40)), max_size=60))
def test_every_chunk_is_in_exactly_one_place_whatever_happens(events):
    """Free, streaming and kept ranges never overlap and always cover the payload: no
    chunk is asked of two providers at once, and none is kept twice."""
    plan = Stripes(needed=40, width=3)
    t, key = 0.0, 0
    for kind, which, amount in events:
        t += 0.1
        lanes = list(plan.lanes)
        lane = plan.lanes[lanes[which % len(lanes)]] if lanes else None
        if kind == 0:
            key += 1
            got = plan.open(key, bytes([which]), t)
            if isinstance(got, Shorten):
                plan.declined(got.key) if amount % 2 else None
        elif lane is not None and kind == 1:
            v = min(lane.stop, lane.verified + amount % 5)
            plan.verified(lane.key, v, max(lane.paid, v - amount % 3), t)
        elif lane is not None and kind == 2 and lane.verified >= lane.asked:
            plan.ended(lane.key, lane.verified, t)  # its END came
        elif lane is not None and kind == 3:
            plan.failed(lane.key)
        owned = [(a, b) for a, b in plan.free]
        owned += [(lane.first, lane.stop) for lane in plan.lanes.values()]
        owned += [(a, b) for a, b, _ in plan.done]
        at = 0
        for a, b in sorted(owned):
            assert a == at and b > a
            at = b
        assert at == 40
