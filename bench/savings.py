"""Time to first token with a bought prefix against a full prefill, on SmolLM2-135M (CPU).

    python bench/savings.py [--lengths 512 1024 2048 4096] [--json OUT]

For each document length, node A of a three-node swarm prefills the document and sells
its KV; an agent on node C then answers a question about it twice: once buying the
cached prefix (lookup + quote + transfer + load, then its first token), once prefilling
everything itself. Both are timed in this run, and their greedy continuations compared
token for token.
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

from kvx.demo import MODEL_ID, Swarm, document_ids, load_model
from kvx.integrations import hf
from kvx.p2p import PeerClient, wait_for

CONTINUATION = 16


async def measure(lengths: list[int], root: Path) -> list[dict]:
    tokenizer, model = load_model()
    fp = hf.fingerprint(model, hf.tokenizer_hash(tokenizer), model_id=MODEL_ID)
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
            cache, bought = await hf.fetch_prefix(agent, model, fp, ids)
            fetch_s = time.perf_counter() - start
            with torch.no_grad():
                model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
            ttft_bought = time.perf_counter() - start

            start = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=1, do_sample=False)
            ttft_prefill = time.perf_counter() - start

            cache, _ = await hf.fetch_prefix(agent, model, fp, ids)
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
                    "fetch_s": fetch_s,
                    "ratio": ttft_prefill / ttft_bought,
                    "token_exact": bool(torch.equal(a, b)),
                }
            )
            print(
                f"{length} tokens: prefill {ttft_prefill:.2f} s, bought {ttft_bought:.2f} s",
                flush=True,
            )
        await seller.close()
        await agent.close()
    finally:
        swarm.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        f"{'fetch s':>8} {'ratio':>6} {'exact':>6}"
    )
    for r in results:
        print(
            f"{r['tokens']:>7} {r['bought_tokens']:>7} {r['bytes'] / 2**20:>7.1f} "
            f"{r['ttft_prefill_s']:>10.2f} {r['ttft_bought_s']:>9.3f} {r['fetch_s']:>8.3f} "
            f"{r['ratio']:>6.1f} "
            f"{'yes' if r['token_exact'] else 'NO':>6}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "bench": "savings",
                    "model": MODEL_ID,
                    "results": results,
                    "ratios": {f"prefill_vs_bought_{r['tokens']}": r["ratio"] for r in results},
                    "token_exact": all(r["token_exact"] for r in results),
                },
                f,
                indent=2,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
