"""KV that lies: what a seller could serve under the chain of a document D, computed with
a real model, one function per attack class of docs/RELIABILITY.md ("Lying KV")."""

import copy
from types import SimpleNamespace

import torch


def prefill(model, ids: torch.Tensor):
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values


def bought(model, layout, cache, tokens: int, room: int = 64):
    """The StaticCache a buyer holds after receiving the payload of `cache`'s first
    `tokens` (whole blocks) into a BoughtCache with `room` slots to spare."""
    from kvx.integrations import hf

    payload = hf.pack(cache, layout, tokens // layout.block).numpy()
    target = hf.BoughtCache(model, layout, tokens + room)
    at = 0
    for piece in target.place(0, payload.size):
        piece[:] = memoryview(payload)[at : at + len(piece)]
        at += len(piece)
    return target.ready(tokens)


def layers(keys: list[torch.Tensor], values: list[torch.Tensor]):
    """Something `hf.pack` and `hf.publish_prompt` take as a cache."""
    return SimpleNamespace(
        layers=[SimpleNamespace(keys=k, values=v) for k, v in zip(keys, values, strict=True)]
    )


def kv(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys.clone() for layer in cache.layers], [
        layer.values.clone() for layer in cache.layers
    ]


def another_document(model, ids, other):
    """Class 1: another document's KV under D's chain."""
    return prefill(model, other)


def spliced(model, ids, instruction, at: int):
    """Class 2: an instruction spliced into D at `at` (its tokens replace D's there)."""
    poisoned = ids.clone()
    poisoned[:, at : at + instruction.shape[-1]] = instruction
    return prefill(model, poisoned)


def deep_from(model, ids, other, span: slice | None = None):
    """Class 3: layer 0 honest everywhere, the deeper layers from another text (over
    every position, or only `span`)."""
    keys, values = kv(prefill(model, ids))
    k2, v2 = kv(prefill(model, other))
    span = span or slice(None)
    for layer in range(1, len(keys)):
        keys[layer][:, :, span] = k2[layer][:, :, span]
        values[layer][:, :, span] = v2[layer][:, :, span]
    return layers(keys, values)


def noisy_layer(model, ids, layer: int, scale: float = 0.05, seed: int = 0):
    """Class 4: D's KV with noise of `scale` (relative to each tensor's spread) in one
    layer only."""
    keys, values = kv(prefill(model, ids))
    g = torch.Generator().manual_seed(seed)
    for t in (keys[layer], values[layer]):
        t += scale * t.std() * torch.randn(t.shape, generator=g)
    return layers(keys, values)


def other_weights(model, ids, seed: int = 1):
    """Class 5: KV of D's own tokens computed with other weights of the same shape."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return prefill(other, ids)


def in_bfloat16(model, ids):
    """Class 6: KV computed in bfloat16, sold as the float32 the fingerprint names."""
    cache = prefill(copy.deepcopy(model).to(torch.bfloat16), ids)
    keys, values = kv(cache)
    return layers([k.float() for k in keys], [v.float() for v in values])
