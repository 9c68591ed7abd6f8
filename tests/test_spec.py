"""spec/PROTOCOL.md's tables agree with the code: codes, types, purposes, limits."""

import re
from pathlib import Path

import kvx.conformance
from kvx.protocol import (
    DEFAULT_CHUNK_BYTES,
    MAX_ADVERT_LIFETIME_MS,
    MAX_CHAIN_BLOCKS,
    MAX_CLOCK_SKEW_MS,
    MAX_FRAME_BYTES,
    MAX_LIFETIME_MS,
    ErrorCode,
    MessageType,
)
from kvx.protocol._limits import MAX_ARRAY_ITEMS, MAX_MAP_KEYS, MAX_UNKNOWN_BYTES

SPEC = (Path(kvx.conformance.__file__).parent / "PROTOCOL.md").read_text()


def section(number: str) -> str:
    start = SPEC.index(f"\n## {number}. ")
    end = SPEC.find("\n## ", start + 1)
    return SPEC[start : end if end > 0 else None]


def test_error_code_table_matches_the_enum():
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", section("11"), re.M)
    assert [(int(n), name) for n, name in rows] == [(c.value, c.name) for c in ErrorCode]


def test_message_type_table_matches_the_enum_and_purposes():
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \| `([^`]+)` \|", section("8"), re.M)
    assert [(int(n), name, purpose) for n, name, purpose in rows] == [
        (t.value, t.name, t.purpose.decode()) for t in MessageType
    ]


def test_limits_table_matches_the_constants():
    table = dict(
        re.findall(r"^\| `?([A-Za-z_ ()]+?)`?(?: \([a-z]+\))? \| ([\d,]+) \|", section("13"), re.M)
    )
    numbers = {k: int(v.replace(",", "")) for k, v in table.items()}
    assert numbers["MAX_FRAME_BYTES"] == MAX_FRAME_BYTES
    assert numbers["MAX_CLOCK_SKEW_MS"] == MAX_CLOCK_SKEW_MS
    assert numbers["MAX_LIFETIME_MS"] == MAX_LIFETIME_MS
    assert numbers["MAX_ADVERT_LIFETIME_MS"] == MAX_ADVERT_LIFETIME_MS
    assert numbers["MAX_CHAIN_BLOCKS"] == MAX_CHAIN_BLOCKS
    assert numbers["MAX_MAP_KEYS"] == MAX_MAP_KEYS
    assert numbers["MAX_ARRAY_ITEMS"] == MAX_ARRAY_ITEMS
    assert numbers["MAX_UNKNOWN_BYTES"] == MAX_UNKNOWN_BYTES
    assert f"{DEFAULT_CHUNK_BYTES:,} RECOMMENDED" in section("13")
