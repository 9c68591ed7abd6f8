"""kvx inside vLLM, for real: vLLM's CPU build runs a tiny random Llama (saved with
save_pretrained, with a word-level tokenizer for its fingerprint) in engine processes,
each engine with its own kvx node process."""

import importlib.util
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from swarm import NodeProcess, eventually

from kvx.protocol import ConfigError

if importlib.util.find_spec("vllm") is None:
    pytest.skip("the vllm extra is not installed (./setup.sh test,vllm)", allow_module_level=True)
with warnings.catch_warnings():  # vLLM's own imports warn of torch APIs it still uses
    warnings.simplefilter("ignore", DeprecationWarning)
    from kvx.integrations.vllm import Settings


ENGINE = Path(__file__).with_name("vllm_engine.py")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


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
    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(512)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(path)
    return path


def engine(model: Path, node: NodeProcess | None, prompts: list, **config) -> list:
    """Greedy outputs of one engine run; with `node`, through the kvx connector."""
    args = [str(model), str(node.dir) if node else "-", json.dumps(prompts)]
    run = subprocess.run(
        [sys.executable, str(ENGINE), *args, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(next(x for x in run.stdout.splitlines() if x.startswith("OUT:"))[4:])


def events(node: NodeProcess, name: str) -> list[dict]:
    lines = (node.dir / "node.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == name]  # JSON lines


def test_a_prefix_one_engine_computed_is_bought_by_another_token_for_token(model, tmp_path):
    rng = random.Random(1)
    shared = [rng.randrange(1, 512) for _ in range(512)]  # two kvx blocks
    sold = shared + [rng.randrange(1, 512) for _ in range(90)]
    wanted = shared + [rng.randrange(1, 512) for _ in range(40)]
    unrelated = [rng.randrange(1, 512) for _ in range(300)]
    a = NodeProcess(tmp_path / "a").start()
    a.wait_ready()
    b = NodeProcess(tmp_path / "b", [a.dir / "node.json"]).start()
    b.wait_ready()
    try:
        engine(model, a, [sold])  # computes the prompt, and sells its two whole blocks
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        bought = engine(model, b, [wanted, unrelated])
        assert [e["tokens"] for e in events(b, "bought")] == [512]  # the shared prefix only
        assert events(a, "sold")
    finally:
        a.stop()
        b.stop()
    assert bought == engine(model, None, [wanted, unrelated])  # token for token


def test_kv_of_other_weights_is_never_bought(model, tmp_path):
    """The same architecture with other weights has another fingerprint, so its chain
    of the same tokens matches nothing: no quote is asked for, nothing moves."""
    other = tiny_llama(tmp_path / "other", seed=1)
    prompt = [random.Random(4).randrange(1, 512) for _ in range(300)]
    a = NodeProcess(tmp_path / "a").start()
    a.wait_ready()
    b = NodeProcess(tmp_path / "b", [a.dir / "node.json"]).start()
    b.wait_ready()
    try:
        engine(model, a, [prompt])
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        got = engine(other, b, [[*prompt, 5]])
        assert not events(b, "bought") and not events(b, "missed")
        assert not events(a, "sold")
    finally:
        a.stop()
        b.stop()
    assert got == engine(other, None, [[*prompt, 5]])


def test_a_seller_gone_before_the_fetch_costs_a_recompute_not_a_token(model, tmp_path):
    """The buyer's node has not yet noticed the seller died (its suspicion takes a
    minute here), so the engine is told the prefix is there; the fetch fails, and vLLM
    computes the blocks the connector reported failed: output unchanged."""
    rng = random.Random(2)
    prompt = [rng.randrange(1, 512) for _ in range(300)]  # one whole kvx block
    asked = [*prompt, 7, 8, 9]
    a = NodeProcess(tmp_path / "a").start()
    a.wait_ready()
    slow = {"suspect_after_s": 60.0, "dead_after_s": 120.0}
    b = NodeProcess(tmp_path / "b", [a.dir / "node.json"], **slow).start()
    b.wait_ready()
    try:
        engine(model, a, [prompt])
        eventually(lambda: len(b.call("ads")["ads"]) == 1)
        a.kill()
        settings = {"data_dir": str(b.dir), "timeout_s": 1}
        got = engine(model, b, [asked], kv_connector_extra_config=settings)
        assert not events(b, "bought") and events(b, "missed")
    finally:
        a.stop()
        b.stop()
    assert got == engine(model, None, [asked])


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
    ],
)
def test_each_bad_setting_is_refused_with_one_line(extra, says):
    with pytest.raises(ConfigError, match=says) as refused:
        Settings.parse(extra)
    assert "\n" not in str(refused.value)


def test_an_engine_whose_failed_loads_would_fail_requests_does_not_start(model, tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    node.wait_ready()
    try:
        with pytest.raises(AssertionError, match="kv_load_failure_policy"):
            engine(model, node, [[1, 2, 3]], kv_load_failure_policy="fail")
    finally:
        node.stop()


def test_kv_trades_between_vllm_and_hugging_face_both_ways(model, tmp_path):
    """The same weights give the same fingerprint in both integrations, so a prefix one
    engine computed is bought by the other. The KV vLLM sells is the KV Hugging Face
    computes (to float noise: the two run different kernels); how far their greedy
    outputs agree is reported, not asserted, since a random model's near-ties flip."""
    import torch

    from kvx.integrations.hf import fetch_prefix_sync, load_model, publish_prompt_sync
    from kvx.p2p import SyncPeerClient

    rng = random.Random(3)
    by_hf = [rng.randrange(1, 512) for _ in range(300)]
    by_vllm = [rng.randrange(1, 512) for _ in range(300)]
    hf = load_model(model)
    a = NodeProcess(tmp_path / "a").start()
    a.wait_ready()
    b = NodeProcess(tmp_path / "b", [a.dir / "node.json"]).start()
    b.wait_ready()
    ids = torch.tensor([[*by_vllm, 5]])
    try:
        with SyncPeerClient(a.dir) as seller:
            publish_prompt_sync(seller, hf.model, hf.fp, torch.tensor([by_hf]))
        engine(model, a, [by_vllm])  # sells this one
        eventually(lambda: len(b.call("ads")["ads"]) == 2)
        vllm_bought = engine(model, b, [[*by_hf, 5]])[0]  # buys what HF computed
        assert [e["tokens"] for e in events(b, "bought")] == [256]
        with SyncPeerClient(b.dir) as buyer:  # and HF buys what vLLM computed
            cache, bought = fetch_prefix_sync(buyer, hf.model, hf.fp, ids, max_new_tokens=12)
        assert bought.tokens == 256
    finally:
        a.stop()
        b.stop()
    with torch.no_grad():  # the KV vLLM sold is the KV this model computes
        own = hf.model(ids[:, :256], use_cache=True).past_key_values
        for mine, sold in zip(own.layers, cache.layers, strict=True):
            for x, y in ((mine.keys, sold.keys), (mine.values, sold.values)):
                assert torch.allclose(x[0], y[0, :, :256], atol=1e-4)
        greedy = {"max_new_tokens": 12, "do_sample": False}
        hf_bought = hf.model.generate(ids, past_key_values=cache, **greedy)[0, ids.shape[1] :]
        hf_own = hf.model.generate(ids, **greedy)[0, ids.shape[1] :]
    vllm_own = engine(model, None, [[*by_hf, 5]])[0]
    for name, x, y in (
        ("vLLM with Hugging Face's KV", vllm_bought, vllm_own),
        ("Hugging Face with vLLM's KV", hf_bought.tolist(), hf_own.tolist()),
    ):
        same = sum(p == q for p, q in zip(x, y, strict=True))
        print(f"{name} agrees with its own prefill on {same} of {len(y)} greedy tokens")
