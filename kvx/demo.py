"""The demo: a local swarm of three nodes, a real model, a real document, one sale.

    python -m kvx.demo [--tokens 1024] [--keep DIR]

Node A reads a document with SmolLM2-135M and sells its KV cache; the advertisement
gossips through node B to node C; an agent on node C asks a question about the document,
buys the cached prefix instead of prefilling it, and generates. The table at the end says
what matched, whether the output is token for token what a full prefill gives, and what
the purchase saved.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import shutil
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvx.integrations import hf
from kvx.p2p import Bought, PeerClient
from kvx.testing import NodeProcess, wait_for

DOCUMENT = files("kvx.conformance") / "PROTOCOL.md"  # a real document that ships with kvx
QUESTION = "\n\nQuestion: what does a buyer send after it has verified every chunk?\nAnswer:"


def document_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of the document, then the question."""
    text = DOCUMENT.read_text()
    doc = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    question = tokenizer(QUESTION, return_tensors="pt").input_ids
    return torch.cat([doc, question], dim=1)


class Swarm:
    """Three node processes on loopback: A (seller), B (relay), C (the agent's node)."""

    def __init__(self, root: Path) -> None:
        self.a = NodeProcess(root / "a", heartbeat_s=1.0, anti_entropy_s=2.0)
        self.a.start().wait_ready()
        self.b = NodeProcess(root / "b", [self.a.dir / "node.json"], heartbeat_s=1.0)
        self.b.start().wait_ready()
        self.c = NodeProcess(root / "c", [self.b.dir / "node.json"], heartbeat_s=1.0)
        self.c.start().wait_ready()

    def stop(self) -> None:
        for node in (self.c, self.b, self.a):
            node.stop()


def prefill_time(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - start, out


def raw_socket_seconds(size: int) -> float:
    """The floor of moving `size` bytes: one loopback socket, `sendall` from a thread,
    `recv_into` a freshly allocated buffer (the bought path also receives into a fresh
    cache), no framing, no hashing."""
    payload = bytes(size)
    listener = socket.create_server(("127.0.0.1", 0))

    def send() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)

    sender = threading.Thread(target=send)
    sender.start()
    start = time.perf_counter()
    dest = torch.empty(size, dtype=torch.uint8)
    with socket.create_connection(listener.getsockname()) as sock:
        view = memoryview(dest.numpy())
        while view:
            got = sock.recv_into(view, len(view), socket.MSG_WAITALL)
            view = view[got:]
    seconds = time.perf_counter() - start
    sender.join()
    listener.close()
    return seconds


