"""The KV payload layout (spec §7.4): how a cache's tensors become the bytes that are hashed.

The payload is block-major: block 0 of every layer, then block 1, and so on. A prefix of
m blocks is therefore the first m x block_bytes bytes of the payload, so one content root
covers every prefix a seller can be asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._limits import MAX_BLOCK_TOKENS
from ._schema import Invalid, OneOf, UInt, wire

DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
"""KV element types a payload may hold, with their sizes in bytes (little-endian)."""

LAYOUT_NAME = "kvx-block-major/1"


@dataclass(frozen=True)
class KVLayout:
    """Shape of one block of KV: [layers][K, V][kv_heads][block tokens][head_dim]."""

    dtype: str = wire(OneOf(tuple(DTYPE_SIZES)))
    layers: int = wire(UInt(1, 1024))
    kv_heads: int = wire(UInt(1, 1024))
    head_dim: int = wire(UInt(1, 4096))
    block: int = wire(UInt(1, MAX_BLOCK_TOKENS))

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.block * self.head_dim * self.itemsize

    def payload_bytes(self, blocks: int) -> int:
        return blocks * self.block_bytes

    def check(self) -> None:
        if self.block_bytes > 1 << 40:
            raise Invalid("block", f"one block would be {self.block_bytes} bytes (limit 2^40)")
