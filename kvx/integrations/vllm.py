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
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvx.p2p import Check, Refusal, SyncPeerClient, prefill_flops
from kvx.protocol import (
    DEFAULT_BLOCK_TOKENS,
    PUBLIC,
    ConfigError,
    KvxError,
    Namespace,
    Quote,
    prefix_chain,
)
from kvx.trust import VerifyPolicy, read_secret

from .hf import load_model
from .verify import check_cache, refusal, room_for, static_cache

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.kvx")  # vLLM's own handler prints it, with its lines

BLOCK = DEFAULT_BLOCK_TOKENS


@dataclass(frozen=True)
class Settings:
    """`kv_connector_extra_config`, checked when the engine starts."""

    data_dir: Path
    max_price: int | None = None
    timeout_s: float = 10.0
    namespace: Namespace = PUBLIC
    verify: VerifyPolicy | None = None  # None: the node's [policy] verify

    @classmethod
    def parse(cls, extra: dict[str, Any]) -> Settings:
        unknown = set(extra) - {"data_dir", "max_price", "timeout_s", "namespace", "verify"}
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
        namespace = PUBLIC
        if "namespace" in extra:
            where = extra["namespace"]
            if not isinstance(where, str) or not where:
                raise ConfigError(
                    f"kvx: namespace is the path of a namespace secret file, not {where!r}"
                )
            namespace = Namespace(read_secret(Path(where)))  # its own one-line errors
        verify = extra.get("verify")
        if verify is not None:
            if not isinstance(verify, str):
                raise ConfigError(f"kvx: verify is a policy name such as spot:16, not {verify!r}")
            try:
                verify = VerifyPolicy.parse(verify)
            except ConfigError as exc:
                raise ConfigError(f"kvx: {exc}") from None
        return cls(Path(extra["data_dir"]), price, float(timeout), namespace, verify)


@dataclass
class Load:
    """Buy the kvx blocks of `chain` and place them in these vLLM blocks, from page
    `first_page` on (vLLM's own prefix cache holds the pages before it)."""

    req_id: str
    chain: list[bytes]
    block_ids: list[int]
    first_page: int
    tokens: list[int]  # the prompt's tokens the chain names, which the check recomputes


@dataclass
class Save:
    """Sell the whole kvx blocks of a prompt just computed, from these vLLM blocks."""

    chain: list[bytes]
    block_ids: list[int]


@dataclass
class KvxMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)