async def run(tokens: int, runs: int, root: Path, console: Console) -> Table:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        if not (hf.cache_dir() / "smollm2" / hf.SMOLLM2_GGUF).exists():
            step = progress.add_task("downloading SmolLM2-135M-Instruct (first run only)", total=1)
            await asyncio.to_thread(hf.smollm2_file)
            progress.update(step, completed=1)
        step = progress.add_task("loading SmolLM2-135M-Instruct from disk", total=1)
        loaded = hf.load_smollm2()
        tokenizer, model, fp = loaded.tokenizer, loaded.model, loaded.fp
        progress.update(step, completed=1)

        step = progress.add_task("starting a swarm of three nodes", total=1)
        swarm = Swarm(root)
        progress.update(step, completed=1)
        try:
            ids = document_ids(tokenizer, tokens)
            step = progress.add_task(
                f"node A reads {ids.shape[1]} tokens and sells the KV", total=1
            )
            seller = PeerClient(swarm.a.dir)
            _, published = await hf.publish_prompt(seller, model, fp, ids)
            await seller.close()
            await asyncio.to_thread(wait_for, lambda: swarm.c.call("ads")["ads"], 30)
            progress.update(step, completed=1)

            step = progress.add_task(
                f"the agent on node C buys the prefix and generates ({runs} runs)", total=1
            )
            agent = PeerClient(swarm.c.dir)
            purchases = [await bought_first_token(agent, model, fp, ids) for _ in range(runs)]
            bought, cache = purchases[0].bought, purchases[0].cache
            with torch.no_grad():
                answer = model.generate(
                    ids, past_key_values=cache, max_new_tokens=24, do_sample=False
                )
            # The limit no exchange can beat: these bytes over a raw socket, plus the
            # compute that cannot be bought (the un-bought tokens over a ready cache).
            limits = []
            for _ in range(runs):
                ready, _ = await hf.fetch_prefix(agent, model, fp, ids, max_new_tokens=1)
                start = time.perf_counter()
                with torch.no_grad():
                    model(ids[:, bought.tokens :], past_key_values=ready, logits_to_keep=1)
                limits.append(time.perf_counter() - start + raw_socket_seconds(bought.bytes))
            limit = statistics.median(limits)
            await agent.close()
            progress.update(step, completed=1)

            step = progress.add_task(
                f"the same agent prefills everything itself, to compare ({runs} runs)", total=1
            )
            locals_ = [prefill_time(model, ids) for _ in range(runs)]
            with torch.no_grad():
                reference = model.generate(ids, max_new_tokens=24, do_sample=False)
            progress.update(step, completed=1)
        finally:
            swarm.stop()

    exact = torch.equal(answer, reference) and all(
        torch.equal(p.first, first) for p in purchases for _, first in locals_
    )
    local_s = [seconds for seconds, _ in locals_]
    bought_s = [p.seconds for p in purchases]
    speedups = [a / b for a, b in zip(local_s, bought_s, strict=True)]

    def spread(values: list[float], unit: str = " s", digits: int = 2) -> str:
        middle = f"{statistics.median(values):.{digits}f}{unit}"
        if len(values) == 1:
            return middle
        return f"{middle}  ({min(values):.{digits}f}-{max(values):.{digits}f})"

    middle = sorted(purchases, key=lambda p: p.seconds)[len(purchases) // 2]

    def part(name: str) -> str:  # of the median run, so that the parts add up to it
        return f"{middle.parts[name]:.3f} s"

    question = ids.shape[1] - bought.tokens
    table = Table(title="kvx demo: buying a document's KV cache instead of prefilling it")
    table.add_column("what")
    table.add_column(f"median (min-max) of {runs} runs" if runs > 1 else "value", justify="right")
    moved = f"{bought.bytes / 2**20:.1f} MiB"
    ratio = statistics.median(bought_s) / limit
    rows = [
        ("question asked", QUESTION.strip().removeprefix("Question: ").split("\n")[0]),
        ("prompt: document + question", f"{ids.shape[1]:,} tokens"),
        ("published by node A, bought by the agent", f"{published:,} / {bought.tokens:,} tokens"),
        ("answer token-exact against a full prefill", "yes" if exact else "NO"),
        ("time to first token, full prefill", spread(local_s)),
        ("time to first token, bought prefix", spread(bought_s)),
        ("  the median run: lookup (asking node C)", part("lookup")),
        ("  + negotiation (quote, accept)", part("negotiation")),
        (f"  + transfer ({moved}, every chunk verified)", part("transfer")),
        ("  + checking it against this model, paying", part("check")),
        (f"  + the last {question} tokens, the first new one", part("compute")),
        ("  = its time to first token", f"{middle.seconds:.3f} s"),
        ("speed-up", spread(speedups, "x", 1)),
        ("the limit (see below)", f"{spread(limits)}; the bought path {ratio:.1f}x it"),
        ("credits paid per purchase", f"{bought.price / 1e6:.6f} ({bought.price:,} micro-credits)"),
        ("prefill compute bought", f"{bought.saved_flops / 1e9:,.0f} GFLOP"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    text = tokenizer.decode(answer[0, ids.shape[1] :], skip_special_tokens=True).strip()
    table.caption = (
        "the limit: what no exchange can beat — the same bytes over a raw loopback socket,"
        " plus computing the tokens that were not bought\n"
        f"the agent's answer: {text!r}"
    )
    return table


@dataclass
class Purchase:
    bought: Bought
    cache: object  # a copy of the bought cache, before generate extended it
    first: torch.Tensor  # the prompt and its first new token
    seconds: float  # the whole time to the first token
    parts: dict[str, float]  # where those seconds went; they add up to `seconds`


async def bought_first_token(agent: PeerClient, model, fp, ids: torch.Tensor) -> Purchase:
    """One purchase of the prefix and the first token over it, timed part by part."""
    start = time.perf_counter()
    cache, bought = await hf.fetch_prefix(agent, model, fp, ids)
    fetched = time.perf_counter() - start
    spare = copy.deepcopy(cache)  # generate extends a cache; keep one to continue
    start = time.perf_counter()
    with torch.no_grad():
        first = model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
    compute = time.perf_counter() - start
    t = bought.timings
    parts = {
        "lookup": t["lookup"],
        "negotiation": t["negotiation"],
        "transfer": t["transfer"],
        # the rest of the purchase: the check against the model, the receipt, placing it
        "check": fetched - t["lookup"] - t["negotiation"] - t["transfer"],
        "compute": compute,
    }
    return Purchase(bought, spare, first, fetched + compute, parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="document tokens to read")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each path")
    parser.add_argument("--keep", type=Path, help="keep the nodes' data dirs here")
    args = parser.parse_args()
    console = Console(width=max(100, Console().width))
    root = args.keep or Path(tempfile.mkdtemp(prefix="kvx-demo-"))
    try:
        table = asyncio.run(run(args.tokens, max(1, args.runs), root, console))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    console.print(table)


if __name__ == "__main__":
    main()
