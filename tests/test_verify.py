"""Bought KV is checked against the buyer's own model (spec §12.2): the checks in
memory, then every attack class against a seller and a buyer that are node processes,
the buyer generating with a real (tiny, from_config) model."""

import random
import urllib.request
from dataclasses import replace

import liars
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed")
from swarm import NodeProcess, eventually
from tiny import tiny_llama

from kvx.integrations import hf
from kvx.integrations import verify as verify_module
from kvx.integrations.verify import (
    LAYER0_TOLERANCE,
    check_cache,
    check_spots,
    draw_positions,
    layer0_kv,
)
from kvx.p2p import PeerClient
from kvx.protocol import ConfigError, prefix_chain
from kvx.trust import VerifyPolicy

BLOCK = 16
TOKENS = 6 * BLOCK


@pytest.fixture(scope="module")
def model():
    return tiny_llama(256)


@pytest.fixture(scope="module")
def fp(model):
    return hf.fingerprint(model, b"\x11" * 32, block=BLOCK, model_id="kvx-test/tiny-gqa")


def prompt(seed: int, n: int = TOKENS + 3) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def reference(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False)


def bought_cache(model, fp, ids, cache, room: int = 64):
    """The cache a buyer would hold after receiving `cache`'s payload for `ids`."""
    return liars.bought(model, fp.layout, cache, TOKENS, ids.shape[-1] - TOKENS + room)


# ---- the policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("off", VerifyPolicy(layer0=False, spots=0)),
        ("layer0", VerifyPolicy(spots=0)),
        ("spot:4", VerifyPolicy(spots=4)),
        ("spot:16/8", VerifyPolicy(spots=16, every=8)),
        ("full", VerifyPolicy(full=True)),
    ],
)
def test_policy_names_parse_and_print_back(text, expected):
    assert VerifyPolicy.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["", "on", "spot", "spot:0", "spot:-1", "spot:4/0", "spot:x", "L0"]
)
def test_a_bad_policy_name_is_refused_with_the_grammar(text):
    with pytest.raises(ConfigError, match="off, layer0, spot:K"):
        VerifyPolicy.parse(text)


