"""The TCP data channel and multi-provider fetch, against honest and hostile sellers."""

import asyncio
import dataclasses
import socket

import pytest
import torch
from sellers import (
    BUYER,
    CHUNK,
    Hostile,
    expected_for,
    honest_server,
    payer,
    payload,
    scattered,
    source,
    transfer_maker,
)

from kvx.protocol import ErrorCode, FrameTag, RemoteProtocolError, chunk_hashes
from kvx.transport import (
    FetchMiss,
    StreamVerifier,
    TcpDataServer,
    available_transports,
    choose_transport,
    fetch,
)
from kvx.trust import Identity

P1, P2, P3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
DATA = payload()


@pytest.fixture
def hostile(hostiles):
    """Make hostile sellers of DATA."""
    return lambda **lie: hostiles(DATA, **lie)


def dest_for(n: int) -> torch.Tensor:
    return torch.full((n,), 0xAA, dtype=torch.uint8)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


async def test_a_whole_payload_arrives_verified():
    expected = expected_for(DATA)
    server = await honest_server(DATA, expected)
    dest = dest_for(len(DATA))
    got = await fetch([source(server.address, expected, P1, transfer_maker())], dest)
    await server.close()
    assert as_bytes(dest) == DATA
    assert (got.size, got.providers, got.faults) == (len(DATA), (P1,), ())


