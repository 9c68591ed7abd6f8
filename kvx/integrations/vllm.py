"""vLLM (extra `vllm`): a KV connector that buys and sells paged KV through the local kvx
node, loaded out of tree:

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvxConnector",
        "kv_connector_module_path": "kvx.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"data_dir": "/var/lib/kvx"}}'

The scheduler side asks the node how much of a prompt the swarm advertises (whole kvx
blocks, leaving the prompt's last token to compute); the worker side buys that prefix
(verified chunk by chunk, as everywhere in kvx) and scatters it into the paged cache at
the blocks vLLM allocated, and sells the whole blocks of every prompt it computes. The
fingerprint is the Hugging Face integration's, from the same model files, so KV trades
between the two. A fetch that fails is reported as failed blocks, which vLLM recomputes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvx.p2p import SyncPeerClient
from kvx.protocol import (
    DEFAULT_BLOCK_TOKENS,
    ConfigError,
    KvxError,
    ModelFingerprint,
    prefix_chain,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvx.vllm")

BLOCK = DEFAULT_BLOCK_TOKENS


@dataclass(frozen=True)
class Settings:
    """`kv_connector_extra_config`, checked when the engine starts."""

    data_dir: Path
    max_price: int | None = None
    timeout_s: float = 10.0

    @classmethod
    def parse(cls, extra: dict[str, Any]) -> Settings:
        unknown = set(extra) - {"data_dir", "max_price", "timeout_s"}
        if unknown:
            raise ConfigError(f"kvx: unknown kv_connector_extra_config keys {sorted(unknown)}")
        if not isinstance(extra.get("data_dir"), str) or not extra["data_dir"]:
            raise ConfigError("kvx: kv_connector_extra_config needs data_dir, the node's directory")
        price = extra.get("max_price")
        if price is not None and (type(price) is not int or price < 0):
            raise ConfigError(f"kvx: max_price is a whole number of micro-credits, not {price!r}")
        timeout = extra.get("timeout_s", cls.timeout_s)
        if type(timeout) not in (int, float) or not 0 < timeout <= 600:
            raise ConfigError(f"kvx: timeout_s is seconds in (0, 600], not {timeout!r}")
        return cls(Path(extra["data_dir"]), price, float(timeout))


def model_fingerprint(model_dir: str, dtype: torch.dtype) -> tuple[ModelFingerprint, int]:
    """The Hugging Face integration's fingerprint of these model files, and the model's
    parameter count (its own prefill's price): the same weights, the same fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import fingerprint, tokenizer_hash

    files = tuple(sorted(Path(model_dir).glob("*.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fp = fingerprint(model, tokenizer_hash(tokenizer), files=files, model_id=model_dir)
    return fp, sum(p.numel() for p in model.parameters())


@dataclass
class Load:
    """Buy `blocks` kvx blocks of a prompt into these vLLM blocks (from `first` on)."""

    req_id: str
    chain: list[bytes]
    block_ids: list[int]
    first: int  # the first kvx block not already computed by vLLM itself


@dataclass
class Save:
    """Sell the whole kvx blocks of a prompt just computed, from these vLLM blocks."""

    chain: list[bytes]
    block_ids: list[int]


@dataclass
class KvxMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)


class KvxConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        config = self._kv_transfer_config
        self.settings = Settings.parse(config.kv_connector_extra_config or {})
        if config.kv_load_failure_policy != "recompute":
            raise ConfigError(
                'kvx: set "kv_load_failure_policy": "recompute", so that a purchase that '
                "fails is computed instead of failing the request"
            )
        self.page = vllm_config.cache_config.block_size
        if BLOCK % self.page:
            raise ConfigError(f"kvx: vLLM's block size {self.page} does not divide {BLOCK}")
        self.fp, self.params = model_fingerprint(
            vllm_config.model_config.model, vllm_config.model_config.dtype
        )
        self.client = SyncPeerClient(self.settings.data_dir, timeout_s=self.settings.timeout_s)
        self._matched: dict[str, tuple[int, list[bytes], int]] = {}  # req -> (kvx blocks,
        # chain, tokens vLLM computed itself)
        self._loads: list[Load] = []
        self._kv: list[torch.Tensor] = []
        self._failed: set[int] = set()

    # ---- scheduler side ----------------------------------------------------------------

    def _chain(self, tokens: list[int]) -> list[bytes]:
        usable = (len(tokens) - 1) // BLOCK  # the last prompt token is always computed
        return prefix_chain(self.fp.digest(), tokens[: usable * BLOCK], BLOCK)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        known = self._matched.get(request.request_id)
        if known is None:
            chain = self._chain(list(request.prompt_token_ids or ()))
            matched = self._lookup(chain)
        else:
            matched, chain, _ = known
        self._matched[request.request_id] = (matched, chain, num_computed_tokens)
        return max(0, matched * BLOCK - num_computed_tokens), False

    def _lookup(self, chain: list[bytes]) -> int:
        """Whole kvx blocks of the chain the swarm advertises; none if the node is down
        (the engine computes, as it would without kvx)."""
        if not chain:
            return 0
        try:
            return self.client.lookup(self.fp.digest(), chain)[0]
        except KvxError as exc:
            log.warning("kvx: lookup failed, computing instead: %s", exc)
            return 0

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        matched, chain, computed = self._matched[request.request_id]
        first = computed // BLOCK
        block_ids = list(blocks.get_block_ids()[0])
        self._loads.append(Load(request.request_id, chain[:matched], block_ids, first))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvxMetadata:
        meta = KvxMetadata(loads=self._loads)
        self._loads = []
        for new in scheduler_output.scheduled_new_reqs:
            tokens = list(new.prompt_token_ids or ())
            done = new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id]
            whole = len(tokens) // BLOCK
            if whole and done >= len(tokens):  # the prompt is computed in this step
                chain = prefix_chain(self.fp.digest(), tokens[: whole * BLOCK], BLOCK)
                meta.saves.append(Save(chain, list(new.block_ids[0])))
        for req_id in scheduler_output.finished_req_ids:
            self._matched.pop(req_id, None)
        return meta

    # ---- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Per layer [blocks, kv_heads, page, 2 * head_dim] on CPU (see _halves)."""

        def layer(name: str) -> int:
            return int(re.search(r"layers\.(\d+)\.", name).group(1))

        self._kv = [kv_caches[name] for name in sorted(kv_caches, key=layer)]
        layout = self.fp.layout
        shape = self._kv[0].shape
        if (len(self._kv), shape[1], shape[3]) != (
            layout.layers,
            layout.kv_heads,
            2 * layout.head_dim,
        ):
            raise ConfigError(f"kvx: a paged cache of shape {tuple(shape)} is not {layout}")

    def _halves(self, cache: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and the values of one page, each [kv_heads, page, head_dim].

        vLLM's CPU backend keeps, per page and head, the keys and then the values; the
        values token by token, the keys transposed ([head_dim, page], for its dot
        products). tests/test_vllm.py checks both against Hugging Face's own KV."""
        heads, tokens, width = cache.shape[1:]
        halves = cache[page].view(heads, 2, tokens * (width // 2))
        keys = halves[:, 0].view(heads, width // 2, tokens).transpose(1, 2)
        return keys, halves[:, 1].view(heads, tokens, width // 2)

    def _pages(self, block_ids: list[int], kvx_block: int) -> list[int]:
        per = BLOCK // self.page
        return block_ids[kvx_block * per : (kvx_block + 1) * per]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvxMetadata)
        for load in meta.loads:
            wanted = range(load.first, len(load.chain))
            try:
                bought = self.client.fetch(
                    self.fp.digest(),
                    load.chain,
                    params=self.params,
                    max_price=self.settings.max_price,
                )
            except KvxError as exc:  # Miss, or the node gone: vLLM computes those blocks
                log.warning("kvx: nothing bought for %s: %s", load.req_id, exc)
                got = 0
            else:
                got = self._scatter(bought.tensor, bought.blocks, load, wanted)
            for b in wanted[max(0, got - load.first) :]:
                self._failed.update(self._pages(load.block_ids, b))

    def _scatter(self, payload: torch.Tensor, blocks: int, load: Load, wanted: range) -> int:
        layout = self.fp.layout
        H, D, L = layout.kv_heads, layout.head_dim, layout.layers
        kv = payload.view(self._kv[0].dtype).view(blocks, L, 2, H, BLOCK, D)
        for b in wanted:
            if b >= blocks:
                return blocks
            for j, page in enumerate(self._pages(load.block_ids, b)):
                span = slice(j * self.page, (j + 1) * self.page)
                for layer, cache in enumerate(self._kv):
                    keys, values = self._halves(cache, page)
                    keys.copy_(kv[b, layer, 0, :, span])
                    values.copy_(kv[b, layer, 1, :, span])
        return len(load.chain)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kw) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvxMetadata)
        for save in meta.saves:
            parts = []
            for b in range(len(save.chain)):
                pages = self._pages(save.block_ids, b)
                for cache in self._kv:
                    for kv in (0, 1):
                        parts.append(torch.cat([self._halves(cache, p)[kv] for p in pages], dim=1))
            payload = torch.stack(parts).contiguous().view(torch.uint8).reshape(-1)
            try:
                self._publish(save.chain, payload)
            except KvxError as exc:  # a sale missed, nothing worse
                log.warning("kvx: could not publish a prompt's KV: %s", exc)

    def _publish(self, chain: list[bytes], payload: torch.Tensor) -> None:
        self.client.publish(
            fp=self.fp.digest(),
            layout=self.fp.layout,
            blocks=chain,
            payload=payload.numpy().tobytes(),
            params=self.params,
        )

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def shutdown(self) -> None:
        self.client.close()
