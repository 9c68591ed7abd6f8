"""Checking bought KV against the buyer's own model before anything reads it.

A signature and a content root prove whose bytes these are, not that they are the KV of
the buyer's tokens. Two checks close that gap, both computed with the buyer's weights:

- **layer 0, every position.** Layer-0 keys and values depend only on a token and its
  position, so the buyer recomputes them from its own token ids and compares, with the
  model's own code: its parts directly where they give the forward's bytes exactly
  (Llama-family models, without the query projection), else its forward stopped at the
  first layer's cache write, whatever the architecture.
- **deep spot checks.** K positions drawn from the buyer's secret randomness are run as
  one extra batch of query tokens over the bought cache, each with its own position id
  and a mask that lets it see only the bought positions before it and itself. Honest KV
  gives back, at every layer, what the cache holds at those positions; KV that is not
  the model's continuation of the bought prefix does not.

Honest KV differs a little by kernel, batch shape, thread count and engine; the
thresholds below sit between the honest and the dishonest differences measured by
`bench/verify.py` (docs/RELIABILITY.md has both distributions).
"""

from __future__ import annotations

import random
import secrets
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvx.p2p import Refusal
from kvx.protocol import KVLayout
from kvx.trust import Bound, VerifyPolicy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LAYER0_TOLERANCE = 1e-3
"""Largest relative error of one position's layer-0 keys or values that passes, when the
KV was computed, sent and checked in float32."""
DEEP_TOLERANCE = 2e-2
"""Largest relative error of a spot-checked position's keys or values at a deeper layer,
likewise in float32."""
COARSE_TOLERANCES = (3e-2, 0.25)
"""(layer 0, deep) when any of the three is a 16-bit type: the KV computed in float32 and
converted for a bfloat16 model differs from that model's own by bfloat16 rounding, which
grows through the layers."""
SPOT_BATCH = 512
"""Positions recomputed in one forward by `full` (bounds the mask and the activations)."""


@dataclass(frozen=True)
class Finding:
    """Where bought KV disagrees with the buyer's model: the check, the layer, the
    position (token index in the prompt), K or V, and by how much."""

    check: str  # "layer0" or "deep"
    layer: int
    position: int
    kv: str  # "k" or "v"
    error: float
    tolerance: float

    def __str__(self) -> str:
        return (
            f"{self.check} check: layer {self.layer} position {self.position} {self.kv} "
            f"differs by {self.error:.3g} (tolerance {self.tolerance:.3g})"
        )


def relative_errors(bought: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """Per position, ‖bought - mine‖ / ‖mine‖ over every head and element, for tensors of
    shape [heads, positions, head_dim]; NaN and infinities count as infinitely wrong."""
    a, b = bought.float(), mine.float()
    diff = (a - b).square().sum(dim=(0, 2)).sqrt()
    scale = b.square().sum(dim=(0, 2)).sqrt().clamp_min(1e-6)
    err = diff / scale
    return torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))


def tolerances(*dtypes: torch.dtype) -> tuple[float, float]:
    """(layer 0, deep) tolerances for KV computed, delivered and checked in these types."""
    if all(d == torch.float32 for d in dtypes):
        return LAYER0_TOLERANCE, DEEP_TOLERANCE
    return COARSE_TOLERANCES


def _worst(
    check: str, layer: int, positions: Sequence[int], errs: dict[str, torch.Tensor], tol: float
) -> Finding | None:
    for kv, err in errs.items():
        bad = int(err.argmax())
        if float(err[bad]) > tol:
            return Finding(check, layer, positions[bad], kv, float(err[bad]), tol)
    return None


class _Layer0Reached(Exception):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values


def layer0_kv(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own layer-0 keys and values of `ids` ([1, n]), [1, kv_heads, n, dim].

    Where the model's parts are those of the Llama family (embedding, the first layer's
    input norm, k/v projections, an optional key norm, its module's rotary function) and
    computing with them gives bit for bit what the model's own forward writes (checked
    once per model), they are used directly: the query projection, most of layer 0's
    cost, is then never computed. Otherwise the forward runs to its first cache write.
    """
    direct = _DIRECT.get(model)
    if direct is None:
        direct = _DIRECT[model] = _direct_is_exact(model)
    with torch.no_grad():
        return _direct_kv(model, ids) if direct else _forward_kv(model, ids)


_DIRECT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward_kv(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward, stopped at the first layer's cache write."""
    from transformers import DynamicCache

    class Stop(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args: Any, **kwargs: Any):
            raise _Layer0Reached(key_states, value_states)

    try:
        model(ids.to(model.device), past_key_values=Stop(), use_cache=True)
    except _Layer0Reached as reached:
        return reached.keys, reached.values
    raise RuntimeError("the model wrote no KV cache")