def test_a_node_config_with_a_bad_verify_policy_names_the_line(tmp_path):
    from kvx.trust import load_policy

    (tmp_path / "node.toml").write_text('[policy]\nverify = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"node\.toml, line 2: policy\.verify: verify is off"):
        load_policy(tmp_path / "node.toml")


# ---- the checks in memory ----------------------------------------------------------------


def test_honest_kv_passes_every_check(model, fp):
    ids = prompt(1)
    cache = bought_cache(model, fp, ids, liars.prefill(model, ids[:, :TOKENS]), room=512)
    for policy in ("layer0", "spot:64", "full"):
        assert check_cache(model, ids, cache, TOKENS, VerifyPolicy.parse(policy)) is None


def _tiny(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if name == "llama":
        return tiny_llama(256)
    if name == "qwen3":  # a key norm before the rotary embedding
        config = Qwen3Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
        return Qwen3ForCausalLM(config).eval()
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)  # none of the parts
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_layer0_is_the_model_s_own_cache_write(name):
    # Llama-family parts are used directly when they give the forward's own bytes (no
    # query projection); any other model runs its forward to the first cache write.
    model = _tiny(name)
    ids = prompt(2)
    k, v = layer0_kv(model, ids)
    cache = liars.prefill(model, ids)
    assert torch.equal(k, cache.layers[0].keys) and torch.equal(v, cache.layers[0].values)
    assert verify_module._DIRECT[model] is (name != "gpt2")


def test_one_wrong_token_fails_layer0_at_its_position(model, fp):
    ids = prompt(3)
    poisoned = liars.spliced(model, ids[:, :TOKENS], torch.tensor([[7]]), at=41)
    found = check_cache(model, ids, bought_cache(model, fp, ids, poisoned), TOKENS, VerifyPolicy())
    assert found is not None and (found.check, found.layer, found.position) == ("layer0", 0, 41)
    assert found.error > LAYER0_TOLERANCE


def test_a_deep_lie_is_found_exactly_at_the_spots_that_fall_in_it(model, fp):
    ids = prompt(4)
    span = slice(30, 38)
    poisoned = liars.deep_from(model, ids[:, :TOKENS], prompt(5)[:, :TOKENS], span)
    cache = bought_cache(model, fp, ids, poisoned)
    assert check_cache(model, ids, cache, TOKENS, VerifyPolicy(spots=0)) is None  # layer 0 honest
    assert check_spots(model, ids, cache, TOKENS, [3, 12, 29]) is None  # before the span
    found = check_spots(model, ids, cache, TOKENS, [3, 33, 50])
    assert found is not None and found.check == "deep" and found.position == 33


def test_spots_leave_the_cache_as_they_found_it(model, fp):
    ids = prompt(6)
    cache = bought_cache(model, fp, ids, liars.prefill(model, ids[:, :TOKENS]))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    assert check_spots(model, ids, cache, TOKENS, draw_positions(TOKENS, 16)) is None
    for layer, (k, v) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        assert int(layer.cumulative_length) == TOKENS


def test_the_deep_part_runs_on_one_purchase_in_n(model, fp):
    ids = prompt(7)
    poisoned = liars.deep_from(model, ids[:, :TOKENS], prompt(8)[:, :TOKENS])
    cache = bought_cache(model, fp, ids, poisoned)
    rng = random.Random(0)
    caught = sum(
        check_cache(model, ids, cache, TOKENS, VerifyPolicy(spots=4, every=4), rng=rng) is not None
        for _ in range(200)
    )
    assert 30 <= caught <= 70  # 1 in 4 of 200: 50 expected, a deep lie everywhere is always hit


# ---- attack classes against live nodes ---------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    seller = NodeProcess(tmp_path / "seller").start()
    seller.wait_ready()
    buyer = NodeProcess(tmp_path / "buyer", [seller.dir / "node.json"], metrics_port=0).start()
    buyer.wait_ready()
    yield seller, buyer
    buyer.stop()
    seller.stop()


async def sell_kv(seller, buyer, model, fp, ids, cache) -> None:
    """The seller publishes `cache` as the KV of `ids` through the public helper."""
    async with PeerClient(seller.dir) as client:
        await hf.publish_prompt(client, model, fp, ids[:, :TOKENS], cache=cache)
    eventually(lambda: len(buyer.call("ads")["ads"]) >= 1)


async def buy(buyer, model, fp, ids, verify=None):
    async with PeerClient(buyer.dir) as client:
        return await hf.generate(
            client, model, fp, ids, max_new_tokens=8, do_sample=False, verify=verify
        )


def assert_refused(out, model, ids, seller, buyer, check: str) -> None:
    """Nothing bought reached the model, the seller is scored as a liar, the buyer's node
    logged the refusal."""
    assert out.bought is None and out.miss == "every provider failed"
    assert torch.equal(out.output_ids, reference(model, ids))  # prefilled, not poisoned
    seller_id = seller.info["node_id"]
    peer = eventually(
        lambda: next((p for p in buyer.call("peers")["peers"] if p["node_id"] == seller_id), None)
    )
    assert peer["banned"] and peer["score"] < -90
    refused = eventually(lambda: buyer.events("refused"))
    assert refused[0]["check"] == check and refused[0]["seller"] == seller_id[:12]
    metrics = urllib.request.urlopen(buyer.info["metrics"], timeout=5).read().decode()
    assert f'kvx_verify_failures_total{{check="{check}"}} 1.0' in metrics


ATTACKS = {
    "another-document": (lambda m, ids: liars.another_document(m, ids, prompt(99)[:, :TOKENS])),
    "splice-1": (lambda m, ids: liars.spliced(m, ids, prompt(98, 1), at=57)),
    "splice-8": (lambda m, ids: liars.spliced(m, ids, prompt(98, 8), at=20)),
    "splice-64": (lambda m, ids: liars.spliced(m, ids, prompt(98, 64), at=17)),
    "other-weights": liars.other_weights,
    "bfloat16-as-float32": liars.in_bfloat16,
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_lying_kv_is_refused_by_layer0_under_the_default_policy(pair, model, fp, attack):
    seller, buyer = pair
    ids = prompt(10)
    await sell_kv(seller, buyer, model, fp, ids, ATTACKS[attack](model, ids[:, :TOKENS]))
    out = await buy(buyer, model, fp, ids)  # the node's policy: the default
    assert_refused(out, model, ids, seller, buyer, "layer0")


@pytest.mark.parametrize(
    "attack",
    [
        lambda m, ids: liars.deep_from(m, ids, prompt(97)[:, :TOKENS]),
        lambda m, ids: liars.noisy_layer(m, ids, layer=1),
    ],
    ids=["deeper-layers-from-another-text", "noise-in-one-layer"],
)
async def test_a_deep_lie_is_refused_by_spot_checks(pair, model, fp, attack):
    # Layer 0 is honest, so only the deep spots can see these. The default (spot:16/32)
    # runs them on one purchase in 32: a seller lying over the whole document is caught
    # with probability 1/32 per purchase, so 32 purchases on average until it is banned.
    seller, buyer = pair
    ids = prompt(11)
    await sell_kv(seller, buyer, model, fp, ids, attack(model, ids[:, :TOKENS]))
    out = await buy(buyer, model, fp, ids, verify="spot:16")
    assert_refused(out, model, ids, seller, buyer, "deep")


async def test_a_seller_lying_in_some_purchases_is_caught_on_the_lie(pair, model, fp):
    seller, buyer = pair
    honest, lied = prompt(12), prompt(13)
    await sell_kv(seller, buyer, model, fp, honest, liars.prefill(model, honest[:, :TOKENS]))
    await sell_kv(seller, buyer, model, fp, lied, liars.other_weights(model, lied[:, :TOKENS]))
    eventually(lambda: len(buyer.call("ads")["ads"]) == 2)
    first = await buy(buyer, model, fp, honest)
    assert first.bought is not None and torch.equal(first.output_ids, reference(model, honest))
    assert_refused(await buy(buyer, model, fp, lied), model, lied, seller, buyer, "layer0")


async def test_honest_kv_is_bought_under_every_policy(pair, model, fp):
    seller, buyer = pair
    ids = prompt(14)
    await sell_kv(seller, buyer, model, fp, ids, liars.prefill(model, ids[:, :TOKENS]))
    for policy in ("off", "layer0", "spot:16", "full"):
        out = await buy(buyer, model, fp, ids, verify=policy)
        assert out.bought is not None and out.bought.tokens == TOKENS, policy
        assert torch.equal(out.output_ids, reference(model, ids))
    assert buyer.events("refused") == []


async def test_a_layout_that_contradicts_the_fingerprint_is_refused_before_allocation(
    pair, model, fp
):
    # The seller signs the right fingerprint digest with a float16 layout: before, an HF
    # buyer received it into its float32 cache and its output changed.
    seller, buyer = pair
    ids = prompt(15)
    half = replace(fp.layout, dtype="float16")
    cache = liars.prefill(model.to(torch.float16), ids[:, :TOKENS])
    model.to(torch.float32)
    chain = prefix_chain(fp.digest(), ids[0, :TOKENS].tolist(), BLOCK)
    async with PeerClient(seller.dir) as client:
        await client.publish(
            fp=fp.digest(),
            layout=half,
            blocks=chain,
            payload=hf.pack(cache, half, len(chain)).numpy().tobytes(),
            params=model.num_parameters(),
        )
    eventually(lambda: len(buyer.call("ads")["ads"]) == 1)
    out = await buy(buyer, model, fp, ids)
    assert out.bought is None and out.miss == "every provider failed"
    assert torch.equal(out.output_ids, reference(model, ids))
    assert "sold" not in (seller.dir / "node.log").read_text()  # refused before any deal
    seller_id = seller.info["node_id"]
    assert eventually(
        lambda: next((p for p in buyer.call("peers")["peers"] if p["node_id"] == seller_id), None)
    )["banned"]