async def test_a_prefix_that_ends_mid_chunk_lands_in_a_larger_bf16_tensor():
    deliver = 2 * CHUNK + 4096  # the third chunk is received whole, partly kept
    expected = expected_for(DATA, deliver)
    server = await honest_server(DATA, expected)
    dest = torch.zeros(deliver // 2 + 8, dtype=torch.bfloat16)  # 16 bytes spare at the end
    await fetch([source(server.address, expected, P1, transfer_maker())], dest)
    await server.close()
    raw = dest.view(torch.uint8).numpy().tobytes()
    assert raw[:deliver] == DATA[:deliver] and raw[deliver:] == bytes(16)


async def test_a_flipped_bit_ends_that_stream_and_the_next_provider_takes_the_unpaid_rest(
    hostile,
):
    """The buyer keeps of a broken stream only what its receipts paid for (§9.7): with no
    payment window, nothing, so the next provider streams the whole payload."""
    expected = expected_for(DATA)
    bad = hostile(flip=2)
    server = await honest_server(DATA, expected)
    make = transfer_maker()
    dest = dest_for(len(DATA))
    got = await fetch(
        [source(bad.address, expected, P1, make), source(server.address, expected, P2, make)], dest
    )
    await server.close()
    assert as_bytes(dest) == DATA
    assert make.opened == [0, 0]
    assert got.providers == (P2,)
    assert [(s.first, s.stop, s.ended) for s in got.streams] == [(0, expected.needed, True)]
    assert [(f.provider, f.code) for f in got.faults] == [(P1, ErrorCode.CHUNK_HASH_MISMATCH)]


@pytest.mark.parametrize(
    ("lie", "code"),
    [
        ({"flip": 0}, ErrorCode.CHUNK_HASH_MISMATCH),
        ({"resize": 1, "delta": 7}, ErrorCode.SIZE_MISMATCH),  # longer than announced
        ({"resize": 1, "delta": -7}, ErrorCode.SIZE_MISMATCH),  # shorter
        ({"stop_after": 3}, ErrorCode.STREAM_TRUNCATED),  # dies half-way
        ({"wrong_list": True}, ErrorCode.ROOT_MISMATCH),
    ],
)
async def test_a_lying_provider_alone_is_a_miss_and_leaves_nothing(hostile, lie, code):
    expected = expected_for(DATA)
    bad = hostile(**lie)
    dest = dest_for(len(DATA))
    with pytest.raises(FetchMiss) as miss:
        await fetch([source(bad.address, expected, P1, transfer_maker())], dest)
    assert [(f.provider, f.code) for f in miss.value.faults] == [(P1, code)]
    assert as_bytes(dest) == bytes(len(DATA))  # nothing of it is handed back


async def test_a_content_root_other_than_the_advertised_one_is_refused():
    other = payload(len(DATA) + 1)[1:]  # same size, other bytes
    server = await honest_server(other, expected_for(other))
    dest = dest_for(len(DATA))
    with pytest.raises(FetchMiss) as miss:  # the buyer expects DATA's root
        await fetch([source(server.address, expected_for(DATA), P1, transfer_maker())], dest)
    await server.close()
    assert miss.value.faults[0].code == ErrorCode.ROOT_MISMATCH


async def test_a_stalled_provider_times_out_and_the_next_serves(hostile):
    expected = expected_for(DATA)
    stalled = hostile(silent=True)
    server = await honest_server(DATA, expected)
    dest = dest_for(len(DATA))
    got = await fetch(
        [
            source(stalled.address, expected, P1, transfer_maker()),
            source(server.address, expected, P2, transfer_maker()),
        ],
        dest,
        timeout_s=0.5,
    )
    await server.close()
    assert [f.code for f in got.faults] == [ErrorCode.TIMEOUT] and as_bytes(dest) == DATA


async def test_an_unreachable_provider_is_skipped():
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends
    expected = expected_for(DATA)
    server = await honest_server(DATA, expected)
    got = await fetch(
        [
            source(dead, expected, P1, transfer_maker()),
            source(server.address, expected, P2, transfer_maker()),
        ],
        dest_for(len(DATA)),
    )
    await server.close()
    assert [f.code for f in got.faults] == [ErrorCode.UNAVAILABLE]


async def test_a_wrong_session_token_is_refused():
    expected = expected_for(DATA)
    server = await honest_server(DATA, expected)
    with pytest.raises(FetchMiss) as miss:
        await fetch(
            [source(server.address, expected, P1, transfer_maker(token=b"\x00" * 32))],
            dest_for(len(DATA)),
        )
    await server.close()
    assert miss.value.faults[0].code == ErrorCode.BAD_TOKEN


async def test_a_reused_session_token_is_refused():
    expected = expected_for(DATA)
    server = await honest_server(DATA, expected)
    await fetch([source(server.address, expected, P1, transfer_maker())], dest_for(len(DATA)))
    with pytest.raises(FetchMiss) as miss:
        await fetch([source(server.address, expected, P1, transfer_maker())], dest_for(len(DATA)))
    await server.close()
    assert miss.value.faults[0].code == ErrorCode.BAD_TOKEN


async def test_a_token_presented_by_another_buyer_is_refused():
    expected = expected_for(DATA)
    server = await honest_server(DATA, expected)
    thief = transfer_maker(buyer=Identity.from_seed(b"\x99" * 32))
    with pytest.raises(FetchMiss) as miss:
        await fetch([source(server.address, expected, P1, thief)], dest_for(len(DATA)))
    assert miss.value.faults[0].code == ErrorCode.BAD_TOKEN
    # The rightful buyer can still use it.
    await fetch([source(server.address, expected, P1, transfer_maker())], dest_for(len(DATA)))
    await server.close()


async def test_a_payload_larger_than_the_destination_is_refused_before_any_byte(hostile):
    expected = expected_for(DATA)
    bad = hostile()
    with pytest.raises(RemoteProtocolError) as err:
        await fetch([source(bad.address, expected, P1, transfer_maker())], dest_for(len(DATA) - 1))
    assert err.value.code == ErrorCode.SIZE_MISMATCH


async def test_no_providers_is_a_miss():
    with pytest.raises(FetchMiss):
        await fetch([], dest_for(1))


def test_verifier_refuses_frames_out_of_order():
    expected = expected_for(DATA)
    v = StreamVerifier(expected)
    for early in (FrameTag.CHUNK, FrameTag.END):
        with pytest.raises(RemoteProtocolError) as err:
            v.frame(early)
        assert err.value.code == ErrorCode.UNEXPECTED_MESSAGE
    with pytest.raises(RemoteProtocolError) as err:
        v.begin_chunk(0, CHUNK)
    assert err.value.code == ErrorCode.UNEXPECTED_MESSAGE
    assert v.frame(FrameTag.CONTROL) == FrameTag.CONTROL  # a refusal may come at any time
    assert v.frame(FrameTag.CHUNK_LIST) == FrameTag.CHUNK_LIST
    v.chunk_list(b"".join(chunk_hashes(DATA, CHUNK)))
    with pytest.raises(RemoteProtocolError) as err:
        v.frame(FrameTag.CHUNK_LIST)
    assert err.value.code == ErrorCode.UNEXPECTED_MESSAGE
    assert v.frame(FrameTag.CHUNK) == FrameTag.CHUNK
    with pytest.raises(RemoteProtocolError) as err:
        v.begin_chunk(1, CHUNK)  # chunk 0 is due
    assert err.value.code == ErrorCode.SIZE_MISMATCH
    with pytest.raises(RemoteProtocolError) as err:
        v.end()
    assert err.value.code == ErrorCode.STREAM_TRUNCATED


def test_transport_choice():
    assert choose_transport(["ucx", "tcp"], {"tcp", "ucx"}) == "ucx"
    assert choose_transport(["tcp", "ucx"], {"tcp", "ucx"}) == "tcp"
    assert choose_transport(["ucx", "tcp"], {"tcp"}) == "tcp"
    with pytest.raises(RemoteProtocolError) as err:
        choose_transport(["ucx"], {"tcp"})
    assert err.value.code == ErrorCode.NO_COMMON_TRANSPORT
    assert "tcp" in available_transports()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU placement untested")
async def test_a_payload_lands_in_gpu_memory():
    expected = expected_for(DATA)
    server = await honest_server(DATA, expected)
    dest = torch.zeros(len(DATA), dtype=torch.uint8, device="cuda")
    await fetch([source(server.address, expected, P1, transfer_maker())], dest)
    await server.close()
    assert dest.cpu().numpy().tobytes() == DATA


def windowed(data: bytes = DATA, window: int = 1, price: int = 6_000):
    return dataclasses.replace(expected_for(data), window=window, price=price)


async def test_a_windowed_stream_is_paid_window_by_window():
    expected = windowed(window=2)
    receipts = []
    server = await honest_server(DATA, expected, on_receipt=receipts.append)
    pay = payer(expected)
    dest = dest_for(len(DATA))
    await fetch([source(server.address, expected, P1, transfer_maker(), pay=pay)], dest)
    await server.close()
    assert as_bytes(dest) == DATA
    # Six chunks, two a window: receipts after chunks 2 and 4, none after the last.
    assert pay.paid == [2 * CHUNK, 4 * CHUNK]
    assert [(r.message.bytes, r.message.price) for r in receipts] == [
        (2 * CHUNK, 6_000 * 2 * CHUNK // len(DATA)),
        (4 * CHUNK, 6_000 * 4 * CHUNK // len(DATA)),
    ]


WRONG_RECEIPTS = {
    "the whole delivery mid-stream": {"claim": lambda due: len(DATA)},
    "one chunk more than was sent": {"claim": lambda due: due + CHUNK},
    "less than was sent": {"claim": lambda due: due - CHUNK},
    "another deal": {"quote": b"\x07" * 16},
    "one micro-credit short": {"price_off": -1},
}


@pytest.mark.parametrize("wrong", WRONG_RECEIPTS, ids=list(WRONG_RECEIPTS))
async def test_a_receipt_that_is_not_for_exactly_what_was_sent_ends_the_stream(wrong):
    expected = windowed(window=2)
    receipts, faults = [], []
    server = await honest_server(
        DATA,
        expected,
        on_receipt=receipts.append,
        on_fault=lambda buyer, exc: faults.append((buyer, exc.code)),
    )
    dest = dest_for(len(DATA))
    pay = payer(expected, **WRONG_RECEIPTS[wrong])
    with pytest.raises(FetchMiss) as miss:
        await fetch([source(server.address, expected, P1, transfer_maker(), pay=pay)], dest)
    await server.close()
    # The buyer hears why, got its first window and no more, and is reported to be scored.
    assert [f.code for f in miss.value.faults] == [ErrorCode.UNKNOWN_TRANSFER]
    assert receipts == [] and pay.paid == [2 * CHUNK]
    assert faults == [(BUYER.public_key, ErrorCode.UNKNOWN_TRANSFER)]


async def test_a_resumed_stream_is_paid_from_its_own_first_chunk():
    """Provider 1 streams a window and is cut (its buyer's receipt is wrong); provider 2
    resumes at chunk 2. Its receipts count from there: the buyer never pays it for the
    chunks provider 1 sent (spec §9.4, §8.14)."""
    expected = windowed(window=2)
    first_receipts, second_receipts = [], []
    one = await honest_server(DATA, expected, on_receipt=first_receipts.append)
    two = await honest_server(DATA, expected, on_receipt=second_receipts.append)
    bad, good = payer(expected, claim=lambda due: due + CHUNK), payer(expected)
    make = transfer_maker()
    got = await fetch(
        [
            source(one.address, expected, P1, make, pay=bad),
            source(two.address, expected, P2, make, pay=good),
        ],
        dest_for(len(DATA)),
    )
    await one.close()
    await two.close()
    assert make.opened == [0, 2] and got.providers == (P1, P2)
    assert good.paid == [2 * CHUNK]  # chunks 2 and 3: this stream's first window
    assert [r.message.bytes for r in second_receipts] == [2 * CHUNK] and first_receipts == []
    assert got.streams[-1].carried == len(DATA) - 2 * CHUNK  # what provider 2's receipt pays


async def test_the_window_moves_only_on_a_receipt_the_ledger_takes():
    expected = windowed(window=2)

    def ledger_refuses(st):
        raise RemoteProtocolError(ErrorCode.REPLAYED, "a receipt for as much is already recorded")

    server = await honest_server(DATA, expected, on_receipt=ledger_refuses)
    pay = payer(expected)
    with pytest.raises(FetchMiss) as miss:
        await fetch(
            [source(server.address, expected, P1, transfer_maker(), pay=pay)], dest_for(len(DATA))
        )
    await server.close()
    assert [f.code for f in miss.value.faults] == [ErrorCode.REPLAYED]
    assert pay.paid == [2 * CHUNK]  # a correct receipt, refused by the books: no more chunks


SERVERS = {"tcp": TcpDataServer}
try:
    from kvx.transport._ucx import UcxDataServer

    SERVERS["ucx"] = UcxDataServer
except ImportError:  # the 'ucx' extra: its test below is left out
    pass
KEY = b"\x4b" * 32


@pytest.mark.parametrize("transport", SERVERS)
async def test_a_sealed_stream_arrives_whole_and_paid_window_by_window(transport):
    expected = windowed(window=2)
    receipts = []
    server = await honest_server(
        DATA, expected, server_class=SERVERS[transport], on_receipt=receipts.append, key=KEY
    )
    pay = payer(expected)
    dest = dest_for(len(DATA))
    made = source(server.address, expected, P1, transfer_maker(), transport, pay=pay, key=KEY)
    await fetch([made], dest)
    await server.close()
    assert as_bytes(dest) == DATA
    assert [r.message.bytes for r in receipts] == [2 * CHUNK, 4 * CHUNK]


@pytest.mark.parametrize(
    ("seller_key", "buyer_key"),
    [(b"\x01" * 32, KEY), (None, KEY)],
    ids=["another key", "a stream in clear where a sealed one was agreed"],
)
async def test_a_sealed_stream_that_does_not_open_is_refused(seller_key, buyer_key):
    expected = expected_for(DATA)
    server = await honest_server(DATA, expected, key=seller_key)
    dest = dest_for(len(DATA))
    made = source(server.address, expected, P1, transfer_maker(), key=buyer_key)
    with pytest.raises(FetchMiss) as miss:
        await fetch([made], dest)
    await server.close()
    assert [f.code for f in miss.value.faults] == [ErrorCode.BAD_SEAL]
    assert as_bytes(dest) == bytes(len(DATA))  # nothing of it is handed back


async def test_a_windowed_quote_needs_a_way_to_pay():
    expected = windowed()
    server = await honest_server(DATA, expected)
    with pytest.raises(ValueError, match="payment window"):
        await fetch([source(server.address, expected, P1, transfer_maker())], dest_for(len(DATA)))
    await server.close()


async def test_a_provider_of_another_payload_restarts_the_fetch_and_blames_nobody():
    other = payload(len(DATA) + 2 * CHUNK)[1:]  # another size and other bytes
    liar = Hostile(other, stop_after=2)  # serves two good chunks of its payload, then dies
    server = await honest_server(DATA, expected_for(DATA))
    allocated = []

    def allocate(expected):
        allocated.append(torch.zeros(expected.deliver, dtype=torch.uint8))
        return allocated[-1]

    sources = [
        source(liar.address, expected_for(other), P1, transfer_maker()),
        source(server.address, expected_for(DATA), P2, transfer_maker()),
    ]
    got = await fetch(sources, allocate)
    liar.close()
    await server.close()
    assert [len(t) for t in allocated] == [len(other), len(DATA)]
    assert as_bytes(allocated[-1]) == DATA and as_bytes(allocated[0]) == bytes(len(other))
    # The first provider's own fault is reported; the difference of payloads is nobody's.
    assert [(f.provider, f.code) for f in got.faults] == [(P1, ErrorCode.STREAM_TRUNCATED)]
    assert got.providers == (P2,)


async def test_a_payload_is_received_scattered_straight_into_its_callers_memory():
    from kvx.transport import ScatterDestination

    deliver = 4 * CHUNK + 777
    expected = expected_for(DATA, deliver)
    server = await honest_server(DATA, expected)
    place, payload_of, _ = scattered(deliver)
    await fetch(
        [source(server.address, expected, P1, transfer_maker())],
        lambda e: ScatterDestination(e, place),
    )
    await server.close()
    assert payload_of() == DATA[:deliver]


async def test_a_scattered_fetch_that_fails_leaves_nothing_behind(hostile):
    from kvx.transport import ScatterDestination

    expected = expected_for(DATA)
    place, _, memory = scattered(len(DATA))
    with pytest.raises(FetchMiss):
        await fetch(
            [source(hostile(flip=3).address, expected, P1, transfer_maker())],
            lambda e: ScatterDestination(e, place),
        )
    assert bytes(memory) == bytes(len(memory))  # even the verified chunks are wiped


async def test_a_buyer_past_its_streams_budget_is_told_so_and_others_go_on():
    from sellers import TOKEN

    from kvx.protocol import FrameTag, frame_header
    from kvx.transport import DataLimits

    expected = windowed(window=1)  # the first stream stops after a chunk, awaiting payment
    second = b"\x7b" * 32
    server = await honest_server(
        DATA, expected, more_tokens=(second,), limits=DataLimits(streams_per_buyer=1)
    )
    host, port = server.address.rsplit(":", 1)
    held = socket.create_connection((host, int(port)))
    opening = transfer_maker(token=TOKEN)(0)
    held.sendall(frame_header(FrameTag.CONTROL, len(opening)) + opening)
    # The chunk list is coming: that stream holds its slot (read off the loop the server runs on).
    await asyncio.to_thread(held.recv, 5, socket.MSG_WAITALL)
    with pytest.raises(FetchMiss) as miss:
        await fetch(
            [
                source(
                    server.address, expected, P1, transfer_maker(token=second), pay=payer(expected)
                )
            ],
            dest_for(len(DATA)),
        )
    assert [f.code for f in miss.value.faults] == [ErrorCode.OVER_BUDGET]
    held.close()
    await server.close()
