"""N concurrent buyers against a three-node swarm on loopback: lookups and small fetches.

    python bench/load.py [--clients 1 8 64] [--ops 240] [--json OUT]

Nodes A and B each sell 20 small documents; N buyer clients on node C (asyncio tasks in
one process, each its own PeerClient) run `--ops` operations in all, half lookups and half
whole purchases (lookup, quote, accept, transfer, verify, receipt), chosen at random.
The sellers' per-peer rate limit is raised for the test, since every buyer speaks for
node C's one identity. The baseline is a lone client doing the same operations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import blake3

from kvx.p2p import Miss, PeerClient
from kvx.protocol import KVLayout, KvxError
from kvx.testing import NodeProcess, wait_for

LAYOUT = KVLayout(dtype="float16", layers=2, kv_heads=2, head_dim=8, block=16)  # 2 KiB/block
FP = b"\x0f" * 32
DOCS = 20
BUSY = {"rate_per_s": 1e6, "burst": 10**6, "heartbeat_s": 1.0, "metrics_port": -1}


def chain(label: str) -> list[bytes]:
    return [blake3.blake3(f"{label}/{i}".encode()).digest() for i in range(4)]


async def operate(
    client: PeerClient, rng: random.Random, latencies: list[float], errors: list[str]
) -> None:
    doc = f"doc{rng.randrange(DOCS)}/{rng.choice('ab')}"
    start = time.perf_counter()
    try:
        if rng.random() < 0.5:
            matched, _ = await client.lookup(FP, chain(doc))
            if matched != 4:
                raise KvxError(f"lookup matched {matched} of 4")
        else:
            bought = await client.fetch(FP, chain(doc), params=10**9)
            if bought.blocks != 4:
                raise KvxError(f"bought {bought.blocks} of 4 blocks")
    except (KvxError, Miss) as exc:
        errors.append(str(exc))
        return
    latencies.append(time.perf_counter() - start)


async def run_level(data_dir: Path, clients: int, ops: int) -> dict:
    rng = random.Random(clients)
    buyers = [PeerClient(data_dir, timeout_s=30) for _ in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    queue = list(range(ops))

    async def worker(client: PeerClient) -> None:
        while queue:
            queue.pop()
            await operate(client, rng, latencies, errors)

    start = time.perf_counter()
    await asyncio.gather(*(worker(b) for b in buyers))
    seconds = time.perf_counter() - start
    for b in buyers:
        await b.close()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0
    return {
        "clients": clients,
        "ops_per_s": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": p99 * 1000,
        "errors": len(errors),
        "ops": ops,
        "error_samples": sorted(set(errors))[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--ops", type=int, default=240)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvx-load-"))
    nodes = []
    try:
        a = NodeProcess(root / "a", **BUSY).start()
        a.wait_ready()
        b = NodeProcess(root / "b", [a.dir / "node.json"], **BUSY).start()
        c = NodeProcess(root / "c", [a.dir / "node.json"], **BUSY).start()
        nodes = [a, b, c]
        for node in (b, c):
            node.wait_ready()
        for seller, side in ((a, "a"), (b, "b")):
            for i in range(DOCS):
                payload = blake3.blake3(f"doc{i}/{side}".encode()).digest(
                    length=LAYOUT.payload_bytes(4)
                )
                seller.call(
                    "publish",
                    fp=FP,
                    layout=LAYOUT.__dict__,
                    blocks=chain(f"doc{i}/{side}"),
                    payload=payload,
                    chunk=1 << 16,
                    params=10**9,
                )
        wait_for(lambda: len(c.call("ads")["ads"]) == 2 * DOCS, 60)
        results = [asyncio.run(run_level(c.dir, n, args.ops)) for n in args.clients]
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.ops} operations per level (half lookups, half purchases of 8 KiB)")
    print(f"{'clients':>8} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in results:
        print(
            f"{r['clients']:>8} {r['ops_per_s']:>8.1f} {r['p50_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['errors']:>7}"
        )
        for sample in r["error_samples"]:
            print(f"{'':>10}{sample}")
    if args.json:
        base = results[0]["ops_per_s"]
        with open(args.json, "w") as f:
            json.dump(
                {
                    "bench": "load",
                    "ops": args.ops,
                    "results": results,
                    "ratios": {
                        f"throughput_{r['clients']}_vs_1": r["ops_per_s"] / base for r in results
                    },
                },
                f,
                indent=2,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
