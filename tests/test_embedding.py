"""What an agent developer uses: the example agent, the hf loaders and fingerprints, the
sync twins, a client whose node is gone, and what the buyer's node records of a purchase."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from swarm import NodeProcess, eventually

pytest.importorskip("transformers", reason="the hf extra is not installed")
from tiny import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvx import PeerClient, SyncPeerClient
from kvx.integrations import hf
from kvx.p2p import AdminError

EXAMPLE = Path(__file__).parent.parent / "examples" / "agent.py"
WORDS = [f"w{i}" for i in range(200)]
BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer, saved as a Hugging Face model directory."""
    where = tmp_path_factory.mktemp("tiny-model")
    vocab = {w: i for i, w in enumerate(["[UNK]", *WORDS, "Question:", "Answer:"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(where)
    tiny_llama(len(vocab), positions=1024).save_pretrained(where)
    return where


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kvx"


@pytest.fixture
def pair(tmp_path):
    seller = NodeProcess(tmp_path / "seller").start()
    seller.wait_ready()
    buyer = NodeProcess(tmp_path / "buyer", [seller.dir / "node.json"], metrics_port=0).start()
    buyer.wait_ready()
    yield seller, buyer
    buyer.stop()
    seller.stop()


def agent(node: NodeProcess, model_dir: Path, document: Path, env: dict) -> list[str]:
    args = ["--data-dir", node.dir, "--model", model_dir, "--document", document]
    run = subprocess.run(
        [sys.executable, EXAMPLE, *args, "--question", "w1 w2", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # nothing leaks into an agent's output: no bars, no notices
    return run.stdout.splitlines()


def scrape(node: NodeProcess) -> str:
    with urllib.request.urlopen(node.info["metrics"], timeout=5) as response:  # loopback
        return response.read().decode()


def test_the_example_agent_prefills_and_sells_then_another_buys(tmp_path, pair, model_dir):
    seller, buyer = pair
    document = tmp_path / "doc.txt"
    document.write_text(" ".join(WORDS[i % 7 * 11 + i % 5] for i in range(700)))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = agent(seller, model_dir, document, env)
    assert first[0].startswith("prefilled ") and "selling 512 now" in first[0]
    eventually(lambda: buyer.call("ads")["ads"], 30)
    second = agent(buyer, model_dir, document, env)
    assert second[0].startswith("bought 512 tokens of KV from " + seller.info["node_id"][:16])
    assert second[-1] == first[-1]  # the same answer, token for token
    # The buyer's node logged the purchase and measured it.
    bought = buyer.events("bought")
    assert len(bought) == 1 and bought[0]["level"] == "info"
    assert bought[0]["seller"] == seller.info["node_id"][:12]
    assert bought[0]["tokens"] == 512 and bought[0]["bytes"] > 0 and bought[0]["price"] > 0
    metrics = scrape(buyer)
    for name in ("lookup", "negotiation", "transfer"):
        assert f"kvx_{name}_seconds_count 1.0" in metrics
    assert 'kvx_time_to_first_token_seconds_count{source="bought"} 1.0' in metrics
    assert 'kvx_purchases_total{result="bought"} 1.0' in metrics
    # Savings, read back from both sides: the buyer's clients bought what the seller sold.
    price, size = bought[0]["price"], bought[0]["bytes"]
    eventually(lambda: seller.call("savings")["sold_tokens"] == 512, 30)  # the final receipt
    sold = seller.call("savings")
    assert (sold["sold_bytes"], sold["credits_earned"]) == (size, price)
    assert sold["prefill_flops_per_second"] > 0  # the seller's agent prefilled the document
    got = json.loads(
        subprocess.run(
            [sys.executable, "-m", "kvx.cli", "savings", "--data-dir", buyer.dir, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert (got["bought_tokens"], got["bought_bytes"], got["credits_spent"]) == (512, size, price)
    assert got["prefill_flops_saved"] > 0
    assert "kvx_bought_tokens_total 512.0" in metrics and "kvx_data_bytes_sent_total" in metrics


def test_the_sync_twins_buy_what_the_async_helpers_sold(pair, model_dir, cache_home):
    seller, buyer = pair
    loaded = hf.load_model(model_dir, block=BLOCK)
    ids = torch.randint(1, 200, (1, 4 * BLOCK + 2), generator=torch.Generator().manual_seed(3))
    with SyncPeerClient(seller.dir) as client:
        _, tokens = hf.publish_prompt_sync(client, loaded.model, loaded.fp, ids)
    assert tokens == 4 * BLOCK
    eventually(lambda: buyer.call("ads")["ads"], 30)
    with SyncPeerClient(buyer.dir) as client:
        out = hf.generate_sync(
            client, loaded.model, loaded.fp, ids, max_new_tokens=6, do_sample=False
        )
    assert out.bought is not None and out.bought.tokens == 4 * BLOCK
    assert 0 < out.first_token_s <= out.seconds
    local = loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out.output_ids, local)


async def test_a_bought_prefix_converted_to_the_buyers_dtype(pair, model_dir, cache_home):
    seller, buyer = pair
    loaded = hf.load_model(model_dir, block=BLOCK)
    ids = torch.randint(1, 200, (1, 3 * BLOCK + 1), generator=torch.Generator().manual_seed(4))
    async with PeerClient(seller.dir) as client:
        await hf.publish_prompt(client, loaded.model, loaded.fp, ids)
    eventually(lambda: buyer.call("ads")["ads"], 30)
    half = hf.load_model(model_dir, block=BLOCK, dtype=torch.bfloat16).model
    async with PeerClient(buyer.dir) as client:
        cache, bought = await hf.fetch_prefix(
            client, half, loaded.fp, ids, max_new_tokens=4, dtype="bfloat16"
        )
    assert bought.layout.dtype == "bfloat16" and bought.tokens == 3 * BLOCK
    assert cache.layers[0].keys.dtype == torch.bfloat16
    out = half.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_a_revision_names_the_weights_without_hashing_them(model_dir, cache_home):
    a = hf.load_model(model_dir, "tiny", revision="3f2a9c1").fp
    b = hf.load_model(model_dir, "tiny", revision="77e01bd").fp
    assert a.weights_hash == b"" and a.revision == "3f2a9c1"
    assert a.digest() != b.digest()
    assert not (cache_home / "weights-hashes.json").exists()


def test_the_weights_hash_is_kept_by_the_model_files(tmp_path, model_dir, cache_home):
    copy = tmp_path / "model"
    subprocess.run(["cp", "-r", str(model_dir), str(copy)], check=True)
    first = hf.load_model(copy, "tiny")
    assert first.fp.weights_hash == hf.weights_hash(first.model)
    store = cache_home / "weights-hashes.json"
    known = json.loads(store.read_text())
    assert list(known.values()) == [first.fp.weights_hash.hex()]
    # A restart reads the hash instead of hashing: prove it by planting another value.
    store.write_text(json.dumps({k: "ab" * 32 for k in known}))
    assert hf.load_model(copy, "tiny").fp.weights_hash == bytes.fromhex("ab" * 32)
    # Changed files are hashed anew.
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert hf.load_model(copy, "tiny").fp.weights_hash == first.fp.weights_hash


def test_the_same_model_files_elsewhere_have_the_same_fingerprint(tmp_path, model_dir, cache_home):
    """Hosts keep their models where they like; where must not stop them trading."""
    for where in ("srv/models", "home/me"):
        (tmp_path / where).mkdir(parents=True)
        subprocess.run(["cp", "-r", str(model_dir), str(tmp_path / where / "tiny")], check=True)
    a = hf.load_model(tmp_path / "srv/models/tiny").fp
    b = hf.load_model(tmp_path / "home/me/tiny").fp
    assert a.model_id == b.model_id == "tiny" and a.digest() == b.digest()


def test_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(Exception, match="no model at"):
        hf.load_model(tmp_path / "nowhere")


async def test_a_client_whose_node_is_gone_fails_at_once(tmp_path):
    node = NodeProcess(tmp_path / "n").start()
    node.wait_ready()
    client = PeerClient(node.dir, timeout_s=600)  # a wait would outlast the test's timeout
    assert (await client.lookup(b"\x01" * 32, [b"\x02" * 32]))[0] == 0
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()
    with pytest.raises(AdminError, match=r"\(PID \d+\) is gone"):
        await client.lookup(b"\x01" * 32, [b"\x02" * 32])
    (node.dir / "node.json").unlink()
    with pytest.raises(AdminError, match="no node is running"):
        await client.lookup(b"\x01" * 32, [b"\x02" * 32])
    await client.close()
