"""The UCX data channel with ucxx over UCX_TLS=tcp (set in conftest), in host memory."""

import dataclasses

import pytest
import torch
from sellers import (
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

from kvx.protocol import ErrorCode

ucx = pytest.importorskip("kvx.transport._ucx", reason="ucxx is not installed (extra 'ucx')")
from kvx.transport import FetchMiss, fetch  # noqa: E402

P1, P2 = b"\x01" * 32, b"\x02" * 32
DATA = payload()


async def ucx_server(data=DATA, expected=None, on_receipt=None):
    return await honest_server(
        data,
        expected or expected_for(data),
        server_class=ucx.UcxDataServer,
        on_receipt=on_receipt,
    )


async def test_a_whole_payload_arrives_over_ucx():
    server = await ucx_server()
    dest = torch.zeros(len(DATA), dtype=torch.uint8)
    got = await fetch(
        [source(server.address, expected_for(DATA), P1, transfer_maker(), "ucx")], dest
    )
    await server.close()
    assert dest.numpy().tobytes() == DATA and got.providers == (P1,)


async def test_a_prefix_ending_mid_chunk_over_ucx():
    deliver = 3 * CHUNK + 100
    expected = expected_for(DATA, deliver)
    server = await ucx_server(expected=expected)
    dest = torch.zeros(deliver, dtype=torch.uint8)
    await fetch([source(server.address, expected, P1, transfer_maker(), "ucx")], dest)
    await server.close()
    assert dest.numpy().tobytes() == DATA[:deliver]


async def test_a_tcp_liar_is_replaced_by_a_ucx_provider():
    expected = expected_for(DATA)
    liar = Hostile(DATA, flip=3)
    server = await ucx_server()
    make = transfer_maker()
    dest = torch.zeros(len(DATA), dtype=torch.uint8)
    got = await fetch(
        [
            source(liar.address, expected, P1, make),
            source(server.address, expected, P2, make, "ucx"),
        ],
        dest,
    )
    await server.close()
    liar.close()
    # Nothing of the liar's is kept: no receipt paid for it (§9.7).
    assert dest.numpy().tobytes() == DATA and make.opened == [0, 0] and got.providers == (P2,)
    assert [f.code for f in got.faults] == [ErrorCode.CHUNK_HASH_MISMATCH]


async def test_wrong_and_reused_tokens_over_ucx():
    expected = expected_for(DATA)
    server = await ucx_server()
    dest = torch.zeros(len(DATA), dtype=torch.uint8)
    with pytest.raises(FetchMiss) as miss:
        await fetch(
            [source(server.address, expected, P1, transfer_maker(token=b"\x00" * 32), "ucx")], dest
        )
    assert miss.value.faults[0].code == ErrorCode.BAD_TOKEN
    await fetch([source(server.address, expected, P1, transfer_maker(), "ucx")], dest)
    with pytest.raises(FetchMiss) as miss:
        await fetch([source(server.address, expected, P1, transfer_maker(), "ucx")], dest)
    assert miss.value.faults[0].code == ErrorCode.BAD_TOKEN
    await server.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU placement untested")
async def test_a_payload_lands_in_gpu_memory_over_ucx():
    server = await ucx_server()
    dest = torch.zeros(len(DATA), dtype=torch.uint8, device="cuda")
    await fetch([source(server.address, expected_for(DATA), P1, transfer_maker(), "ucx")], dest)
    await server.close()
    assert dest.cpu().numpy().tobytes() == DATA


async def test_a_windowed_stream_is_paid_window_by_window_over_ucx():
    expected = dataclasses.replace(expected_for(DATA), window=2, price=6_000)
    receipts = []
    server = await ucx_server(expected=expected, on_receipt=receipts.append)
    pay = payer(expected)
    dest = torch.zeros(len(DATA), dtype=torch.uint8)
    await fetch([source(server.address, expected, P1, transfer_maker(), "ucx", pay)], dest)
    await server.close()
    assert dest.numpy().tobytes() == DATA
    assert pay.paid == [2 * CHUNK, 4 * CHUNK]
    assert [r.message.bytes for r in receipts] == [2 * CHUNK, 4 * CHUNK]


async def test_a_wrong_receipt_over_ucx_gets_one_window():
    expected = dataclasses.replace(expected_for(DATA), window=1, price=6_000)
    server = await ucx_server(expected=expected)
    dest = torch.zeros(len(DATA), dtype=torch.uint8)
    pay = payer(expected, price_off=1)
    with pytest.raises(FetchMiss):
        await fetch(
            [source(server.address, expected, P1, transfer_maker(), "ucx", pay)], dest, timeout_s=5
        )
    await server.close()
    assert pay.paid == [CHUNK]


async def test_a_payload_is_received_scattered_over_ucx():
    from kvx.transport import ScatterDestination

    deliver = 4 * CHUNK + 777
    expected = expected_for(DATA, deliver)
    server = await ucx_server(expected=expected)
    place, payload_of, _ = scattered(deliver)
    await fetch(
        [source(server.address, expected, P1, transfer_maker(), "ucx")],
        lambda e: ScatterDestination(e, place),
    )
    await server.close()
    assert payload_of() == DATA[:deliver]
