"""The local store: tiers, bounds, eviction, restart, verification, encryption."""

import blake3
import pytest

from kvx.p2p import PublishRequest
from kvx.p2p._store import LocalStore
from kvx.protocol import IntegrityError, KVLayout
from kvx.trust import AtRestCipher

LAYOUT = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)  # 512 B/block
FP = b"\x0f" * 32


def put(store: LocalStore, label: str, blocks: int = 2):
    chain = tuple(blake3.blake3(f"{label}{i}".encode()).digest() for i in range(blocks))
    data = blake3.blake3(label.encode()).digest(length=LAYOUT.payload_bytes(blocks))
    entry, evicted = store.put(PublishRequest(FP, LAYOUT, chain, data, chunk=1 << 16))
    return entry, evicted, data


def test_round_trip_and_prefix_match(tmp_path):
    store = LocalStore(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    entry, _, data = put(store, "doc", blocks=3)
    assert store.get(entry.root).data == data
    chain = (*entry.blocks[:2], b"\x00" * 32)
    assert store.best_match(FP, None, chain) == (2, entry)
    assert store.best_match(FP, b"\x01" * 32, chain) == (0, None)


def test_disk_bound_evicts_the_least_used(tmp_path):
    store = LocalStore(tmp_path, memory_bytes=1 << 20, disk_bytes=2048)
    first, _, _ = put(store, "first")  # 1024 bytes
    second, _, _ = put(store, "second")
    store.get(first.root)  # first is now the more recently used
    third, evicted, _ = put(store, "third")
    assert [e.root for e in evicted] == [second.root]
    assert {e.root for e in store.entries()} == {first.root, third.root}


def test_memory_tier_is_bounded_and_disk_keeps_the_rest(tmp_path):
    store = LocalStore(tmp_path, memory_bytes=1024, disk_bytes=1 << 20)
    first, _, data = put(store, "first")
    put(store, "second")  # pushes first out of memory, not off disk
    assert store.get(first.root).data == data


def test_the_store_survives_a_restart_and_corruption_is_caught(tmp_path):
    store = LocalStore(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    good, _, data = put(store, "good")
    bad, _, _ = put(store, "bad")
    store.close()
    path = tmp_path / f"{bad.root.hex()}.kv"
    raw = bytearray(path.read_bytes())
    raw[7] ^= 1
    path.write_bytes(bytes(raw))
    again = LocalStore(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    assert again.get(good.root).data == data
    with pytest.raises(IntegrityError):
        again.get(bad.root)
    assert [e.root for e in again.entries()] == [good.root]  # the corrupt one is gone


def test_encrypted_at_rest(tmp_path):
    cipher = AtRestCipher.from_key_file(tmp_path / "k")
    store = LocalStore(tmp_path / "s", memory_bytes=0, disk_bytes=1 << 20, cipher=cipher)
    entry, _, data = put(store, "secret")
    assert data[:32] not in (tmp_path / "s" / f"{entry.root.hex()}.kv").read_bytes()
    assert store.get(entry.root).data == data


def test_a_payload_of_the_wrong_size_is_refused(tmp_path):
    store = LocalStore(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    with pytest.raises(ValueError):
        store.put(PublishRequest(FP, LAYOUT, (b"\x00" * 32,), b"x" * 10))
