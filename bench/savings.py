"""Time to first token with a bought prefix against a full prefill, on SmolLM2-135M (CPU).

    python bench/savings.py [--lengths 512 1024 2048 4096] [--shape 0.5b 1b] [--json OUT]

For each document length, node A of a three-node swarm prefills the document and sells
its KV; an agent on node C then answers a question about it twice: once buying the
cached prefix (lookup + quote + transfer + load, then its first token), once prefilling
everything itself. Both are timed in this run, and their greedy continuations compared
token for token. The limit, measured in the same run, is what no exchange can beat: the
same bytes over a raw loopback socket plus a forward of the un-bought suffix over a
ready cache. The bought path's time is broken down into its parts.

`--shape` adds, for 4096 tokens, models shaped like larger ones (a 0.5B-class Qwen2.5 and
a 1B-class Llama 3.2 config, float32) with random weights from a fixed seed: prefill time
depends on the shapes, not the weights' values. The seller's prefill is the timed one
(the buyer would run the same), its cache is sold, and the buyer's first tokens over the
bought cache are compared with the prefill's, token for token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import blake3
import torch

from kvx.demo import Swarm, document_ids, raw_socket_seconds
from kvx.integrations import hf
from kvx.p2p import PeerClient
from kvx.testing import wait_for

CONTINUATION = 16
SHAPES = {
    # Qwen2.5-0.5B's shapes: 24 layers, 14 heads, 2 KV heads of 64, MLP 4864, vocab 151936.
    "0.5b": (
        "qwen2",
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
             max_position_embeddings=32768, tie_word_embeddings=True),
    ),
    # Llama 3.2 1B's: 16 layers, 32 heads, 8 KV heads of 64, MLP 8192, vocab 128256.
    "1b": (
        "llama",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
             max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    ),
}  # fmt: skip
SHAPE_TOKENS = 4096


async def measure(lengths: list[int], root: Path) -> list[dict]:
    loaded = hf.load_smollm2()
    tokenizer, model, fp = loaded.tokenizer, loaded.model, loaded.fp
    swarm = Swarm(root)
    results = []
    try:
        seller, agent = PeerClient(swarm.a.dir), PeerClient(swarm.c.dir)
        for length in lengths:
            ids = document_ids(tokenizer, length)
            root_hex = (await hf.publish_prompt(seller, model, fp, ids))[0].hex()
            await asyncio.to_thread(
                wait_for,
                lambda r=root_hex: r in {a["root"] for a in swarm.c.call("ads")["ads"]},
                30,
            )

            start = time.perf_counter()
            cache, bought = await hf.fetch_prefix(agent, model, fp, ids, max_new_tokens=1)
            fetched = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
            ttft_bought = time.perf_counter() - start
            breakdown = {
                **bought.timings,
                "load": fetched - start - bought.seconds,
                "first_token": time.perf_counter() - fetched,
            }

            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=1, do_sample=False)
            ttft_prefill = time.perf_counter() - start

            # The limit: the same bytes over a raw socket, plus the compute that cannot be
            # bought (the un-bought suffix attending the whole prefix), over a ready cache.
            raw_s = raw_socket_seconds(bought.bytes)
            cache, _ = await hf.fetch_prefix(agent, model, fp, ids, max_new_tokens=1)
            start = time.perf_counter()
            with torch.no_grad():
                model(ids[:, bought.tokens :], past_key_values=cache, logits_to_keep=1)
            suffix_s = time.perf_counter() - start
            limit = raw_s + suffix_s

            cache, _ = await hf.fetch_prefix(agent, model, fp, ids, max_new_tokens=CONTINUATION)
            with torch.no_grad():
                a = model.generate(
                    ids, past_key_values=cache, max_new_tokens=CONTINUATION, do_sample=False
                )
                b = model.generate(ids, max_new_tokens=CONTINUATION, do_sample=False)
            results.append(
                {
                    "tokens": length,
                    "prompt_tokens": ids.shape[1],
                    "bought_tokens": bought.tokens,
                    "bytes": bought.bytes,
                    "price_ucr": bought.price,
                    "saved_gflop": bought.saved_flops / 1e9,
                    "ttft_prefill_s": ttft_prefill,
                    "ttft_bought_s": ttft_bought,
                    "breakdown_s": breakdown,
                    "limit_s": limit,
                    "limit_raw_socket_s": raw_s,
                    "limit_suffix_forward_s": suffix_s,
                    "ratio": ttft_prefill / ttft_bought,
                    "limit_ratio": limit / ttft_bought,
                    "token_exact": bool(torch.equal(a, b)),
                }
            )
            print(
                f"{length} tokens: prefill {ttft_prefill:.2f} s, bought {ttft_bought:.3f} s,"
                f" limit {limit:.3f} s",
                flush=True,
            )
        await seller.close()
        await agent.close()
    finally:
        swarm.stop()
    return results


async def measure_shape(shape: str, root: Path) -> dict:
    """One 4096-token purchase with a randomly initialised model of `shape` (see SHAPES)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, config = SHAPES[shape]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(kind, **config), dtype=torch.float32
    ).eval()
    # The weights are named by the seed that drew them: nothing to hash (spec §7.2).
    no_tokenizer = blake3.blake3(b"no tokenizer: random token ids").digest()
    fp = hf.fingerprint(model, no_tokenizer, model_id=f"random-{shape}", revision="seed-0")
    ids = torch.randint(
        0, config["vocab_size"], (1, SHAPE_TOKENS + 1), generator=torch.Generator().manual_seed(1)
    )
    swarm = Swarm(root / shape)
    try:
        seller, agent = PeerClient(swarm.a.dir), PeerClient(swarm.c.dir)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
        ttft_prefill = time.perf_counter() - start
        reference = _greedy(model, out, ids.shape[1])
        root_hex = (await hf.publish_prompt(seller, model, fp, ids, cache=out.past_key_values))[
            0
        ].hex()
        await asyncio.to_thread(
            wait_for, lambda: root_hex in {a["root"] for a in swarm.c.call("ads")["ads"]}, 60
        )
        start = time.perf_counter()
        cache, bought = await hf.fetch_prefix(agent, model, fp, ids, max_new_tokens=8)
        fetched = time.perf_counter()
        with torch.no_grad():
            out = model(ids[:, bought.tokens :], past_key_values=cache, logits_to_keep=1)
        ttft_bought = time.perf_counter() - start
        breakdown = {
            **bought.timings,
            "load": fetched - start - bought.seconds,
            "first_token": time.perf_counter() - fetched,
        }
        tokens = _greedy(model, out, ids.shape[1])
        await seller.close()
        await agent.close()
    finally:
        swarm.stop()
    return {
        "shape": shape,
        "params": model.num_parameters(),
        "tokens": SHAPE_TOKENS,
        "bought_tokens": bought.tokens,
        "bytes": bought.bytes,
        "ttft_prefill_s": ttft_prefill,
        "ttft_bought_s": ttft_bought,
        "ratio": ttft_prefill / ttft_bought,
        "breakdown_s": breakdown,
        "token_exact": tokens == reference,
    }


