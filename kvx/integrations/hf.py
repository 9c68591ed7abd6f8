"""Hugging Face transformers: publish the KV cache of a prompt, buy one straight into a
preallocated cache (BoughtCache), and generate with the exchange, falling back to a local
prefill on a miss (extra `hf`).

The payload layout is the spec's block-major one (§7.4): for each block, for each layer,
K then V of shape [kv_heads, block, head_dim]. A bought prefix always leaves at least one
prompt token uncached, so `generate` has a token to run and returns the same tokens a
full prefill would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3
import torch

from kvx.p2p import Bought, Miss, PeerClient
from kvx.protocol import (
    DEFAULT_BLOCK_TOKENS,
    KVLayout,
    ModelFingerprint,
    Namespace,
    byte_view,
    prefix_chain,
)
from kvx.transport import ScatterDestination

if TYPE_CHECKING:
    from transformers import Cache, DynamicCache, PreTrainedModel


def tokenizer_hash(tokenizer: Any) -> bytes:
    """BLAKE3 of the tokenizer's vocabulary and special tokens: equal ids mean equal text."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    return blake3.blake3(json.dumps([vocab, special]).encode()).digest()


def weights_hash(model: PreTrainedModel) -> bytes:
    """BLAKE3 over every parameter, by name: the exact weights that computed the KV."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(byte_view(tensor.detach().to("cpu").contiguous()))
    return h.digest()


def fingerprint(
    model: PreTrainedModel,
    tokenizer_digest: bytes,
    *,
    block: int = DEFAULT_BLOCK_TOKENS,
    model_id: str | None = None,
) -> ModelFingerprint:
    """The spec's model fingerprint (§7.2) for a loaded model and its tokenizer."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", None),
        "rope_type": "default",
    }
    positional = "rope;" + ";".join(f"{k}={rope[k]}" for k in sorted(rope))
    layout = KVLayout(
        dtype=str(model.dtype).removeprefix("torch."),
        layers=config.num_hidden_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block=block,
    )
    return ModelFingerprint(
        model_id=model_id or getattr(config, "_name_or_path", "") or type(model).__name__,
        revision="",
        weights_hash=weights_hash(model),
        tokenizer_hash=tokenizer_digest,
        positional=positional,
        layout=layout,
    )


def pack(cache: DynamicCache, layout: KVLayout, blocks: int) -> torch.Tensor:
    """The block-major payload of the first `blocks` blocks of a cache, as uint8."""
    tokens = blocks * layout.block
    keys = torch.stack([layer.keys[0, :, :tokens] for layer in cache.layers])
    values = torch.stack([layer.values[0, :, :tokens] for layer in cache.layers])
    kv = torch.stack([keys, values], dim=1)  # [L, 2, H, T, D]
    L, _, H, _, D = kv.shape
    kv = kv.reshape(L, 2, H, blocks, layout.block, D).permute(3, 0, 1, 2, 4, 5)
    return kv.contiguous().to("cpu").view(torch.uint8).reshape(-1)


class BoughtCache:
    """A StaticCache whose layers are allocated up front, for the prompt and what will be
    generated after it, so that a bought payload is received straight into them — one
    copy, from the socket to the memory attention reads — and the first forward extends
    them in place instead of concatenating a copy of the prefix.

    The wire is block-major (spec §7.4): block, layer, K then V, head, token, element.
    For a fixed (layer, K or V, head) the tokens of one block are contiguous in a
    [1, heads, capacity, head_dim] tensor, so every such piece of the payload lands in
    place; `place` maps payload bytes to those pieces.
    """

    def __init__(self, model: PreTrainedModel, layout: KVLayout, capacity: int) -> None:
        from transformers import StaticCache

        self.layout = layout
        self.capacity = capacity
        from transformers.cache_utils import StaticLayer

        self.cache = StaticCache(config=model.config, max_cache_len=capacity)
        if len(self.cache.layers) != layout.layers:
            raise ValueError(f"the model has {len(self.cache.layers)} layers, not {layout.layers}")
        if any(type(layer) is not StaticLayer for layer in self.cache.layers):
            raise ValueError("only full-attention layers can take a bought prefix in place")
        shape = (1, layout.kv_heads, capacity, layout.head_dim)
        dtype = getattr(torch, layout.dtype)
        self.kv = [
            [torch.empty(shape, dtype=dtype, device=model.device) for _ in "kv"]
            for _ in range(layout.layers)
        ]
        self._heads = [
            [[byte_view(t[0, h]) for h in range(layout.kv_heads)] for t in kv] for kv in self.kv
        ]
        self._piece = layout.block * layout.head_dim * layout.itemsize

    def place(self, start: int, stop: int) -> list[memoryview]:
        """The memory that payload bytes [start, stop) land in, in order."""
        layout, size = self.layout, self._piece
        per_block = 2 * layout.layers * layout.kv_heads
        pieces = []
        while start < stop:
            index, offset = divmod(start, size)
            block, rest = divmod(index, per_block)
            layer, rest = divmod(rest, 2 * layout.kv_heads)
            kv, head = divmod(rest, layout.kv_heads)
            n = min(size - offset, stop - start)
            at = block * size + offset
            pieces.append(self._heads[layer][kv][head][at : at + n])
            start += n
        return pieces

    def ready(self, tokens: int):
        """The cache, holding `tokens` verified tokens, for `generate` or a forward."""
        for layer, (k, v) in zip(self.cache.layers, self.kv, strict=True):
            k[:, :, tokens:].zero_()  # attention masks them, but NaN * 0 would still be NaN
            v[:, :, tokens:].zero_()
            layer.keys, layer.values = k, v
            layer.dtype, layer.device = k.dtype, k.device
            layer.batch_size, layer.num_heads = 1, k.shape[1]
            layer.k_head_dim = layer.v_head_dim = k.shape[-1]
            layer.cumulative_length = torch.tensor(tokens, dtype=torch.int64, device=k.device)
            layer.is_initialized = True
        return self.cache