def _direct_kv(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    base = model.model
    attn = base.layers[0].self_attn
    ids = ids.to(model.device)
    hidden = base.layers[0].input_layernorm(base.embed_tokens(ids))
    positions = torch.arange(ids.shape[-1], device=ids.device)[None]
    cos, sin = base.rotary_emb(hidden, position_ids=positions)
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(hidden).view(shape)
    if hasattr(attn, "k_norm"):
        keys = attn.k_norm(keys)
    keys = keys.transpose(1, 2)
    values = attn.v_proj(hidden).view(shape).transpose(1, 2)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    _, keys = rotate(keys, keys, cos, sin)
    return keys, values


def _direct_is_exact(model: PreTrainedModel) -> bool:
    probe = torch.arange(1, 17)[None] % model.config.vocab_size
    with torch.no_grad():
        try:
            mine = _direct_kv(model, probe)
        except Exception:  # another architecture: its parts are not these
            return False
        theirs = _forward_kv(model, probe)
    return all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def check_layer0(
    model: PreTrainedModel,
    ids: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tolerance: float = LAYER0_TOLERANCE,
) -> Finding | None:
    """Compare bought layer-0 keys and values ([1, heads, ≥n, dim]) at every position of
    `ids` ([1, n]) with the model's own."""
    n = ids.shape[-1]
    mine_k, mine_v = layer0_kv(model, ids)
    errs = {
        "k": relative_errors(keys[0, :, :n], mine_k[0].to(keys.dtype)),
        "v": relative_errors(values[0, :, :n], mine_v[0].to(values.dtype)),
    }
    return _worst("layer0", 0, range(n), errs, tolerance)


def draw_positions(n: int, k: int, rng: random.Random | None = None) -> list[int]:
    """K distinct positions of n, from the buyer's own secret randomness unless an rng is
    given (benchmarks and tests seed one)."""
    rng = rng or secrets.SystemRandom()
    return sorted(rng.sample(range(n), min(k, n)))


def spot_errors(
    model: PreTrainedModel,
    ids: torch.Tensor,
    cache: Any,
    bought: int,
    positions: Sequence[int],
) -> list[dict[str, torch.Tensor]]:
    """Recompute the KV of `positions` at every layer from the bought cache before each,
    in one forward; per layer, the relative errors of what the cache holds there.

    `cache` is a StaticCache holding the bought KV at slots [0, bought) with room for
    len(positions) more; the spots are written at [bought, bought + K) and wiped again.
    """
    k = len(positions)
    device = model.device
    pos = torch.tensor(positions, device=device)
    slots = torch.arange(bought, bought + k, device=device)
    capacity = cache.layers[0].keys.shape[2]
    if bought + k > capacity:
        raise ValueError(f"the cache has room for {capacity - bought} spots, not {k}")
    # Spot i sees the bought positions before it and its own slot, nothing else.
    columns = torch.arange(capacity, device=device)
    mask = (columns[None, :] < pos[:, None]) | (columns[None, :] == slots[:, None])
    dtype = cache.layers[0].keys.dtype
    additive = torch.zeros(mask.shape, dtype=dtype, device=device)
    additive.masked_fill_(~mask, torch.finfo(dtype).min)
    try:
        with torch.no_grad():
            model(
                ids[:, pos].to(device),
                position_ids=pos[None, :],
                cache_position=slots,
                attention_mask=additive[None, None],
                past_key_values=cache,
                use_cache=True,
            )
        return [
            {
                "k": relative_errors(held.keys[0, :, pos], held.keys[0, :, bought : bought + k]),
                "v": relative_errors(
                    held.values[0, :, pos], held.values[0, :, bought : bought + k]
                ),
            }
            for held in cache.layers
        ]
    finally:
        for held in cache.layers:
            held.keys[:, :, bought : bought + k].zero_()
            held.values[:, :, bought : bought + k].zero_()
            held.cumulative_length.fill_(bought)


def check_spots(
    model: PreTrainedModel,
    ids: torch.Tensor,
    cache: Any,
    bought: int,
    positions: Sequence[int],
    tolerance: float = DEEP_TOLERANCE,
) -> Finding | None:
    """The first layer and spot whose recomputed KV differs from the cache's (spot_errors)
    by more than `tolerance`, or None."""
    for layer, errs in enumerate(spot_errors(model, ids, cache, bought, positions)):
        found = _worst("deep", layer, positions, errs, tolerance)
        if found is not None:
            return found
    return None


def check_cache(
    model: PreTrainedModel,
    ids: torch.Tensor,
    cache: Any,
    bought: int,
    policy: VerifyPolicy,
    *,
    computed: torch.dtype = torch.float32,
    rng: random.Random | None = None,
) -> Finding | None:
    """Run the checks `policy` names on a StaticCache holding `bought` positions of `ids`
    (KV `computed` in the dtype its fingerprint names); the first disagreement found, or
    None when the KV is the model's own."""
    if not policy.enabled:
        return None
    rng = rng or secrets.SystemRandom()
    first = cache.layers[0]
    shallow, deep = tolerances(computed, first.keys.dtype, model.dtype)
    found = check_layer0(model, ids[:, :bought], first.keys, first.values, shallow)
    if found is not None or not (policy.full or policy.spots):
        return found
    if policy.full:
        step = min(SPOT_BATCH, first.keys.shape[2] - bought)
        for start in range(0, bought, step):
            spots = range(start, min(bought, start + step))
            found = check_spots(model, ids, cache, bought, spots, deep)
            if found is not None:
                return found
        return None
    if rng.randrange(policy.every):
        return None  # not this purchase's turn for the deep part
    spots = draw_positions(bought, policy.spots, rng)
    return check_spots(model, ids, cache, bought, spots, deep)


def room_for(policy: VerifyPolicy) -> int:
    """Free cache slots the checks of `policy` write their spots into."""
    return SPOT_BATCH if policy.full else policy.spots


def static_cache(model: PreTrainedModel, layout: KVLayout, payload: torch.Tensor, room: int):
    """A StaticCache holding a block-major payload (spec §7.4), with `room` free slots
    after it: what the vLLM connector checks a purchase in before it pages it in."""
    from transformers import StaticCache

    blocks = payload.numel() // layout.block_bytes
    tokens = blocks * layout.block
    L, H, B, D = layout.layers, layout.kv_heads, layout.block, layout.head_dim
    kv = payload.view(getattr(torch, layout.dtype)).view(blocks, L, 2, H, B, D)
    cache = StaticCache(config=model.config, max_cache_len=tokens + room)
    for layer_index, layer in enumerate(cache.layers):
        both = kv[:, layer_index].permute(1, 2, 0, 3, 4).reshape(2, 1, H, tokens, D)
        k = torch.zeros((1, H, tokens + room, D), dtype=kv.dtype, device=model.device)
        v = torch.zeros_like(k)
        k[:, :, :tokens] = both[0]
        v[:, :, :tokens] = both[1]
        install(layer, k, v, tokens)
    return cache


def install(layer: Any, keys: torch.Tensor, values: torch.Tensor, tokens: int) -> None:
    """Make a StaticCache layer use these tensors, holding `tokens` positions."""
    layer.keys, layer.values = keys, values
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.batch_size, layer.num_heads = 1, keys.shape[1]
    layer.k_head_dim = layer.v_head_dim = keys.shape[-1]
    layer.cumulative_length = torch.tensor(tokens, dtype=torch.int64, device=keys.device)
    layer.is_initialized = True


def refusal(finding: Finding | None, ids: torch.Tensor) -> Refusal | None:
    """What the client is told of a finding: a layer-0 lie carries its position and the
    token ids, from which the client builds evidence (trust.Evidence)."""
    if finding is None:
        return None
    position = finding.position if finding.check == "layer0" else None
    return Refusal(finding.check, str(finding), position, tuple(ids.reshape(-1).tolist()))


def judge(model: PreTrainedModel, bound: Bound) -> Finding | None:
    """A holder of the weights' verdict on evidence that bound (trust.bind): the layer-0
    keys and values the seller's root commits it to at one position, against the model's
    own. A Finding convicts the seller; None shows the accusation false."""
    layout, p = bound.layout, bound.position
    mine_k, mine_v = layer0_kv(model, torch.tensor([bound.tokens[: p + 1]]))
    dtype = getattr(torch, layout.dtype)
    shape = (layout.kv_heads, 1, layout.head_dim)
    errs = {
        name: relative_errors(
            torch.frombuffer(bytearray(raw), dtype=dtype).view(shape).to(mine.device),
            mine[0, :, p : p + 1].to(dtype),
        )
        for name, raw, mine in (("k", bound.keys, mine_k), ("v", bound.values, mine_v))
    }
    shallow, _ = tolerances(dtype, model.dtype)
    return _worst("layer0", 0, [p], errs, shallow)