def cpu_page(cache: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the keys and the values of one page, each [kv_heads, page, head_dim], in
    vLLM's CPU backend: per page and head the keys and then the values; the values
    token by token, the keys transposed ([head_dim, page], for its dot products).
    tests/test_vllm.py checks both against Hugging Face's own KV."""
    heads, tokens, width = cache.shape[1:]
    halves = cache[page].view(heads, 2, tokens * (width // 2))
    keys = halves[:, 0].view(heads, width // 2, tokens).transpose(1, 2)
    return keys, halves[:, 1].view(heads, tokens, width // 2)


def gpu_page(cache: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for vLLM's GPU backends (FlashAttention, FlashInfer, Triton,
    FlexAttention): each token's row holds its keys, then its values, split in halves
    (`kv_cache.transpose(1, 2).split(head_size, dim=-1)`). No GPU reaches this
    project's machines: a test checks these views against that expression on CPU."""
    half = cache.shape[-1] // 2
    return cache[page, :, :, :half], cache[page, :, :, half:]


class KvxConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        config = self._kv_transfer_config
        self.settings = Settings.parse(config.kv_connector_extra_config or {})
        self.ns = self.settings.namespace
        if config.kv_load_failure_policy != "recompute":
            raise ConfigError(
                'kvx: set "kv_load_failure_policy": "recompute", so that a purchase that '
                "fails is computed instead of failing the request"
            )
        self.page = vllm_config.cache_config.block_size
        if BLOCK % self.page:
            raise ConfigError(f"kvx: vLLM's block size {self.page} does not divide {BLOCK}")
        # The Hugging Face integration's fingerprint of the same files: the same weights
        # trade whichever engine computed them.
        loaded = load_model(vllm_config.model_config.model, dtype=vllm_config.model_config.dtype)
        self.fp = loaded.fp
        if role == KVConnectorRole.SCHEDULER:  # once per engine, where lookups are made
            log.info(
                "kvx: this engine trades KV computed in %s: the fingerprint names the dtype,"
                " so sellers and buyers in another dtype (the Hugging Face helpers load"
                " float32) trade nothing with it; give both the same dtype",
                self.fp.layout.dtype,
            )
        self.params = sum(p.numel() for p in loaded.model.parameters())  # prices its prefill
        self.client = SyncPeerClient(
            self.settings.data_dir, timeout_s=self.settings.timeout_s, verify=self.settings.verify
        )
        # Bought KV is checked against these weights before vLLM sees it (spec §12.2): the
        # worker keeps a copy of the model on the CPU for that, unless checks are off.
        self.checker = loaded.model if self.client.verify.enabled else None
        del loaded
        # req -> (kvx blocks the swarm holds, their chain, tokens vLLM holds itself)
        self._matched: dict[str, tuple[int, list[bytes], int]] = {}
        # req -> (prompt, vLLM blocks so far) while its prompt is being computed
        self._prefilling: dict[str, tuple[list[int], list[int]]] = {}
        self._arrived: dict[str, float] = {}  # req -> when it came (Request.arrival_time)
        # req -> (arrival, whether a prefix was bought, prompt tokens) once its prompt is
        # computed: its first token exists by the next step, when it is reported
        self._first_token: dict[str, tuple[float, bool, int]] = {}
        self._loads: list[Load] = []
        self._kv: list[torch.Tensor] = []
        self._failed: set[int] = set()
        self._selling = ThreadPoolExecutor(1, thread_name_prefix="kvx-sell")
        self._seller: SyncPeerClient | None = None
        self._closed = False

    # ---- scheduler side ----------------------------------------------------------------

    def _chain(self, tokens: list[int]) -> list[bytes]:
        usable = (len(tokens) - 1) // BLOCK  # the last prompt token is always computed
        return prefix_chain(self.fp.digest(), tokens[: usable * BLOCK], BLOCK, self.ns)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        known = self._matched.get(request.request_id)
        self._arrived.setdefault(request.request_id, request.arrival_time)
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
            return self.client.lookup(self.fp.digest(), chain, ns=self.ns.id)[0]
        except KvxError as exc:
            log.warning("kvx: lookup failed, computing instead: %s", exc)
            return 0

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        matched, chain, computed = self._matched[request.request_id]
        block_ids = list(blocks.get_block_ids()[0])  # all of the request's, local hits first
        tokens = list(request.prompt_token_ids or ())[: matched * BLOCK]
        self._loads.append(
            Load(request.request_id, chain[:matched], block_ids, computed // self.page, tokens)
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvxMetadata:
        """Loads for the requests just allocated; a sale for each prompt whose computing
        ends in this step, however many steps (chunked prefill) it took."""
        meta = KvxMetadata(loads=self._loads)
        self._loads = []
        self._report_first_tokens()
        scheduled = scheduler_output.num_scheduled_tokens
        progress = []
        for new in scheduler_output.scheduled_new_reqs:
            self._prefilling[new.req_id] = (
                list(new.prompt_token_ids or ()),
                list(new.block_ids[0]),
            )
            progress.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._prefilling:
                continue
            tokens, block_ids = self._prefilling[req_id]
            added = cached.new_block_ids[i]
            if added is not None:
                fresh = req_id in cached.resumed_req_ids  # preempted: blocks given anew
                self._prefilling[req_id] = (tokens, [*([] if fresh else block_ids), *added[0]])
            progress.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in progress:
            tokens, block_ids = self._prefilling[req_id]
            if computed + scheduled.get(req_id, 0) < len(tokens):
                continue
            del self._prefilling[req_id]
            whole = len(tokens) // BLOCK
            held = self._matched.get(req_id, (0,))[0]
            if req_id in self._arrived:
                self._first_token[req_id] = (self._arrived.pop(req_id), held > 0, len(tokens))
            if whole > held:  # only what the swarm does not advertise yet is worth a sale
                chain = prefix_chain(self.fp.digest(), tokens[: whole * BLOCK], BLOCK, self.ns)
                meta.saves.append(Save(chain, block_ids))
        for req_id in scheduler_output.finished_req_ids:
            self._matched.pop(req_id, None)
            self._prefilling.pop(req_id, None)
            self._arrived.pop(req_id, None)
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._report_first_tokens()  # one that ended at its first token: no step follows
        return False, None

    def _report_first_tokens(self) -> None:
        """Time to first token of the prompts computed by the last step, for the node's
        `kvx_time_to_first_token_seconds` (bought or not) and its prefill rate."""
        now = time.time()  # Request.arrival_time is wall-clock time
        for arrived, bought, tokens in self._first_token.values():
            try:
                self.client.report_first_token(
                    now - arrived,
                    bought=bought,
                    prefill_flops=prefill_flops(self.params, self.fp.layout, tokens),
                )
            except KvxError as exc:
                log.warning("kvx: could not report a first token: %s", exc)
        self._first_token.clear()

    # ---- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Per layer [blocks, kv_heads, page, 2 * head_dim], on CPU or CUDA: vLLM's logical
        view of every layout (its strides give the physical order)."""

        def layer(name: str) -> int:
            return int(re.search(r"layers\.(\d+)\.", name).group(1))

        self._kv = [kv_caches[name] for name in sorted(kv_caches, key=layer)]
        layout = self.fp.layout
        first = self._kv[0]
        places = {"cpu": cpu_page, "cuda": gpu_page}.get(first.device.type)
        if places is None or first.dim() != 4:
            raise ConfigError(
                f"kvx: the connector places KV in vLLM's CPU and CUDA cache layouts, not in "
                f"a {tuple(first.shape)} cache on {first.device}"
            )
        self._views = places
        if str(first.dtype).removeprefix("torch.") != layout.dtype:
            raise ConfigError(
                f"kvx: the paged cache holds {first.dtype}, the model's KV is {layout.dtype} "
                "(kvx trades KV in the model's own dtype: leave kv_cache_dtype at auto)"
            )
        expected = (layout.layers, layout.kv_heads, self.page, 2 * layout.head_dim)
        if (len(self._kv), *first.shape[1:]) != expected:
            raise ConfigError(f"kvx: a paged cache of shape {tuple(first.shape)} is not {layout}")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvxMetadata)
        per = BLOCK // self.page
        for load in meta.loads:
            end = len(load.chain) * per
            try:
                got = self._load(load, per, end)
            except KvxError as exc:  # Miss, or the node gone: vLLM computes those pages
                faults = "; ".join(f"{f.code.name}: {f.detail}" for f in getattr(exc, "faults", ()))
                log.warning("kvx: nothing bought for %s: %s (%s)", load.req_id, exc, faults)
                got = load.first_page
            except Exception:  # whatever a peer sent, the engine computes instead of failing
                log.exception("kvx: loading %s failed, vLLM computes it", load.req_id)
                got = load.first_page
            self._failed.update(load.block_ids[got:end])

    def _load(self, load: Load, per: int, end: int) -> int:
        """Buy, check and page in one request's prefix; the pages now loaded."""
        bought = self.client.fetch(
            self.fp.digest(),
            load.chain,
            params=self.params,
            max_price=self.settings.max_price,
            namespace=self.ns,
            layout=self.fp.layout,
            check=self._checker(load) if self.checker is not None else None,
        )
        got = max(load.first_page, min(end, bought.blocks * per))
        for piece, view in self._pairs(bought.tensor, load.block_ids, load.first_page, got):
            view.copy_(piece)
        log.info(
            "kvx: loaded %d tokens of %s into its paged cache (%d bought, %d its own; %s)",
            (got - load.first_page) * self.page,
            load.req_id,
            bought.tokens,
            load.first_page * self.page,
            ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in bought.timings.items()),
        )
        return got

    def _checker(self, load: Load) -> Check:
        """The check of a delivery against this engine's own weights (spec §12.2), before
        the seller is paid in full and before any of it is paged in."""
        model, policy, layout = self.checker, self.client.verify, self.fp.layout

        async def check(payload: torch.Tensor | None, quote: Quote) -> Refusal | None:
            assert payload is not None and model is not None
            tokens = quote.blocks * layout.block
            ids = torch.tensor([load.tokens[:tokens]])
            cache = static_cache(
                model, layout, payload[: layout.payload_bytes(quote.blocks)], room_for(policy)
            )
            finding = check_cache(
                model, ids, cache, tokens, policy, computed=getattr(torch, layout.dtype)
            )
            return refusal(finding, ids)

        return check

    def _pairs(
        self, payload: torch.Tensor, block_ids: list[int], first: int, end: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(payload piece, paged-cache view) of the keys and of the values of every layer
        for pages `first` to `end`: the payload is block-major (spec §7.5), each page
        lives at its vLLM block. Loading copies one way, selling the other."""
        layout = self.fp.layout
        H, D, L = layout.kv_heads, layout.head_dim, layout.layers
        kv = payload.view(self._kv[0].dtype).view(-1, L, 2, H, BLOCK, D)
        for p in range(first, end):
            b, j = divmod(p * self.page, BLOCK)
            span = slice(j, j + self.page)
            for layer, cache in enumerate(self._kv):
                keys, values = self._views(cache, block_ids[p])
                yield kv[b, layer, 0, :, span], keys
                yield kv[b, layer, 1, :, span], values

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kw) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvxMetadata)
        layout, per = self.fp.layout, BLOCK // self.page
        for save in meta.saves:
            payload = torch.empty(layout.payload_bytes(len(save.chain)), dtype=torch.uint8)
            for piece, view in self._pairs(payload, save.block_ids, 0, len(save.chain) * per):
                piece.copy_(view)
            # The copy above must happen now, before vLLM reuses the pages; the sale
            # itself (hashing, the node's store) need not hold up the next step.
            self._selling.submit(self._publish, save.chain, payload)

    def _publish(self, chain: list[bytes], payload: torch.Tensor) -> None:
        """On the selling thread, with a client of its own (a client is one thread's)."""
        if self._seller is None:
            self._seller = SyncPeerClient(self.settings.data_dir, timeout_s=self.settings.timeout_s)
        try:
            self._seller.publish(
                fp=self.fp.digest(),
                layout=self.fp.layout,
                blocks=chain,
                payload=payload.numpy().tobytes(),
                params=self.params,
                ns=self.ns.id,
            )
        except KvxError as exc:  # a sale missed, nothing worse
            log.warning("kvx: could not publish a prompt's KV: %s", exc)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def shutdown(self) -> None:
        """Finish the sales under way, then close (vLLM may call this at interpreter
        exit, when the selling thread takes no more work, and more than once)."""
        if self._closed:
            return
        self._closed = True
        self._selling.shutdown(wait=True)
        if self._seller is not None:  # its thread is done: this one may close it
            self._seller.close()
        self.client.close()
