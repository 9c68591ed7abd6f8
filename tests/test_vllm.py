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
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
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
