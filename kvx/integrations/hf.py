"""Hugging Face transformers: publish the KV cache of a prompt, buy one into a DynamicCache,
and generate with the exchange, falling back to a local prefill on a miss (extra `hf`).

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

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel


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


def unpack(
    payload: torch.Tensor, layout: KVLayout, blocks: int, model: PreTrainedModel
) -> DynamicCache:
    """A DynamicCache holding a bought block-major payload, on the model's device and dtype."""
    from transformers import DynamicCache

    t = payload.view(getattr(torch, layout.dtype)).reshape(
        blocks, layout.layers, 2, layout.kv_heads, layout.block, layout.head_dim
    )
    t = t.permute(1, 2, 3, 0, 4, 5).reshape(
        layout.layers, 2, layout.kv_heads, blocks * layout.block, layout.head_dim
    )
    cache = DynamicCache(config=model.config)
    for layer in range(layout.layers):
        k, v = (t[layer, i].unsqueeze(0).to(model.device, model.dtype) for i in (0, 1))
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache


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
) -> tuple[DynamicCache, Bought]:
    """Buy the longest prefix of the prompt, leaving at least its last token to compute.

    Raises Miss when nothing can be bought; the caller then prefills itself.
    """
    ns = namespace or Namespace()
    chain = _chain(fp, input_ids[..., :-1], ns)  # the last token is never bought
    if not chain:
        raise Miss("the prompt is shorter than one block plus a token")
    bought = await client.fetch(
        fp.digest(), chain, params=model.num_parameters(), namespace=ns, device=str(model.device)
    )
    return unpack(bought.tensor, bought.layout, bought.blocks, model), bought


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
    try:
        cache, bought = await fetch_prefix(client, model, fp, input_ids, namespace=namespace)
    except Miss as miss:
        out = model.generate(input_ids, **generate_kwargs)
        return Outcome(out, None, str(miss), time.monotonic() - start)
    out = model.generate(input_ids, past_key_values=cache, **generate_kwargs)
    return Outcome(out, bought, None, time.monotonic() - start)
