"""Prices in micro-credits, from the compute a buyer avoids and the bytes it moves.

Both sides estimate the same prefill FLOPs for the matched tokens: the seller asks a
share of that value plus a price for the bytes; the buyer bids at most a share of what
the prefill would cost it. With the defaults the two meet, so deals clear, yet neither
side gives more than half the saving away.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvx.protocol import KVLayout


def prefill_flops(params: int, layout: KVLayout, tokens: int) -> float:
    """Dense matmuls (2·P·T) plus causal attention over the KV width (2·L·T²·kv_dim).

    It counts the KV heads only, so for grouped-query attention it is a lower bound.
    """
    kv_dim = layout.kv_heads * layout.head_dim
    return 2.0 * params * tokens + 2.0 * layout.layers * tokens * tokens * kv_dim


@dataclass(frozen=True)
class PricePolicy:
    ucr_per_gflop: float = 1.0
    ucr_per_mib: float = 1.0
    ask_share: float = 0.25  # of the compute value, on top of the bytes
    floor: float = 0.5  # a seller comes down to this fraction of its ask, no lower
    bid_share: float = 0.5  # a buyer pays at most this fraction of its own prefill

    def value(self, params: int, layout: KVLayout, tokens: int) -> float:
        return prefill_flops(params, layout, tokens) / 1e9 * self.ucr_per_gflop

    def ask(self, params: int, layout: KVLayout, tokens: int, nbytes: int) -> int:
        compute = self.ask_share * self.value(params, layout, tokens)
        return max(1, round(compute + nbytes / 2**20 * self.ucr_per_mib))

    def lowest(self, ask: int) -> int:
        return max(1, round(ask * self.floor))

    def bid(self, params: int, layout: KVLayout, tokens: int) -> int:
        return max(1, round(self.bid_share * self.value(params, layout, tokens)))