def _greedy(model, out, position: int, steps: int = 4) -> list[int]:
    """The first token and `steps` - 1 more, greedily, from a forward's output."""
    tokens = [int(out.logits[0, -1].argmax())]
    cache = out.past_key_values
    with torch.no_grad():
        for _ in range(steps - 1):
            step = torch.tensor([[tokens[-1]]])
            out = model(step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=[])
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvx-savings-"))
    try:
        results = asyncio.run(measure(args.lengths, root)) if args.lengths else []
        shapes = [asyncio.run(measure_shape(shape, root)) for shape in args.shape]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nSmolLM2-135M (float32, CPU, {torch.get_num_threads()} threads), time to first token")
    print(
        f"{'tokens':>7} {'bought':>7} {'MiB':>7} {'prefill s':>10} {'bought s':>9} "
        f"{'limit s':>8} {'ratio':>6} {'limit/bought':>12} {'exact':>6}"
    )
    for r in results:
        print(
            f"{r['tokens']:>7} {r['bought_tokens']:>7} {r['bytes'] / 2**20:>7.1f} "
            f"{r['ttft_prefill_s']:>10.2f} {r['ttft_bought_s']:>9.3f} {r['limit_s']:>8.3f} "
            f"{r['ratio']:>6.1f} {r['limit_ratio']:>12.2f} "
            f"{'yes' if r['token_exact'] else 'NO':>6}"
        )
    parts = ("lookup", "negotiation", "transfer", "receipt", "load", "first_token")
    print("\nwhere the bought path's time goes (ms); the limit: raw socket + suffix forward")
    print(
        f"{'tokens':>7} " + " ".join(f"{p:>11}" for p in parts) + f" {'raw sock':>9} {'suffix':>7}"
    )
    for r in results:
        b = r["breakdown_s"]
        print(
            f"{r['tokens']:>7} "
            + " ".join(f"{b[p] * 1000:>11.1f}" for p in parts)
            + f" {r['limit_raw_socket_s'] * 1000:>9.1f} {r['limit_suffix_forward_s'] * 1000:>7.1f}"
        )
    if shapes:
        print(f"\nlarger shapes, random weights (float32, CPU), {SHAPE_TOKENS} tokens")
        print(f"{'shape':>6} {'params':>8} {'MiB':>7} {'prefill s':>10} {'bought s':>9} "
              f"{'ratio':>6} {'exact':>6}")  # fmt: skip
        for r in shapes:
            print(
                f"{r['shape']:>6} {r['params'] / 1e9:>7.2f}B {r['bytes'] / 2**20:>7.1f} "
                f"{r['ttft_prefill_s']:>10.2f} {r['ttft_bought_s']:>9.3f} {r['ratio']:>6.1f} "
                f"{'yes' if r['token_exact'] else 'NO':>6}"
            )
        parts = ("lookup", "negotiation", "transfer", "check", "receipt", "load", "first_token")
        print("\nwhere the bought path's time goes (ms)")
        print(f"{'shape':>6} " + " ".join(f"{p:>11}" for p in parts))
        for r in shapes:
            b = r["breakdown_s"]
            print(f"{r['shape']:>6} " + " ".join(f"{b.get(p, 0.0) * 1000:>11.1f}" for p in parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "bench": "savings",
                    "model": hf.SMOLLM2_ID,
                    "results": results,
                    "shapes": shapes,
                    "ratios": {
                        **{f"prefill_vs_bought_{r['tokens']}": r["ratio"] for r in results},
                        **{f"limit_vs_bought_{r['tokens']}": r["limit_ratio"] for r in results},
                        **{f"prefill_vs_bought_4096_{r['shape']}": r["ratio"] for r in shapes},
                    },
                    "token_exact": all(r["token_exact"] for r in results + shapes),
                },
                f,
                indent=2,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
