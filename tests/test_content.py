"""Chunking and content roots, whole and streamed; tensors hashed in place."""

import blake3
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvx.protocol import (
    ContentHasher,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    byte_view,
    chunk_count,
    chunk_hashes,
    content_root,
    verify_chunk_list,
)

CHUNK = 1 << 16
PAYLOAD = blake3.blake3(b"payload").digest(length=5 * CHUNK + 123)


def test_chunk_hashes_are_blake3_of_each_chunk():
    hashes = chunk_hashes(PAYLOAD, CHUNK)
    assert len(hashes) == chunk_count(len(PAYLOAD), CHUNK) == 6
    assert hashes[5] == blake3.blake3(PAYLOAD[5 * CHUNK :]).digest()


@given(st.lists(st.integers(0, 3 * CHUNK), max_size=12))
def test_streamed_root_equals_whole_root(cuts):
    hasher = ContentHasher(CHUNK)
    start = 0
    for cut in sorted(cuts):
        hasher.update(PAYLOAD[start:cut])
        start = max(start, cut)
    hasher.update(PAYLOAD[start:])
    whole = chunk_hashes(PAYLOAD, CHUNK)
    assert hasher.finish() == content_root(len(PAYLOAD), CHUNK, whole)
    assert hasher.hashes == whole


def test_root_binds_size_chunk_size_and_order():
    hashes = chunk_hashes(PAYLOAD, CHUNK)
    root = content_root(len(PAYLOAD), CHUNK, hashes)
    assert content_root(len(PAYLOAD) - 1, CHUNK, hashes) != root
    swapped = [hashes[1], hashes[0], *hashes[2:]]
    assert content_root(len(PAYLOAD), CHUNK, swapped) != root
    assert content_root(len(PAYLOAD), 2 * CHUNK, chunk_hashes(PAYLOAD, 2 * CHUNK)) != root


def test_verify_chunk_list():
    hashes = chunk_hashes(PAYLOAD, CHUNK)
    root = content_root(len(PAYLOAD), CHUNK, hashes)
    verify_chunk_list(root, len(PAYLOAD), CHUNK, hashes)
    tampered = [bytes([hashes[0][0] ^ 1]) + hashes[0][1:], *hashes[1:]]
    for bad in (tampered, hashes[:-1], [*hashes, hashes[0]]):
        with pytest.raises(RemoteProtocolError) as err:
            verify_chunk_list(root, len(PAYLOAD), CHUNK, bad)
        assert err.value.code == ErrorCode.ROOT_MISMATCH


@pytest.mark.parametrize("chunk", [0, 1000, 1 << 15, 3 << 16, 1 << 27])
def test_chunk_size_must_be_a_power_of_two_in_range(chunk):
    with pytest.raises(LocalProtocolError):
        chunk_hashes(PAYLOAD, chunk)


def test_empty_payload_has_no_root():
    with pytest.raises(LocalProtocolError):
        content_root(0, CHUNK, [])


def test_tensor_bytes_are_hashed_without_a_copy():
    t = torch.arange(3 * CHUNK, dtype=torch.bfloat16)
    view = byte_view(t)
    assert len(view) == t.numel() * 2
    # The view aliases the tensor's storage: a write through the tensor shows in it.
    t[0] = 7.0
    assert bytes(view[:2]) == t[:1].view(torch.uint8).numpy().tobytes()
    assert np.shares_memory(np.asarray(view), t.view(torch.uint8).numpy())
    assert chunk_hashes(t, CHUNK) == chunk_hashes(bytes(view), CHUNK)


def test_non_contiguous_tensor_is_refused():
    t = torch.zeros(64, 64, dtype=torch.float16).t()
    with pytest.raises(LocalProtocolError):
        byte_view(t)
