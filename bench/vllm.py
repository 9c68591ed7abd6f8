"""Time to first token in vLLM (CPU build) with a prefix bought through kvx, against
vLLM's own prefill, on SmolLM2-135M in float32.

    python bench/vllm.py [--lengths 1024 2048 4096] [--json OUT]

Two kvx nodes on loopback. Engine A (with the kvx connector, on node A) computes each
document and sells its KV; an engine without kvx prefills document + question (the
baseline); engine B (with the connector, on node B) gets the same prompts and buys the
documents' blocks. Each engine runs as vLLM deploys it (engine core and worker in
processes of their own). Time to first token is one prompt's `generate` with one new
token, timed around the call; the greedy continuations of both are compared token for
token. vLLM needs the model as a safetensors directory: the demo's GGUF is converted
once into ~/.cache/kvx (dequantised: a quantised GGUF cannot be saved as one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINE = Path(__file__).parent.parent / "tests" / "vllm_engine.py"
CONTINUATION = 16


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (float32 safetensors and its
    tokenizer), made once from the demo's GGUF."""
    from kvx.integrations import hf

    where = hf.cache_dir() / "smollm2-135m-instruct"
    if (where / "config.json").exists():
        return where
    return hf.export_model_dir(hf.load_smollm2(), where)


def prompts(model: Path, lengths: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Each document and document + question. The documents are consecutive parts of the
    spec, so that no two share a prefix: vLLM's own prefix cache would otherwise hand
    the longer ones the shorter ones' pages, in both engines."""
    from transformers import AutoTokenizer

    from kvx.demo import DOCUMENT, QUESTION

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer(DOCUMENT.read_text()).input_ids
    question = tokenizer(QUESTION).input_ids
    if sum(lengths) > len(text):
        raise SystemExit(f"the spec has {len(text):,} tokens, fewer than {sum(lengths):,}")
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    docs = [text[s : s + n] for s, n in zip(starts, lengths, strict=True)]
    return docs, [doc + question for doc in docs]


def engine(model: Path, data_dir: Path | None, prompts: list, **options) -> dict:
    """One engine run; its greedy outputs and, with ttft, each prompt's first token time."""
    options = {"max_model_len": 8192, "max_tokens": CONTINUATION, "memory": 0.3, **options}
    args = [str(model), str(data_dir) if data_dir else "-", json.dumps(prompts)]
    run = subprocess.run(
        [sys.executable, str(ENGINE), *args, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if run.returncode != 0:
        raise SystemExit(f"the engine failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    found = {}
    for line in run.stdout.splitlines():
        for key in ("OUT", "TTFT"):
            if line.startswith(key + ":"):
                found[key] = json.loads(line[len(key) + 1 :])
    return found


def measure(lengths: list[int], root: Path) -> list[dict]:
    from kvx.testing import NodeProcess, wait_for

    model = smollm2_dir()
    docs, asked = prompts(model, lengths)
    a = NodeProcess(root / "a", heartbeat_s=1.0).start()
    a.wait_ready()
    b = NodeProcess(root / "b", [a.dir / "node.json"], heartbeat_s=1.0).start()
    b.wait_ready()
    try:
        engine(model, a.dir, docs, max_tokens=1)  # computes and sells each document
        wait_for(lambda: len(b.call("ads")["ads"]) == len(lengths), 60)
        own = engine(model, None, asked, ttft=True)
        with_kvx = engine(model, b.dir, asked, ttft=True)
        purchases = b.events("bought")
    finally:
        a.stop()
        b.stop()
    if len(purchases) != len(lengths):
        raise SystemExit(f"expected {len(lengths)} purchases, the buyer's node logged {purchases}")
    results = []
    for i, n in enumerate(lengths):
        results.append(
            {
                "tokens": len(asked[i]),
                "document": n,
                "bought_tokens": purchases[i]["tokens"],
                "bytes": purchases[i]["bytes"],
                "prefill_s": own["TTFT"][i],
                "bought_s": with_kvx["TTFT"][i],
                "fetch_s": purchases[i]["seconds"],
                "token_exact": own["OUT"][i] == with_kvx["OUT"][i],
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args.lengths, Path(tmp))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vLLM (CPU, SmolLM2-135M fp32): time to first token")
    for column in ("prompt", "bought", "MiB moved", "prefill s", "bought s", "fetch s", "ratio"):
        table.add_column(column, justify="right")
    table.add_column("token-exact")
    for r in results:
        table.add_row(
            f"{r['tokens']:,}",
            f"{r['bought_tokens']:,}",
            f"{r['bytes'] / 2**20:.1f}",
            f"{r['prefill_s']:.2f}",
            f"{r['bought_s']:.3f}",
            f"{r['fetch_s']:.3f}",
            f"{r['prefill_s'] / r['bought_s']:.1f}x",
            "yes" if r["token_exact"] else "NO",
        )
    Console(width=110).print(table)
    wall = time.perf_counter() - start
    print(f"whole bench: {wall:.0f} s")
    if args.json:
        figures = {
            "results": results,
            "token_exact": all(r["token_exact"] for r in results),
            "ratios": {
                f"vllm_prefill_vs_bought_{r['document']}": r["prefill_s"] / r["bought_s"]
                for r in results
            },
            "wall_s": wall,
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
