"""kvx inside vLLM, for real: vLLM's CPU build runs a tiny random Llama (saved with
save_pretrained, with a word-level tokenizer for its fingerprint) in engine processes,
each engine with its own kvx node process.

An engine start costs ~12 s in one process and ~30 s as vLLM deploys it (engine core and
worker in processes of their own); the first test runs that way, so that the
connector's scheduler and worker halves talk only through the metadata vLLM pickles,
the others in one process."""

import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Network, require_netns
from sellers import tamper_stored
from swarm import NodeProcess, eventually

from kvx.protocol import ConfigError

if importlib.util.find_spec("vllm") is None:
    pytest.skip("the vllm extra is not installed (./setup.sh test,vllm)", allow_module_level=True)
with warnings.catch_warnings():  # vLLM's own imports warn of torch APIs it still uses
    warnings.simplefilter("ignore", DeprecationWarning)
    from kvx.integrations.vllm import Settings, gpu_page


ENGINE = Path(__file__).with_name("vllm_engine.py")
ONE_PROCESS = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine core, worker


def words(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 512) for _ in range(n)]


DOC = words(1, 1100)
SOLD = [*DOC[:512], *words(2, 90)]  # two whole kvx blocks, and more
WANTED = [*DOC[:512], *words(3, 40)]
UNRELATED = words(4, 300)
SHORT = DOC[:200]  # less than a kvx block: vLLM keeps its first page of 128 tokens
LONG = [*DOC[:1000], *words(5, 20)]
ONE_BLOCK = words(6, 300)
ASKED = [*ONE_BLOCK, 7, 8, 9]
TAMPERED = words(7, 300)
BY_HF, BY_VLLM = words(8, 300), words(9, 300)
KILLED = words(10, 700)  # two blocks, 1 MiB of KV: seconds over the throttled link
PRIVATE = words(11, 300)
LIED, HALVED = words(12, 300), words(13, 300)
CLASSES = {  # one document per attack class of tests/liars.py
    name: words(20 + i, 300)
    for i, name in enumerate(
        ("another-document", "spliced", "deep", "noise", "other-weights", "bfloat16")
    )
}
COMPARED = [
    *(WANTED, UNRELATED, SHORT, LONG, ASKED),
    *([*p, 5] for p in (TAMPERED, BY_HF, KILLED, PRIVATE, LIED, HALVED, *CLASSES.values())),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def own(model) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's greedy output from an engine without kvx and without prefix caching:
    what every purchase must leave unchanged."""
    outs = engine(model, None, COMPARED, prefix_caching=False).out
    return {tuple(p): o for p, o in zip(COMPARED, outs, strict=True)}


def tiny_llama(path: Path, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(  # head_dim 64: the CPU attention kernels take no smaller
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(512)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="w0").save_pretrained(path)
    return path


@dataclass
class Run:
    out: list[list[int]]
    log: str  # what the engine printed (vLLM logs to stdout), the connector's lines too


def engine(
    model: Path,
    node: NodeProcess | None,
    prompts: list,
    *,
    processes: bool = False,
    prefix: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    **options,
) -> Run:
    """Greedy outputs of one engine run; with `node`, through the kvx connector; `env`
    adds to the environment."""
    args = [str(model), str(node.dir) if node else "-", json.dumps(prompts), json.dumps(options)]
    env = {**(os.environ if processes else ONE_PROCESS), **(env or {})}
    run = subprocess.run(
        [*prefix, sys.executable, str(ENGINE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # vLLM prints some tracebacks of its own; none may pass through the connector
    assert 'integrations/vllm.py", line' not in run.stdout + run.stderr, run.stderr[-3000:]
    out = next(x for x in run.stdout.splitlines() if x.startswith("OUT:"))[4:]
    return Run(json.loads(out), run.stdout + run.stderr)


def pair(tmp_path: Path, tables: str = "", **buyer) -> tuple[NodeProcess, NodeProcess]:
    a = NodeProcess(tmp_path / "a", tables=tables).start()
    a.wait_ready()
    b = NodeProcess(tmp_path / "b", [a.dir / "node.json"], tables=tables, **buyer).start()
    b.wait_ready()
    return a, b


def hf_publish(model: Path, node: NodeProcess, prompt: list[int]) -> None:
    """Sell a prompt's KV computed by Hugging Face, without starting an engine."""
    import torch

    from kvx.integrations.hf import load_model, publish_prompt_sync
    from kvx.p2p import SyncPeerClient

    hf = load_model(model)
    with SyncPeerClient(node.dir) as seller:
        publish_prompt_sync(seller, hf.model, hf.fp, torch.tensor([prompt]))


def test_a_prefix_one_engine_computed_is_bought_by_another_token_for_token(model, own, tmp_path):
    a, b = pair(tmp_path, metrics_port=0)
    try:
        engine(model, a, [SOLD], processes=True)  # computes the prompt, sells two blocks
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        bought = engine(model, b, [WANTED, UNRELATED], processes=True)
        assert [e["tokens"] for e in b.events("bought")] == [512]  # the shared prefix only
        assert "kvx: loaded 512 tokens" in bought.log
        assert a.events("sold")
        # The savings the engine's node reports: one prompt bought, one computed.
        with urllib.request.urlopen(b.info["metrics"], timeout=5) as response:
            metrics = response.read().decode()
        assert "kvx_bought_tokens_total 512.0" in metrics
        assert 'kvx_time_to_first_token_seconds_count{source="bought"} 1.0' in metrics
        assert 'kvx_time_to_first_token_seconds_count{source="prefill"} 1.0' in metrics
        assert b.call("savings")["prefill_seconds_saved"] > 0  # priced at the measured rate
        eventually(lambda: a.call("savings")["sold_tokens"] == 512)
    finally:
        a.stop()
        b.stop()
    assert bought.out == [own[tuple(WANTED)], own[tuple(UNRELATED)]]  # token for token


def test_a_partial_prefix_fills_only_the_pages_vllm_does_not_hold(model, own, tmp_path):
    """The swarm holds two blocks of the document; vLLM's own prefix cache holds the
    first 128 tokens (from a shorter prompt before): the connector loads the 384 tokens
    in between and vLLM computes the rest of the prompt."""
    a, b = pair(tmp_path)
    try:
        engine(model, a, [DOC[:600]])
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        run = engine(model, b, [SHORT, LONG])
        assert "kvx: loaded 384 tokens" in run.log and "(512 bought, 128 its own;" in run.log
        assert [e["tokens"] for e in b.events("bought")] == [512]
    finally:
        a.stop()
        b.stop()
    assert run.out == [own[tuple(SHORT)], own[tuple(LONG)]]


def test_kv_of_other_weights_is_never_bought(model, tmp_path):
    """The same architecture with other weights has another fingerprint, so its chain
    of the same tokens matches nothing: no quote is asked for, nothing moves."""
    other = tiny_llama(tmp_path / "other", seed=1)
    a, b = pair(tmp_path)
    try:
        hf_publish(model, a, ONE_BLOCK)
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        run = engine(other, b, [ASKED])
        assert not b.events("bought") and not b.events("missed")
        assert not a.events("sold") and "kvx: loaded" not in run.log
    finally:
        a.stop()
        b.stop()


def test_a_seller_gone_before_the_fetch_costs_a_recompute_not_a_token(model, own, tmp_path):
    """The buyer's node has not yet noticed the seller died (its suspicion takes a
    minute here), so the engine is told the prefix is there; the fetch fails, and vLLM
    computes the blocks the connector reported failed: output unchanged."""
    a, b = pair(tmp_path, suspect_after_s=60.0, dead_after_s=120.0)
    try:
        hf_publish(model, a, ONE_BLOCK)
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        a.kill()
        settings = {"data_dir": str(b.dir), "timeout_s": 1}
        run = engine(model, b, [ASKED], kv={"kv_connector_extra_config": settings})
        assert not b.events("bought") and b.events("missed")
        assert "kvx: nothing bought" in run.log
    finally:
        a.stop()
        b.stop()
    assert run.out == [own[tuple(ASKED)]]


def test_a_seller_killed_mid_fetch_costs_a_recompute_not_a_token(model, own, tmp_path):
    """Seller and buyer on two hosts (network namespaces), the seller's link throttled
    so that its 1 MiB take seconds; it is killed once the buyer's data connection is
    open. The stream ends short, nothing of it reaches the paged cache, and vLLM
    computes the blocks: output unchanged."""
    require_netns()
    network = Network(hosts=2)
    hosts = []
    try:
        for i in (1, 2):
            boot = [tmp_path / "h1" / "node.json"] if i == 2 else []
            host = network.node(
                i, tmp_path / f"h{i}", boot, suspect_after_s=60.0, dead_after_s=120.0
            )
            hosts.append(host.start())
            host.wait_ready()
        seller, buyer = hosts
        hf_publish(model, seller, KILLED)
        eventually(lambda: len(buyer.call("ads")["ads"]) == 1, 30)
        tc = [*network.prefix(1), "tc", "qdisc", "add", "dev", f"{network.tag}e1", "root"]
        throttle = subprocess.run(
            [*tc, "tbf", "rate", "2mbit", "burst", "16kb", "latency", "400ms"],
            capture_output=True,
            text=True,
        )
        if throttle.returncode != 0:
            pytest.skip(f"tc tbf is not available here: {throttle.stderr.strip()}")
        port = seller.info["data"][0]["addr"].rsplit(":", 1)[1]
        watch = [*network.prefix(1), "ss", "-Htn", "state", "established", f"sport = :{port}"]
        settings = {"data_dir": str(buyer.dir), "timeout_s": 20}
        running = subprocess.Popen(  # the engine, on the buyer's host
            [
                *network.prefix(2),
                sys.executable,
                str(ENGINE),
                str(model),
                str(buyer.dir),
                json.dumps([[*KILLED, 5]]),
                json.dumps({"kv": {"kv_connector_extra_config": settings}}),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ONE_PROCESS,
        )
        deadline = time.monotonic() + 120
        while not subprocess.run(watch, capture_output=True, text=True).stdout.strip():
            assert running.poll() is None and time.monotonic() < deadline, "no data connection"
            time.sleep(0.05)
        seller.kill()  # SIGKILL, the stream under way
        out, err = running.communicate(timeout=300)
        assert running.returncode == 0, err[-3000:]
        missed = buyer.events("missed")
        assert not buyer.events("bought") and missed, err[-2000:]
        assert "kvx: nothing bought" in out and "STREAM_TRUNCATED" in out, out[-2000:]
    finally:
        for host in hosts:
            host.stop()
        network.close()
    got = json.loads(next(x for x in out.splitlines() if x.startswith("OUT:"))[4:])
    assert got == [own[(*KILLED, 5)]]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({}, "needs data_dir"),
        ({"data_dir": ""}, "needs data_dir"),
        ({"data_dir": "n", "max_price": -1}, "max_price"),
        ({"data_dir": "n", "max_price": "10"}, "max_price"),
        ({"data_dir": "n", "namespcae": "x"}, "unknown"),
        ({"data_dir": "n", "timeout_s": 0}, "timeout_s"),
        ({"data_dir": "n", "timeout_s": "5"}, "timeout_s"),
        ({"data_dir": "n", "namespace": 3}, "namespace is the path"),
        ({"data_dir": "n", "namespace": "/nowhere/team.ns"}, "cannot read secret file"),
        ({"data_dir": "n", "verify": "sometimes"}, "verify is off, layer0, spot:K"),
        ({"data_dir": "n", "verify": 16}, "verify is a policy name"),
    ],
)
def test_each_bad_setting_is_refused_with_one_line(extra, says):
    with pytest.raises(ConfigError, match=says) as refused:
        Settings.parse(extra)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("physical", [(0, 1, 2, 3), (0, 2, 1, 3)], ids=["HND", "NHD"])
