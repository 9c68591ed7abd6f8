"""Node ids, model fingerprints, namespaces and the prefix chain."""

import dataclasses

import numpy as np
import pytest
import torch

from kvx.protocol import (
    PUBLIC,
    ErrorCode,
    KVLayout,
    LocalProtocolError,
    ModelFingerprint,
    Namespace,
    chain_extend,
    chain_seed,
    node_id,
    prefix_chain,
)

LAYOUT = KVLayout(dtype="bfloat16", layers=4, kv_heads=2, head_dim=16, block=8)
FP = ModelFingerprint(
    model_id="org/model",
    revision="main",
    weights_hash=b"",
    tokenizer_hash=b"\x11" * 32,
    positional="rope;theta=10000;scaling=none",
    layout=LAYOUT,
)
SECRET = b"\x42" * 32


def test_every_fingerprint_field_changes_the_digest():
    variants = [
        dataclasses.replace(FP, model_id="org/other"),
        dataclasses.replace(FP, revision="v2"),
        dataclasses.replace(FP, weights_hash=b"\x01" * 32),
        dataclasses.replace(FP, tokenizer_hash=b"\x12" * 32),
        dataclasses.replace(FP, positional="rope;theta=500000;scaling=none"),
    ] + [
        dataclasses.replace(FP, layout=dataclasses.replace(LAYOUT, **change))
        for change in (
            {"dtype": "float16"},
            {"layers": 5},
            {"kv_heads": 4},
            {"head_dim": 32},
            {"block": 16},
        )
    ]
    digests = {v.digest() for v in variants} | {FP.digest()}
    assert len(digests) == len(variants) + 1


def test_field_boundaries_are_unambiguous():
    # Length prefixes keep "ab"+"c" and "a"+"bc" apart.
    a = dataclasses.replace(FP, model_id="ab", revision="c")
    b = dataclasses.replace(FP, model_id="a", revision="bc")
    assert a.digest() != b.digest()


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": ""},
        {"weights_hash": b"\x00" * 31},
        {"revision": "", "weights_hash": b""},
        {"tokenizer_hash": b""},
        {"positional": ""},
    ],
)
def test_incomplete_fingerprints_are_refused(change):
    with pytest.raises(LocalProtocolError) as err:
        dataclasses.replace(FP, **change).digest()
    assert err.value.code == ErrorCode.INVALID_FIELD


def test_node_id_needs_a_32_byte_key():
    assert len(node_id(b"\x00" * 32)) == 32
    with pytest.raises(LocalProtocolError):
        node_id(b"\x00" * 31)


def test_chain_of_a_prefix_is_a_prefix_of_the_chain():
    fp = FP.digest()
    full = prefix_chain(fp, list(range(100)), 8)
    assert len(full) == 12  # 100 tokens: 12 whole blocks, the last 4 tokens unnamed
    assert prefix_chain(fp, list(range(40)), 8) == full[:5]
    assert prefix_chain(fp, list(range(7)), 8) == []


def test_one_changed_token_changes_its_block_and_every_later_one():
    fp = FP.digest()
    tokens = list(range(64))
    base = prefix_chain(fp, tokens, 8)
    tokens[20] += 1
    changed = prefix_chain(fp, tokens, 8)
    assert changed[:2] == base[:2]
    assert all(a != b for a, b in zip(changed[2:], base[2:], strict=True))


def test_streaming_extension_equals_whole_chain():
    fp = FP.digest()
    whole = prefix_chain(fp, list(range(64)), 8)
    first = chain_extend(chain_seed(fp), list(range(24)), 8)
    rest = chain_extend(first[-1], list(range(24, 64)), 8)
    assert first + rest == whole


def test_token_containers_agree():
    fp = FP.digest()
    ids = list(range(1000, 1064))
    expect = prefix_chain(fp, ids, 8)
    assert prefix_chain(fp, np.array(ids, dtype=np.int64), 8) == expect
    assert prefix_chain(fp, torch.tensor(ids), 8) == expect


def test_private_namespace_chains_differ_and_need_the_secret():
    fp = FP.digest()
    tokens = list(range(32))
    public = prefix_chain(fp, tokens, 8)
    private = prefix_chain(fp, tokens, 8, Namespace(SECRET))
    other = prefix_chain(fp, tokens, 8, Namespace(b"\x43" * 32))
    assert not set(public) & set(private)
    assert not set(private) & set(other)
    assert Namespace(SECRET).id not in (None, SECRET)
    assert PUBLIC.id is None


@pytest.mark.parametrize(
    "tokens",
    [[-1] * 8, [2**32] * 8, [0.5] * 8, [[1, 2]] * 8],
)
def test_bad_tokens_are_refused(tokens):
    with pytest.raises(LocalProtocolError):
        prefix_chain(FP.digest(), tokens, 8)


def test_chain_arguments_are_checked():
    fp = FP.digest()
    with pytest.raises(LocalProtocolError):
        chain_extend(chain_seed(fp), list(range(10)), 8)  # not whole blocks
    with pytest.raises(LocalProtocolError):
        chain_seed(fp[:31])
    with pytest.raises(LocalProtocolError):
        prefix_chain(fp, list(range(16)), 0)
    with pytest.raises(LocalProtocolError):
        Namespace(b"short")
