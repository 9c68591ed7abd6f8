"""What checking bought KV against the buyer's own model costs and catches (spec §12.2),
on SmolLM2-135M in float32 (CPU).

    python bench/verify.py [--parts ttft detection errors proof vllm] [--json OUT]

1. Time to first token of a bought 1K and 4K prefix (three node processes on loopback)
   with each policy — off, layer0, spot:4/16/64, full — interleaved round by round,
   medians; and the default (spot:16/32) against off, purchase by purchase, as means
   over many purchases, since its deep part runs on one purchase in 32.
2. Detection per purchase: a span of m tokens whose deeper layers come from another text
   (layer 0 honest, so only spots can see it) at a random place in a 512-token prefix, checked
   with K spots, over seeded purchases, beside 1-(1-m/n)^K; and a spliced instruction of
   m tokens, which layer 0 sees wherever it is.
3. Honest differences: the worst relative error of every honest purchase, layer 0 and
   spot:64, KV computed with 1 or 2 threads and checked with 2 (Hugging Face both
   sides), and KV computed by vLLM bought by Hugging Face and the other way round
   through real engines and nodes; beside them the errors of each attack class. The
   thresholds must sit between the two; `honest_pass_rate` counts refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the attack classes
import liars

from kvx.demo import DOCUMENT, Swarm, document_ids
from kvx.integrations import hf
from kvx.integrations.verify import (
    DEEP_TOLERANCE,
    LAYER0_TOLERANCE,
    check_spots,
    draw_positions,
    judge,
    layer0_kv,
    relative_errors,
    spot_errors,
)
from kvx.p2p import PeerClient
from kvx.testing import wait_for
from kvx.trust import DEFAULT_VERIFY

# bench/vllm.py, by path: as a module named `vllm` it would hide vLLM itself.
_spec = importlib.util.spec_from_file_location("bench_vllm", Path(__file__).with_name("vllm.py"))
BENCH_VLLM = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BENCH_VLLM)

POLICIES = ("off", "layer0", "spot:4", "spot:16", "spot:64")
SPANS, SPOTS = (1, 8, 64), (4, 16, 64)


async def ttft(model, fp, tokenizer, root: Path, lengths, repeats: int) -> list[dict]:
    swarm = Swarm(root)
    rows = []
    try:
        seller, agent = PeerClient(swarm.a.dir), PeerClient(swarm.c.dir)
        for length in lengths:
            ids = document_ids(tokenizer, length)
            root_hex = (await hf.publish_prompt(seller, model, fp, ids))[0].hex()
            await asyncio.to_thread(
                wait_for, lambda r=root_hex: r in {a["root"] for a in swarm.c.call("ads")["ads"]}
            )

            async def first_token(policy, rng=None, ids=ids) -> float:
                start = time.perf_counter()
                cache, _ = await hf.fetch_prefix(
                    agent, model, fp, ids, max_new_tokens=1, verify=policy, rng=rng
                )
                with torch.no_grad():
                    model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
                return time.perf_counter() - start

            await first_token("off")  # warm
            times: dict[str, list[float]] = {p: [] for p in POLICIES}
            for _ in range(repeats):  # interleaved, so a slow moment hits every policy
                for policy in POLICIES:
                    times[policy].append(await first_token(policy))
            # The default against no check, purchase for purchase, many times: a mean,
            # since its deep part runs on one purchase in 32 (a median would never see it).
            rng = _Counting(length)
            plain, default = [], []
            for _ in range(8 * repeats):
                plain.append(await first_token("off"))
                default.append(await first_token(DEFAULT_VERIFY, rng))
            full = await first_token("full")
            row = {
                "tokens": length,
                **{f"{p}_s": statistics.median(t) for p, t in times.items()},
                "full_s": full,
                "paired_off_mean_s": statistics.fmean(plain),
                "default_mean_s": statistics.fmean(default),
                "default_deep_runs": rng.deep,
                "default_purchases": len(default),
            }
            rows.append(row)
            print(
                f"{length} tokens: "
                + ", ".join(f"{p} {row[f'{p}_s'] * 1000:.0f} ms" for p in POLICIES)
                + f", default {row['default_mean_s'] * 1000:.0f} ms",
                flush=True,
            )
        await seller.close()
        await agent.close()
    finally:
        swarm.stop()
    return rows


class _Counting(random.Random):
    """A seeded rng that counts the purchases whose deep part it drew (the default policy
    runs it on one purchase in DEFAULT_VERIFY.every)."""

    deep = 0

    def randrange(self, *args, **kwargs):
        drawn = super().randrange(*args, **kwargs)
        self.deep += args == (DEFAULT_VERIFY.every,) and drawn == 0
        return drawn


def detection(model, fp, tokenizer, purchases: int) -> list[dict]:
    """Deep lies over a span of m of n tokens, placed at random, checked with K spots:
    the seller replaces the span's deeper layers with another text's and recomputes every
    later position over the lie, so that only the span is not the model's continuation
    of the bought prefix (what 1-(1-m/n)^K describes; a seller that leaves the later
    positions as they were is caught more often, since they no longer follow from the
    prefix). And spliced tokens, which layer 0 sees wherever they are."""
    n = 512  # (a 1K prefix gives the same rates at twice the time)
    ids = document_ids(tokenizer, n)
    text = DOCUMENT.read_text()
    other = tokenizer(text, return_tensors="pt").input_ids[:, 5000 : 5000 + n]
    elsewhere = liars.prefill(model, other)
    cache = liars.bought(model, fp.layout, liars.prefill(model, ids[:, :n]), n)
    honest = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    rows = []
    for m in SPANS:
        rng = random.Random(m)
        caught = dict.fromkeys(SPOTS, 0)
        for _ in range(purchases):
            start = rng.randrange(n - m + 1)
            span = slice(start, start + m)
            for layer, src in list(zip(cache.layers, elsewhere.layers, strict=True))[1:]:
                layer.keys[:, :, span] = src.keys[:, :, span]
                layer.values[:, :, span] = src.values[:, :, span]
            if start + m < n:  # the rest recomputed over the lie
                for layer in cache.layers:
                    layer.cumulative_length.fill_(start + m)
                with torch.no_grad():
                    model(ids[:, start + m : n], past_key_values=cache, use_cache=True)
            for k in SPOTS:
                spots = draw_positions(n, k, rng)
                caught[k] += check_spots(model, ids, cache, n, spots) is not None
            for layer, (k_, v_) in zip(cache.layers, honest, strict=True):
                layer.keys.copy_(k_)
                layer.values.copy_(v_)
                layer.cumulative_length.fill_(n)
        for k, hits in caught.items():
            rows.append(
                {
                    "attack": "deep span",
                    "span": m,
                    "spots": k,
                    "purchases": purchases,
                    "caught": hits / purchases,
                    "expected": 1 - (1 - m / n) ** k,
                }
            )
        print(f"deep span of {m} tokens: caught {caught} of {purchases}", flush=True)
    mine = layer0_kv(model, ids[:, :n])
    for m in SPANS:
        rng = random.Random(m)
        caught = 0
        for _ in range(purchases):
            at = rng.randrange(n - m + 1)
            poisoned = ids[:, :n].clone()
            poisoned[:, at : at + m] = torch.randint(0, 49152, (1, m), generator=_gen(rng))
            theirs = layer0_kv(model, poisoned)
            err = relative_errors(theirs[0][0], mine[0][0]).max()
            caught += float(err) > LAYER0_TOLERANCE
        rows.append(
            {
                "attack": "spliced",
                "span": m,
                "spots": 0,
                "purchases": purchases,
                "caught": caught / purchases,
                "expected": 1.0,
            }
        )
    return rows


def _gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def worst_errors(model, ids, cache, n: int, spots: list[int]) -> tuple[float, float]:
    """The largest layer-0 error over every position and the largest deep error over
    `spots`, of a cache against the model: what the thresholds are compared with."""
    first = cache.layers[0]
    mine_k, mine_v = layer0_kv(model, ids[:, :n])
    shallow = max(
        float(relative_errors(first.keys[0, :, :n], mine_k[0]).max()),
        float(relative_errors(first.values[0, :, :n], mine_v[0]).max()),
    )
    deep = max(
        float(e.max()) for errs in spot_errors(model, ids, cache, n, spots) for e in errs.values()
    )
    return shallow, deep


def honest_hf(model, fp, tokenizer, purchases: int) -> dict:
    """HF seller (1 or 2 threads) to HF buyer (2 threads), over documents of the corpus."""
    text = tokenizer(DOCUMENT.read_text(), return_tensors="pt").input_ids
    n, docs = 1024, 10
    errors, refused = [], 0
    rng = random.Random(7)
    threads = torch.get_num_threads()
    for d in range(docs):
        ids = text[:, d * 1500 : d * 1500 + n + 1]
        for seller_threads in (1, threads):
            torch.set_num_threads(seller_threads)
            sold = liars.prefill(model, ids[:, :n])
            torch.set_num_threads(threads)
            cache = liars.bought(model, fp.layout, sold, n)
            for _ in range(purchases // (2 * docs)):
                shallow, deep = worst_errors(model, ids, cache, n, draw_positions(n, 64, rng))
                errors.append((shallow, deep))  # spot:64's check, with its errors kept
                refused += shallow > LAYER0_TOLERANCE or deep > DEEP_TOLERANCE
    return {"pair": "hf-hf", "purchases": len(errors), "refused": refused, "errors": errors}


def dishonest(model, fp, tokenizer) -> list[dict]:
    """The worst errors of each attack class, on one 1K document."""
    ids = document_ids(tokenizer, 1024)
    n = 1024
    text = tokenizer(DOCUMENT.read_text(), return_tensors="pt").input_ids
    other = text[:, 6000 : 6000 + n]
    doc = ids[:, :n]
    attacks = {
        "another document": liars.another_document(model, doc, other),
        "spliced 1 token": liars.spliced(model, doc, other[:, :1], at=500),
        "spliced 64 tokens": liars.spliced(model, doc, other[:, :64], at=300),
        "deep from another text": liars.deep_from(model, doc, other),
        "noise 5% in layer 15": liars.noisy_layer(model, doc, layer=15),
        "other weights (+2% noise)": liars.other_weights(model, doc),
        "bfloat16 as float32": liars.in_bfloat16(model, doc),
    }
    rng = random.Random(3)
    rows = []
    for name, sold in attacks.items():
        spots = draw_positions(n, 64, rng)
        shallow, deep = worst_errors(model, ids, liars.bought(model, fp.layout, sold, n), n, spots)
        rows.append({"attack": name, "layer0": shallow, "deep": deep})
    return rows


def honest_vllm(model_path: Path, root: Path, docs: int, rounds: int) -> dict:
    """vLLM sells, Hugging Face buys with spot:64 (`rounds` purchases a document), and
    vLLM buys what Hugging Face sold with spot:64 in its connector. Refusals are what
    the buyer's node logged; a purchase that missed for any other reason is a failure of
    the bench, not a refusal, and stops it."""
    from kvx.p2p import SyncPeerClient
    from kvx.testing import NodeProcess

    loaded = hf.load_model(model_path)
    texts, _ = BENCH_VLLM.prompts(model_path, [1024] * (2 * docs))
    sold_by_vllm, sold_by_hf = texts[:docs], texts[docs:]
    a = NodeProcess(root / "va").start()
    a.wait_ready()
    b = NodeProcess(root / "vb", [a.dir / "node.json"], tables='[policy]\nverify = "spot:64"\n')
    b.start().wait_ready()
    try:
        BENCH_VLLM.engine(model_path, a.dir, sold_by_vllm, max_tokens=1)
        with SyncPeerClient(a.dir) as seller:
            for doc in sold_by_hf:
                hf.publish_prompt_sync(seller, loaded.model, loaded.fp, torch.tensor([doc]))
        wait_for(lambda: len(b.call("ads")["ads"]) >= 2 * docs, 60)
        errors, rng = [], random.Random(11)
        with SyncPeerClient(b.dir) as buyer:
            for _ in range(rounds):
                for doc in sold_by_vllm:
                    ids = torch.tensor([[*doc, 13]])
                    cache, bought = hf.fetch_prefix_sync(
                        buyer, loaded.model, loaded.fp, ids, max_new_tokens=64
                    )
                    n = bought.tokens
                    errors.append(
                        worst_errors(loaded.model, ids, cache, n, draw_positions(n, 64, rng))
                    )
        hf_refused = len(b.events("refused"))
        BENCH_VLLM.engine(model_path, b.dir, [[*doc, 13] for doc in sold_by_hf], max_tokens=1)
        by_vllm = len(b.events("bought")) - rounds * docs
    finally:
        b.stop()
        a.stop()
    return {
        "pair": "vllm-hf",
        "purchases": rounds * docs + docs,
        "refused": len(b.events("refused")),
        "hf_refused_vllm_kv": hf_refused,
        "errors": errors,
        "vllm_bought_hf_kv": by_vllm,
    }


def proof(model, fp, tokenizer) -> dict:
    """A layer-0 proof against a 4K-token purchase of KV from other weights: its size,
    and the time to bind it (hashes, signature, chain) and judge it (one layer-0 forward)."""
    from kvx.protocol import (
        Advertise,
        DataAddress,
        Header,
        chunk_hashes,
        content_root,
        prefix_chain,
    )
    from kvx.trust import Evidence, Identity, bind, covering_chunks, seal

    n, chunk = 4096, 4 << 20
    ids = document_ids(tokenizer, n)
    doc = ids[:, :n]
    payload = hf.pack(liars.other_weights(model, doc), fp.layout, n // fp.layout.block)
    payload = payload.numpy().tobytes()
    hashes = chunk_hashes(payload, chunk)
    ad = Advertise(
        fp=fp.digest(),
        layout=fp.layout,
        blocks=tuple(prefix_chain(fp.digest(), doc[0].tolist(), fp.layout.block)),
        root=content_root(len(payload), chunk, hashes),
        chunk=chunk,
        price=1,
        ctl="tcp://127.0.0.1:9",
        data=(DataAddress("tcp", "127.0.0.1:9"),),
    )
    now = time.time_ns() // 1_000_000
    claim = seal(Identity.generate(), ad, Header(iat=now, exp=now + 3_600_000, seq=1))
    position = 3000
    covering = covering_chunks(fp.layout, chunk, position)
    evidence = Evidence(
        claim=claim,
        tokens=tuple(doc[0, : (position // fp.layout.block + 1) * fp.layout.block].tolist()),
        position=position,
        hashes=b"".join(hashes),
        chunks=tuple((i, payload[i * chunk : (i + 1) * chunk]) for i in covering),
    )
    data = evidence.encode()
    start = time.perf_counter()
    bound = bind(Evidence.decode(data))
    bind_s = time.perf_counter() - start
    start = time.perf_counter()
    found = judge(model, bound)
    judge_s = time.perf_counter() - start
    return {
        "tokens": n,
        "chunk": chunk,
        "proof_bytes": len(data),
        "claim_bytes": len(claim),
        "bind_s": bind_s,
        "judge_s": judge_s,
        "convicts": found is not None,
    }


def print_ttft(times: list[dict]) -> None:
    print(f"\nSmolLM2-135M (float32, CPU, {torch.get_num_threads()} threads): time to first token")
    print("medians of interleaved rounds:")
    print(f"{'tokens':>7} " + " ".join(f"{p:>9}" for p in (*POLICIES, "full")))
    for r in times:
        cells = [r[f"{p}_s"] for p in POLICIES] + [r["full_s"]]
        print(f"{r['tokens']:>7} " + " ".join(f"{c * 1000:>7.0f}ms" for c in cells))
    print(f"the default ({DEFAULT_VERIFY}) against off, purchase by purchase, means:")
    for r in times:
        print(
            f"{r['tokens']:>7} off {r['paired_off_mean_s'] * 1000:.0f} ms, default"
            f" {r['default_mean_s'] * 1000:.0f} ms over {r['default_purchases']} purchases"
            f" ({r['default_deep_runs']} ran the deep part)"
        )


def print_detection(detect: list[dict]) -> None:
    print("\ndetection per purchase (512 bought tokens)")
    print(f"{'attack':<24} {'span':>5} {'spots':>6} {'caught':>7} {'1-(1-m/n)^K':>12}")
    for r in detect:
        print(
            f"{r['attack']:<24} {r['span']:>5} {r['spots']:>6} {r['caught']:>7.2f} "
            f"{r['expected']:>12.3f}"
        )


def print_errors(honest: list[dict], lies: list[dict]) -> None:
    print(
        f"\nhonest purchases, worst relative error (thresholds: layer 0 {LAYER0_TOLERANCE:g},"
        f" deep {DEEP_TOLERANCE:g})"
    )
    for h in honest:
        errors = h["errors"]
        print(
            f"  {h['pair']}, {h['purchases']} purchases: layer 0 max"
            f" {max(e[0] for e in errors):.2e}, deep max {max(e[1] for e in errors):.2e};"
            f" refused {h['refused']}"
        )
    print("attack classes, worst relative error")
    for r in lies:
        print(f"  {r['attack']:<28} layer 0 {r['layer0']:>9.3g}   deep {r['deep']:>9.3g}")


PARTS = ("ttft", "detection", "errors", "proof", "vllm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--purchases", type=int, default=100)
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: all of them"
    )
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    loaded = hf.load_smollm2()
    model, fp, tokenizer = loaded.model, loaded.fp, loaded.tokenizer
    root = Path(tempfile.mkdtemp(prefix="kvx-verify-"))
    out: dict = {
        "bench": "verify",
        "model": hf.SMOLLM2_ID,
        "default": str(DEFAULT_VERIFY),
        "thresholds": {"layer0": LAYER0_TOLERANCE, "deep": DEEP_TOLERANCE},
    }
    ratios = {}
    try:
        if "ttft" in args.parts:
            out["ttft"] = asyncio.run(ttft(model, fp, tokenizer, root, args.lengths, args.repeats))
            print_ttft(out["ttft"])
            at_4k = next((r for r in out["ttft"] if r["tokens"] == 4096), None)
            if at_4k:
                ratios["verified_vs_unverified_ttft_4096"] = (
                    at_4k["paired_off_mean_s"] / at_4k["default_mean_s"]
                )
        if "detection" in args.parts:
            out["detection"] = detection(model, fp, tokenizer, args.purchases)
            print_detection(out["detection"])
        honest = []
        if "errors" in args.parts:
            honest.append(honest_hf(model, fp, tokenizer, 2 * args.purchases))
            out["attacks"] = dishonest(model, fp, tokenizer)
        if "vllm" in args.parts and importlib.util.find_spec("vllm") is not None:
            honest.append(honest_vllm(BENCH_VLLM.smollm2_dir(), root, docs=5, rounds=20))
        if honest:
            print_errors(honest, out.get("attacks", []))
            purchases = sum(h["purchases"] for h in honest)
            ratios["honest_pass_rate"] = 1 - sum(h["refused"] for h in honest) / purchases
        if "proof" in args.parts:
            proved = out["proof"] = proof(model, fp, tokenizer)
            print(
                f"\na layer-0 proof at {proved['tokens']} tokens ({proved['chunk'] >> 20} MiB"
                f" chunks): {proved['proof_bytes'] / 2**20:.2f} MiB; bind"
                f" {proved['bind_s'] * 1000:.0f} ms, judge {proved['judge_s'] * 1000:.0f} ms;"
                f" convicts: {proved['convicts']}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if args.json:
        for h in honest:
            errors = h.pop("errors")
            h["layer0_max"] = max(e[0] for e in errors)
            h["deep_max"] = max(e[1] for e in errors)
        out["honest"] = honest
        out["ratios"] = ratios
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
