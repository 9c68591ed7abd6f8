"""Time to first token with a bought prefix against a full prefill, on SmolLM2-135M (CPU).

    python bench/savings.py [--lengths 512 1024 2048 4096] [--json OUT]

For each document length, node A of a three-node swarm prefills the document and sells
its KV; an agent on node C then answers a question about it twice: once buying the
cached prefix (lookup + quote + transfer + load, then its first token), once prefilling
everything itself. Both are timed in this run, and their greedy continuations compared
token for token. The limit, measured in the same run, is what no exchange can beat: the
same bytes over a raw loopback socket plus a forward of the un-bought suffix over a
ready cache. The bought path's time is broken down into its parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kvx.demo import Swarm, document_ids, raw_socket_seconds
from kvx.integrations import hf
from kvx.p2p import PeerClient, wait_for

CONTINUATION = 16


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvx-savings-"))
    try:
        results = asyncio.run(measure(args.lengths, root))
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "bench": "savings",
                    "model": hf.SMOLLM2_ID,
                    "results": results,
                    "ratios": {
                        **{f"prefill_vs_bought_{r['tokens']}": r["ratio"] for r in results},
                        **{f"limit_vs_bought_{r['tokens']}": r["limit_ratio"] for r in results},
                    },
                    "token_exact": all(r["token_exact"] for r in results),
                },
                f,
                indent=2,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
