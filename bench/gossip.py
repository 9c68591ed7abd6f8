"""How fast a signed advertisement reaches every node of a swarm of real node processes.

    python bench/gossip.py [--sizes 8 16 32] [--ads 5] [--json OUT]

For each swarm size N it starts N `kvx node` processes on loopback, publishes `--ads`
advertisements one at a time from random nodes, and reads each node's structured log for
when (and from whom) each advertisement arrived. It prints the fraction of nodes reached
within the deadline, the median and p99 time for an advertisement to reach every node,
the advertisement messages sent per node per advertisement, and the relay depth, beside
what push gossip predicts: about log2(N) rounds and `fanout` messages per node.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import blake3

from kvx.protocol import KVLayout
from kvx.testing import NodeProcess, wait_for

LAYOUT = KVLayout(dtype="float16", layers=1, kv_heads=1, head_dim=8, block=16)
FANOUT = 3
DEADLINE_S = 15.0
SETTINGS = {  # patient failure detection: this measures spreading, not dying
    "heartbeat_s": 1.0,
    "suspect_after_s": 20.0,
    "dead_after_s": 60.0,
    "anti_entropy_s": 5.0,
    "fanout": FANOUT,
    "metrics_port": -1,
}


def arrivals(node: NodeProcess) -> dict[tuple[str, int], tuple[float, str]]:
    """(signer, seq) -> (arrival time, relayer) from one node's log."""
    out = {}
    for line in (node.dir / "node.log").read_text().splitlines():
        if line.startswith("{") and '"ad_' in line:
            rec = json.loads(line)
            if rec["event"] == "ad_received":
                out[(rec["signer"], rec["seq"])] = (rec["ts"], rec["via"])
            elif rec["event"] == "ad_published":
                out[(rec["node"], rec["seq"])] = (rec["ts"], "")
    return out


def sent_adverts(nodes: list[NodeProcess]) -> float:
    return sum(n.call("status")["sent"]["ADVERTISE"] for n in nodes)


def depth(ad: tuple[str, int], seen: dict[str, dict], publisher: str) -> int:
    """Longest relay chain from the publisher to any node, from the `via` fields."""
    parent = {node: seen[node][ad][1] for node in seen if ad in seen[node] and node != publisher}
    best = 0
    for node in parent:
        hops, cur = 0, node
        while cur != publisher and cur in parent and hops <= len(parent):
            cur, hops = parent[cur], hops + 1
        best = max(best, hops)
    return best


def run(n: int, ads: int, root: Path) -> dict:
    nodes = [NodeProcess(root / "n0", **SETTINGS).start()]
    nodes[0].wait_ready()
    nodes += [
        NodeProcess(root / f"n{i}", [nodes[0].dir / "node.json"], **SETTINGS).start()
        for i in range(1, n)
    ]
    try:
        for node in nodes:
            node.wait_ready(timeout=120)
        wanted = min(n - 1, 2 * FANOUT)
        for node in nodes:  # joined: everyone knows enough live peers to gossip
            wait_for(lambda node=node: node.call("status")["peers"]["alive"] >= wanted, 120, 0.5)
        time.sleep(2.0)
        ids = [node.info["node_id"][:12] for node in nodes]
        before = sent_adverts(nodes)
        published = []
        for k in range(ads):
            publisher = random.randrange(n)
            chain = [blake3.blake3(f"{n}/{k}/{i}".encode()).digest() for i in range(2)]
            nodes[publisher].call(
                "publish",
                fp=b"\x0f" * 32,
                layout=LAYOUT.__dict__,
                blocks=chain,
                payload=bytes(LAYOUT.payload_bytes(2)),
                chunk=1 << 16,
            )
            published.append(publisher)
            time.sleep(DEADLINE_S / ads)
        time.sleep(2.0)
        sent = sent_adverts(nodes) - before
        seen = {ids[i]: arrivals(node) for i, node in enumerate(nodes)}
    finally:
        for node in nodes:
            node.stop()

    reach, spread, depths = [], [], []
    for publisher in published:
        mine = [key for key in seen[ids[publisher]] if key[0] == ids[publisher]]
        ad = max(mine, key=lambda key: seen[ids[publisher]][key][0])  # its latest publish
        start = seen[ids[publisher]][ad][0]
        times = [
            seen[i][ad][0] - start
            for i in ids
            if i != ids[publisher] and ad in seen[i] and seen[i][ad][0] - start <= DEADLINE_S
        ]
        reach.append(len(times) / (n - 1))
        if len(times) == n - 1:
            spread.append(max(times))
        depths.append(depth(ad, seen, ids[publisher]))
    spread.sort()
    return {
        "n": n,
        "reach": statistics.mean(reach),
        "p50_s": statistics.median(spread) if spread else None,
        "p99_s": spread[min(len(spread) - 1, math.ceil(0.99 * len(spread)) - 1)]
        if spread
        else None,
        "msgs_per_node_per_ad": sent / (n * ads),
        "relay_depth_max": max(depths),
        "predicted_rounds_log2n": math.log2(n),
        "predicted_msgs_per_node_per_ad": FANOUT,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--ads", type=int, default=5)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    random.seed(7)
    results = []
    for n in args.sizes:
        root = Path(tempfile.mkdtemp(prefix=f"kvx-gossip-{n}-"))
        try:
            results.append(run(n, args.ads, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        r = results[-1]
        print(f"N={n}: reach {r['reach']:.2f}", flush=True)

    print(
        f"\npush gossip, fanout {FANOUT}, {args.ads} advertisements per size, "
        f"deadline {DEADLINE_S:.0f} s"
    )
    print(
        f"{'N':>4} {'reach':>6} {'p50 s':>7} {'p99 s':>7} {'msgs/node/ad':>13} "
        f"{'relay depth':>12} {'log2 N':>7}"
    )
    for r in results:
        p50 = f"{r['p50_s']:.3f}" if r["p50_s"] is not None else "—"
        p99 = f"{r['p99_s']:.3f}" if r["p99_s"] is not None else "—"
        print(
            f"{r['n']:>4} {r['reach']:>6.2f} {p50:>7} {p99:>7} "
            f"{r['msgs_per_node_per_ad']:>13.2f} {r['relay_depth_max']:>12} "
            f"{r['predicted_rounds_log2n']:>7.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"bench": "gossip", "fanout": FANOUT, "deadline_s": DEADLINE_S, "results": results},
                f,
                indent=2,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