def test_gpu_pages_are_the_halves_vllm_s_gpu_backends_split(physical):
    """No GPU here: a CPU tensor stands in for a CUDA cache, in vLLM's logical view
    [blocks, heads, page, 2 * head_dim] over either physical order, and the views the
    connector writes must be the keys and values FlashAttention's forward reads."""
    import torch

    blocks, heads, page, dim = 4, 2, 16, 8
    logical = (blocks, heads, page, 2 * dim)
    stored = torch.randn([logical[i] for i in physical])
    cache = stored.permute(*[physical.index(i) for i in range(4)])  # the logical view
    key_cache, value_cache = cache.transpose(1, 2).split(dim, dim=-1)  # as flash_attn.py
    for p in range(blocks):
        keys, values = gpu_page(cache, p)
        assert torch.equal(keys, key_cache[p].transpose(0, 1))
        assert torch.equal(values, value_cache[p].transpose(0, 1))
        keys.fill_(p)  # and writing through them writes the cache itself
        assert bool((key_cache[p] == p).all()) and not bool((value_cache[p] == p).all())


def test_an_engine_whose_cache_holds_another_dtype_does_not_start(model, tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    node.wait_ready()
    try:
        with pytest.raises(AssertionError, match="leave kv_cache_dtype at auto"):
            engine(model, node, [[1, 2, 3]], kv_cache_dtype="bfloat16")
    finally:
        node.stop()


def test_a_secret_file_that_holds_no_secret_is_refused(tmp_path):
    from kvx.trust import write_private

    write_private(tmp_path / "team.ns", "not hex", "namespace secret")
    with pytest.raises(ConfigError, match="does not hold a 32-byte hex secret"):
        Settings.parse({"data_dir": "n", "namespace": str(tmp_path / "team.ns")})


def test_a_private_namespace_trades_only_among_its_members(model, own, tmp_path):
    """Both nodes and both engines hold the namespace's secret: the seller's chain is
    keyed with it, so an engine that names no namespace matches nothing, and one that
    names it buys."""
    import secrets

    from kvx.trust import write_private

    write_private(tmp_path / "team.ns", secrets.token_hex(32), "namespace secret")
    member = f'\n[[namespace]]\nname = "team"\nsecret_file = "{tmp_path / "team.ns"}"\n'
    a, b = pair(tmp_path, tables=member)
    settings = {"kv_connector_extra_config": {"namespace": str(tmp_path / "team.ns")}}
    try:
        engine(model, a, [PRIVATE], kv=with_dir(settings, a))
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        engine(model, b, [[*PRIVATE, 5]])
        assert not b.events("bought")  # the public chain of the same tokens: no match
        run = engine(model, b, [[*PRIVATE, 5]], kv=with_dir(settings, b))
        assert [e["tokens"] for e in b.events("bought")] == [256]
    finally:
        a.stop()
        b.stop()
    assert run.out == [own[(*PRIVATE, 5)]]


def with_dir(kv: dict, node: NodeProcess) -> dict:
    extra = {"data_dir": str(node.dir), **kv["kv_connector_extra_config"]}
    return {**kv, "kv_connector_extra_config": extra}


def test_an_engine_whose_failed_loads_would_fail_requests_does_not_start(model, tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    node.wait_ready()
    try:
        with pytest.raises(AssertionError, match="kv_load_failure_policy"):
            engine(model, node, [[1, 2, 3]], kv={"kv_load_failure_policy": "fail"})
    finally:
        node.stop()


def test_kv_trades_between_vllm_and_hugging_face_both_ways(model, own, tmp_path):
    """The same weights give the same fingerprint in both integrations, so a prefix one
    engine computed is bought by the other. The KV vLLM sells is the KV Hugging Face
    computes (to float noise: the two run different kernels); how far their greedy
    outputs agree is reported, not asserted, since a random model's near-ties flip."""
    import torch

    from kvx.integrations.hf import fetch_prefix_sync, load_model
    from kvx.p2p import SyncPeerClient

    hf = load_model(model)
    a, b = pair(tmp_path)
    ids = torch.tensor([[*BY_VLLM, 5]])
    try:
        hf_publish(model, a, BY_HF)
        engine(model, a, [BY_VLLM])  # sells this one
        eventually(lambda: len(b.call("ads")["ads"]) == 2)
        vllm_bought = engine(model, b, [[*BY_HF, 5]]).out[0]  # buys what HF computed
        assert [e["tokens"] for e in b.events("bought")] == [256]
        with SyncPeerClient(b.dir) as buyer:  # and HF buys what vLLM computed
            cache, bought = fetch_prefix_sync(buyer, hf.model, hf.fp, ids, max_new_tokens=12)
        assert bought.tokens == 256
    finally:
        a.stop()
        b.stop()
    with torch.no_grad():  # the KV vLLM sold is the KV this model computes
        mine = hf.model(ids[:, :256], use_cache=True).past_key_values
        for computed, sold in zip(mine.layers, cache.layers, strict=True):
            for x, y in ((computed.keys, sold.keys), (computed.values, sold.values)):
                assert torch.allclose(x[0], y[0, :, :256], atol=1e-4)
        greedy = {"max_new_tokens": 12, "do_sample": False}
        hf_bought = hf.model.generate(ids, past_key_values=cache, **greedy)[0, ids.shape[1] :]
        hf_own = hf.model.generate(ids, **greedy)[0, ids.shape[1] :]
    for name, x, y in (
        ("vLLM with Hugging Face's KV", vllm_bought, own[(*BY_HF, 5)]),
        ("Hugging Face with vLLM's KV", hf_bought.tolist(), hf_own.tolist()),
    ):
        same = sum(p == q for p, q in zip(x, y, strict=True))
        print(f"{name} agrees with its own prefill on {same} of {len(y)} greedy tokens")


async def test_a_tampered_payload_never_reaches_the_paged_cache(model, own, tmp_path):
    """The seller runs in this process, so the test can make it serve bytes that do not
    match the root it signed; the engine's purchase fails verification, vLLM computes
    those blocks itself, and the output is its own prefill's."""
    import asyncio

    import torch

    from kvx.integrations.hf import load_model, publish_prompt
    from kvx.p2p import NodeConfig, PeerClient

    hf = load_model(model)
    seller = await PeerClient.embedded(
        NodeConfig(data_dir=tmp_path / "a", metrics_port=None, heartbeat_s=0.3, anti_entropy_s=1)
    )
    b = NodeProcess(tmp_path / "b", [tmp_path / "a" / "node.json"]).start()
    try:
        await asyncio.to_thread(b.wait_ready)  # the seller answers on this loop meanwhile
        root, _ = await publish_prompt(seller, hf.model, hf.fp, torch.tensor([TAMPERED]))
        tamper_stored(seller, root)
        await asyncio.to_thread(eventually, lambda: len(b.call("ads")["ads"]) == 1)
        run = await asyncio.to_thread(engine, model, b, [[*TAMPERED, 5]])
        missed = b.events("missed")
        assert not b.events("bought") and missed and "kvx: loaded" not in run.log
        assert "CHUNK_HASH_MISMATCH" in run.log
        seller_id = seller._embedded[0].core.id.hex()
        assert next(p for p in b.call("peers")["peers"] if p["node_id"] == seller_id)["score"] < 0
    finally:
        b.stop()
        await seller.close()
    assert run.out == [own[(*TAMPERED, 5)]]


def test_kv_its_own_weights_refute_is_recomputed_and_a_lying_layout_never_raises(
    model, own, tmp_path
):
    """One seller signs the right fingerprint over KV computed with other weights (its
    root is right), another a float16 layout under the same fingerprint: the connector
    checks both against the engine's own model, pages in neither, and vLLM computes."""
    from dataclasses import replace

    import liars
    import torch

    from kvx.integrations.hf import load_model, pack, publish_prompt_sync
    from kvx.p2p import SyncPeerClient
    from kvx.protocol import prefix_chain

    hf = load_model(model)
    a, b = pair(tmp_path)
    c = NodeProcess(tmp_path / "c", [a.dir / "node.json"]).start()
    try:
        c.wait_ready()
        lied = torch.tensor([LIED[:256]])
        half = replace(hf.fp.layout, dtype="float16")
        halved = liars.prefill(hf.model, torch.tensor([HALVED[:256]]))
        with SyncPeerClient(a.dir) as seller:
            publish_prompt_sync(
                seller, hf.model, hf.fp, lied, cache=liars.other_weights(hf.model, lied)
            )
        with SyncPeerClient(c.dir) as seller:
            seller.publish(
                fp=hf.fp.digest(),
                layout=half,
                blocks=prefix_chain(hf.fp.digest(), HALVED[:256], 256),
                payload=pack(halved, half, 1).view(torch.float32).half().numpy().tobytes(),
                params=hf.model.num_parameters(),
            )
        eventually(lambda: len(b.call("ads")["ads"]) == 2)
        run = engine(model, b, [[*LIED, 5], [*HALVED, 5]])
        assert not b.events("bought") and "kvx: loaded" not in run.log
        assert [e["check"] for e in b.events("refused")] == ["layer0"]
        assert "KV_MISMATCH: layer0" in run.log and "not this model's" in run.log
        liars_ids = {a.info["node_id"], c.info["node_id"]}
        banned = {p["node_id"] for p in b.call("peers")["peers"] if p["banned"]}
        assert liars_ids <= banned
    finally:
        c.stop()
        a.stop()
        b.stop()
    assert run.out == [own[(*LIED, 5)], own[(*HALVED, 5)]]


def _lies():
    import liars

    return {
        "another-document": liars.another_document,
        "spliced": lambda m, ids, other: liars.spliced(m, ids, other[:, :8], at=100),
        "deep": liars.deep_from,
        "noise": lambda m, ids, other: liars.noisy_layer(m, ids, layer=1),
        "other-weights": lambda m, ids, other: liars.other_weights(m, ids),
        "bfloat16": lambda m, ids, other: liars.in_bfloat16(m, ids),
    }


def test_every_attack_class_is_refused_by_the_engine_and_computed_instead(model, own, tmp_path):
    """Each attack class of tests/liars.py, sold by a seller of its own (a refusal bans
    its seller), bought by one engine checking with spot:16: nothing is paged in, every
    seller is refused with the check that saw it, and the outputs are the engine's own."""
    import torch

    from kvx.integrations.hf import load_model, publish_prompt_sync
    from kvx.p2p import SyncPeerClient

    lies = _lies()
    hf = load_model(model)
    m = hf.model
    b = NodeProcess(tmp_path / "b").start()
    b.wait_ready()
    sellers = []
    try:
        for name, doc in CLASSES.items():
            ids = torch.tensor([doc[:256]])
            other = torch.tensor([words(99, 256)])
            cache = lies[name](m, ids, other)
            seller = NodeProcess(tmp_path / name, [b.dir / "node.json"]).start()
            sellers.append(seller)
            seller.wait_ready()
            with SyncPeerClient(seller.dir) as client:
                publish_prompt_sync(client, m, hf.fp, ids, cache=cache)
        eventually(lambda: len(b.call("ads")["ads"]) == len(CLASSES), 30)
        prompts = [[*doc, 5] for doc in CLASSES.values()]
        run = engine(
            model,
            b,
            prompts,
            kv={"kv_connector_extra_config": {"data_dir": str(b.dir), "verify": "spot:16"}},
        )
        assert not b.events("bought") and "kvx: loaded" not in run.log
        checks = sorted(e["check"] for e in b.events("refused"))
        assert checks == ["deep", "deep", "layer0", "layer0", "layer0", "layer0"]
        banned = {p["node_id"] for p in b.call("peers")["peers"] if p["banned"]}
        assert {s.info["node_id"] for s in sellers} <= banned
    finally:
        for seller in sellers:
            seller.stop()
        b.stop()
    assert run.out == [own[tuple(p)] for p in prompts]


def test_the_documented_server_buys_and_vllm_s_own_metrics_count_it(model, tmp_path):
    """README's OpenAI-API server command, with the connector: a completion request whose
    prompt the swarm holds buys it, and vLLM's own metrics count the tokens it got from
    outside (`vllm:external_prefix_cache_hits`)."""
    a, b = pair(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kv = {
        "kv_connector": "KvxConnector",
        "kv_connector_module_path": "kvx.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"data_dir": str(b.dir)},
    }
    server = None
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed after the server)
    try:
        hf_publish(model, a, SOLD)
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
                *("--model", str(model), "--dtype", "float32"),
                *("--gpu-memory-utilization", "0.1", "--max-model-len", "2048"),
                *("--kv-transfer-config", json.dumps(kv)),
                *("--enforce-eager", "--host", "127.0.0.1", "--port", str(port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        eventually(healthy, 300, every=1.0)
        request = urllib.request.Request(
            f"{url}/v1/completions",
            data=json.dumps(
                {"model": str(model), "prompt": WANTED, "max_tokens": 4, "temperature": 0}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == 4
        assert [e["tokens"] for e in b.events("bought")] == [512]
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        hits = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("vllm:external_prefix_cache_hits_total")
        ]
        assert hits == [512.0], [m for m in metrics.splitlines() if "external" in m]
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()
        a.stop()
        b.stop()


def test_with_and_without_kvx_the_cpu_engine_binds_the_same_cores_when_told_to(
    model, own, tmp_path
):
    """vLLM's CPU build reserves one core more for any KV connector (for NIXL's sake), so
    on a small host an engine with kvx binds its worker to other cores than one without,
    and bf16 sums then differ in order. With VLLM_CPU_NUM_OF_RESERVED_CPU the same for
    both (README: a fair comparison), they bind the same cores and agree."""
    node = NodeProcess(tmp_path / "n").start()
    node.wait_ready()
    same = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    try:
        plain = engine(model, None, [UNRELATED], processes=True, env=same)
        with_kvx = engine(model, node, [UNRELATED], processes=True, env=same)
    finally:
        node.stop()

    def cores(log: str) -> list[str]:
        return re.findall(r"local_rank=\d+, core ids=\[[^\]]*\]", log)

    assert cores(plain.log) and cores(plain.log) == cores(with_kvx.log)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU is less than the minimum requirement" in with_kvx.log
    assert plain.out == with_kvx.out == [own[tuple(UNRELATED)]]


def test_an_engine_of_another_dtype_buys_nothing_and_says_which_it_trades(model, tmp_path):
    """The fingerprint names the dtype (with the weights as loaded in it): a bf16 engine
    does not buy fp32 KV, and says at start which dtype it trades in, rather than
    missing in silence."""
    a, b = pair(tmp_path)
    try:
        hf_publish(model, a, SOLD)  # Hugging Face computes in float32
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        run = engine(model, b, [WANTED], dtype="bfloat16")
        assert b.events("bought") == []
    finally:
        a.stop()
        b.stop()
    assert "kvx: this engine trades KV computed in bfloat16" in run.log
