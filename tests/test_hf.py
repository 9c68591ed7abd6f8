"""Buying KV caches end to end with a tiny grouped-query-attention model from_config:
token-exact generation, partial prefixes, misses, wrong fingerprints, tampered bytes."""

import asyncio
import time

import pytest
import torch
from sellers import tamper_stored
from swarm import NodeProcess, TestPeer, eventually

pytest.importorskip("transformers", reason="the hf extra is not installed")
from tiny import tiny_llama

from kvx.integrations import hf
from kvx.p2p import NodeConfig, PeerClient
from kvx.protocol import Error, ErrorCode, QuoteRequest, prefix_chain
from kvx.trust import Identity, Signer

BLOCK = 16


@pytest.fixture(scope="module")
def model():
    return tiny_llama(256)


@pytest.fixture(scope="module")
def fp(model):
    return hf.fingerprint(model, b"\x11" * 32, block=BLOCK, model_id="kvx-test/tiny-gqa")


@pytest.fixture
def pair(tmp_path):
    """A seller node and a buyer node, as processes, the buyer joined through the seller."""
    seller = NodeProcess(tmp_path / "seller").start()
    seller.wait_ready()
    buyer = NodeProcess(tmp_path / "buyer", [seller.dir / "node.json"]).start()
    buyer.wait_ready()
    yield seller, buyer
    buyer.stop()
    seller.stop()


def prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def reference(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=12, do_sample=False)


async def sell(seller: NodeProcess, buyer: NodeProcess, model, fp, ids) -> int:
    client = PeerClient(seller.dir)
    _, tokens = await hf.publish_prompt(client, model, fp, ids)
    await client.close()
    eventually(lambda: len(buyer.call("ads")["ads"]) >= 1)
    return tokens


async def test_generation_after_a_bought_prefix_equals_local_prefill(pair, model, fp):
    seller, buyer = pair
    ids = prompt(1, 5 * BLOCK + 3)
    await sell(seller, buyer, model, fp, ids)
    client = PeerClient(buyer.dir)
    out = await hf.generate(client, model, fp, ids, max_new_tokens=12, do_sample=False)
    await client.close()
    assert out.bought is not None and out.miss is None
    assert out.bought.tokens == 5 * BLOCK  # every whole block, the last token left to compute
    assert out.bought.price >= 1 and out.bought.saved_flops > 0
    assert torch.equal(out.output_ids, reference(model, ids))
    # Both ledgers hold the receipted deal.
    assert "sold" in (seller.dir / "node.log").read_text()


async def test_a_prompt_that_diverges_buys_only_the_shared_blocks(pair, model, fp):
    seller, buyer = pair
    document = prompt(2, 6 * BLOCK)
    await sell(seller, buyer, model, fp, document)
    question = torch.cat([document[:, : 3 * BLOCK + 5], prompt(3, 2 * BLOCK)], dim=1)
    client = PeerClient(buyer.dir)
    out = await hf.generate(client, model, fp, question, max_new_tokens=12, do_sample=False)
    await client.close()
    assert out.bought is not None and out.bought.tokens == 3 * BLOCK
    assert torch.equal(out.output_ids, reference(model, question))


async def test_a_miss_falls_back_to_local_prefill(pair, model, fp):
    seller, buyer = pair
    await sell(seller, buyer, model, fp, prompt(4, 3 * BLOCK))
    other = prompt(5, 3 * BLOCK)
    client = PeerClient(buyer.dir)
    out = await hf.generate(client, model, fp, other, max_new_tokens=12, do_sample=False)
    await client.close()
    assert out.bought is None and "no provider" in out.miss
    assert torch.equal(out.output_ids, reference(model, other))


async def test_a_quote_request_for_another_fingerprint_is_refused_before_any_transfer(
    pair, model, fp
):
    seller, buyer = pair
    await sell(seller, buyer, model, fp, prompt(6, 2 * BLOCK))
    stranger = TestPeer(seller, Identity.generate())
    signer = Signer(stranger.identity)
    wrong_fp = b"\xee" * 32
    chain = prefix_chain(wrong_fp, prompt(6, 2 * BLOCK).reshape(-1).tolist(), BLOCK)
    stranger.send(
        signer.seal(
            QuoteRequest(fp=wrong_fp, blocks=tuple(chain), transports=("tcp",), max_price=10**9),
            now_ms=time.time_ns() // 1_000_000,
            to=stranger.node_id,
        )
    )
    answer = stranger.recv()
    stranger.close()
    assert isinstance(answer.message, Error)
    assert answer.message.code == ErrorCode.FINGERPRINT_MISMATCH
    assert "sold" not in (seller.dir / "node.log").read_text()


async def test_a_tampered_payload_never_reaches_the_model(tmp_path, model, fp):
    # The seller runs in this process, so the test can make it serve bytes that do not
    # match the root it signed, as a lying or broken seller would.
    seller = await PeerClient.embedded(
        NodeConfig(
            data_dir=tmp_path / "seller", metrics_port=None, heartbeat_s=0.3, anti_entropy_s=1.0
        )
    )
    buyer = NodeProcess(tmp_path / "buyer", [tmp_path / "seller" / "node.json"]).start()
    try:
        buyer.wait_ready()
        ids = prompt(7, 4 * BLOCK + 1)
        root, _ = await hf.publish_prompt(seller, model, fp, ids)
        tamper_stored(seller, root)
        await asyncio.to_thread(eventually, lambda: len(buyer.call("ads")["ads"]) == 1)
        client = PeerClient(buyer.dir)
        out = await hf.generate(client, model, fp, ids, max_new_tokens=12, do_sample=False)
        await client.close()
        assert out.bought is None and out.miss == "every provider failed"
        assert torch.equal(out.output_ids, reference(model, ids))  # prefilled, not poisoned
    finally:
        buyer.stop()
        await seller.close()