def _chain(fp: ModelFingerprint, ids: torch.Tensor, ns: Namespace) -> list[bytes]:
    return prefix_chain(fp.digest(), ids.reshape(-1).tolist(), fp.layout.block, ns)


async def publish_prompt(
    client: PeerClient,
    model: PreTrainedModel,
    fp: ModelFingerprint,
    input_ids: torch.Tensor,
    *,
    cache: DynamicCache | None = None,
    namespace: Namespace | None = None,
) -> tuple[bytes, int]:
    """Prefill (unless a cache is given) and sell the KV of every whole block of the prompt.

    Returns the content root and the number of tokens published.
    """
    ns = namespace or Namespace()
    chain = _chain(fp, input_ids, ns)
    if not chain:
        raise ValueError(f"the prompt is shorter than one {fp.layout.block}-token block")
    if cache is None:
        with torch.no_grad():
            cache = model(input_ids, use_cache=True).past_key_values
    payload = pack(cache, fp.layout, len(chain))
    root = await client.publish(
        fp=fp.digest(),
        layout=fp.layout,
        blocks=chain,
        payload=payload.numpy().tobytes(),
        params=model.num_parameters(),
        ns=ns.id,
    )
    return root, len(chain) * fp.layout.block


async def fetch_prefix(
    client: PeerClient,
    model: PreTrainedModel,
    fp: ModelFingerprint,
    input_ids: torch.Tensor,
    *,
    namespace: Namespace | None = None,
    max_new_tokens: int = 256,
) -> tuple[Cache, Bought]:
    """Buy the longest prefix of the prompt, leaving at least its last token to compute,
    into a cache with room for the prompt and `max_new_tokens` more.

    Raises Miss when nothing can be bought; the caller then prefills itself.
    """
    ns = namespace or Namespace()
    chain = _chain(fp, input_ids[..., :-1], ns)  # the last token is never bought
    if not chain:
        raise Miss("the prompt is shorter than one block plus a token")
    target = BoughtCache(model, fp.layout, input_ids.shape[-1] + max_new_tokens)
    bought = await client.fetch(
        fp.digest(),
        chain,
        params=model.num_parameters(),
        namespace=ns,
        into=lambda expected: ScatterDestination(expected, target.place),
    )
    return target.ready(bought.tokens), bought


@dataclass(frozen=True)
class Outcome:
    output_ids: torch.Tensor
    bought: Bought | None  # None: prefilled locally
    miss: str | None  # why nothing was bought
    seconds: float


async def generate(
    client: PeerClient,
    model: PreTrainedModel,
    fp: ModelFingerprint,
    input_ids: torch.Tensor,
    *,
    namespace: Namespace | None = None,
    **generate_kwargs: Any,
) -> Outcome:
    """`model.generate` with the longest bought prefix, or a plain prefill on a miss."""
    start = time.monotonic()
    room = generate_kwargs.get("max_new_tokens", model.generation_config.max_new_tokens or 256)
    try:
        cache, bought = await fetch_prefix(
            client, model, fp, input_ids, namespace=namespace, max_new_tokens=room
        )
    except Miss as miss:
        out = model.generate(input_ids, **generate_kwargs)
        return Outcome(out, None, str(miss), time.monotonic() - start)
    out = model.generate(input_ids, past_key_values=cache, **generate_kwargs)
    return Outcome(out, bought, None, time.monotonic() - start)
