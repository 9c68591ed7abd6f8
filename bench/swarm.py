"""One purchase from 1, 2, 3 and 4 providers at once, over shaped links between hosts.

    sudo .venv/bin/python bench/swarm.py [--runs 2] [--rate 200] [--delay-ms 10] [--json OUT]

A buyer and six sellers, each on a host of its own (a network namespace on a bridge).
Each seller's link to the bridge is shaped with tc netem: `--rate` Mbit/s and
`--delay-ms` one way, and one seller at a tenth of that rate. Every case starts its own
node processes, publishes a 4K-token SmolLM2-135M-shaped payload (fp32, 30 layers, 3
KV heads, head_dim 64: 180 MiB of bytes, not a real prefill: the bench measures the
wire) and buys it `--runs` times, each time through a new buyer node and PeerClient:

    1, 2, 3 fast providers; 3 fast + the slow one; 3 fast + one that stalls after three
    chunks of every stream; 3 fast + one that flips a bit of every odd chunk.

After each case the sellers are stopped and their ledgers read: every seller must hold
receipts for exactly the bytes the buyer kept of it (`paid_bytes_vs_delivered`, 1.0).
`ratios`: striped_3_vs_single = time(1) / time(3); striped_with_staller_vs_without =
time(3) / time(3 + staller). Root and iproute2 (ip, tc) are needed; only the
namespaces' own addresses are contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

from kvx.protocol import DEFAULT_CHUNK_BYTES, KVLayout, prefix_chain
from kvx.testing import NodeProcess

LAYOUT = KVLayout(dtype="float32", layers=30, kv_heads=3, head_dim=64, block=32)
TOKENS = 4096
FP = blake3.blake3(b"kvx swarm bench: SmolLM2-135M-shaped").digest()
FAULTY = Path(__file__).resolve().parent.parent / "tests" / "faulty.py"
SELLERS = ("fast1", "fast2", "fast3", "slow", "staller", "liar")
CASES = {
    "1 provider": ("fast1",),
    "2 providers": ("fast1", "fast2"),
    "3 providers": ("fast1", "fast2", "fast3"),
    "3 + slow (1/10 rate)": ("fast1", "fast2", "fast3", "slow"),
    "3 + staller": ("fast1", "fast2", "fast3", "staller"),
    "3 + liar": ("fast1", "fast2", "fast3", "liar"),
}


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


class Hosts:
    """The buyer and the sellers, each in a namespace with a veth to one bridge."""

    def __init__(self, rate_mbit: int, delay_ms: int) -> None:
        tag = f"kvs{os.getpid() % 10000}"
        self.switch = f"{tag}sw"
        self.names = {role: f"{tag}{i}" for i, role in enumerate(("buyer", *SELLERS))}
        self.subnet = f"10.198.{os.getpid() % 250}"
        self.made: list[str] = []
        self.delayed = False
        try:
            sh("ip", "netns", "add", self.switch)
            self.made.append(self.switch)
            self._in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
            self._in(self.switch, "ip", "link", "set", "br0", "up")
            for role, ns in self.names.items():
                sh("ip", "netns", "add", ns)
                self.made.append(ns)
                inside, outside = f"{ns}i", f"{ns}o"
                sh("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
                sh("ip", "link", "set", inside, "netns", ns)
                sh("ip", "link", "set", outside, "netns", self.switch)
                self._in(ns, "ip", "addr", "add", f"{self.address(role)}/24", "dev", inside)
                self._in(ns, "ip", "link", "set", inside, "up")
                self._in(ns, "ip", "link", "set", "lo", "up")
                self._in(self.switch, "ip", "link", "set", outside, "master", "br0", "up")
                if role != "buyer":  # the seller's side of its link: what it sends is shaped
                    rate = rate_mbit // 10 if role == "slow" else rate_mbit
                    self.delayed = self._shape(ns, inside, rate, delay_ms)
        except Exception:
            self.close()
            raise

    def _shape(self, ns: str, dev: str, rate: int, delay_ms: int) -> bool:
        """netem with the delay where the kernel has it; else a token bucket (tbf), rate
        only: True if the delay is in place."""
        netem = ("netem", "delay", f"{delay_ms}ms", "rate", f"{rate}mbit", "limit", "100000")
        try:
            self._in(ns, "tc", "qdisc", "replace", "dev", dev, "root", *netem)
            return True
        except subprocess.CalledProcessError:
            tbf = ("tbf", "rate", f"{rate}mbit", "burst", "512k", "latency", "100ms")
            self._in(ns, "tc", "qdisc", "replace", "dev", dev, "root", *tbf)
            return False

    def _in(self, ns: str, *args: str) -> None:
        sh("ip", "netns", "exec", ns, *args)

    def address(self, role: str) -> str:
        return f"{self.subnet}.{list(self.names).index(role) + 1}"

    def prefix(self, role: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[role])

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def node(hosts: Hosts, role: str, data_dir: Path, bootstrap: list[Path] = ()) -> NodeProcess:
    fault = {"staller": "stall", "liar": "lie"}.get(role)
    wrapper = () if fault is None else (sys.executable, str(FAULTY), fault, "--")
    return NodeProcess(
        data_dir,
        bootstrap,
        prefix=(*hosts.prefix(role), *wrapper),
        listen=f"tcp://{hosts.address(role)}:0",
        data_host=hosts.address(role),
    ).start()


def paid_bytes(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "ledger.db") as db:
        return db.execute("SELECT COALESCE(SUM(bytes), 0) FROM receipts").fetchone()[0]


def run_case(hosts: Hosts, name: str, roles: tuple[str, ...], runs: int, work: Path) -> dict:
    work = work / name.replace(" ", "_").replace("/", "_")
    chain = prefix_chain(FP, list(range(TOKENS)), LAYOUT.block)
    payload = blake3.blake3(b"kvx swarm bench payload").digest(
        length=LAYOUT.payload_bytes(len(chain))
    )
    sellers = {role: node(hosts, role, work / role) for role in roles}
    buyer = None
    try:
        for seller in sellers.values():
            seller.wait_ready()
            seller.call(
                "publish",
                fp=FP,
                layout=LAYOUT.__dict__,
                blocks=chain,
                chunk=DEFAULT_CHUNK_BYTES,
                payload=payload,
                params=135_000_000,
            )
        ids = {role: s.info["node_id"] for role, s in sellers.items()}
        purchases = []
        for run in range(runs):  # a new buyer each time: none is a repeat customer
            known = [s.dir / "node.json" for s in sellers.values()]
            buyer = node(hosts, "buyer", work / f"buyer{run}", known)
            buyer.wait_ready()
            command = [sys.executable, __file__, "--role", "buyer", "--dir", str(buyer.dir)]
            command += ["--runs", "1", "--providers", str(len(roles))]
            out = subprocess.run(
                [*hosts.prefix("buyer"), *command], capture_output=True, text=True, timeout=600
            )
            buyer.stop()
            buyer = None
            if out.returncode != 0:
                raise RuntimeError(f"the buyer failed: {out.stderr[-3000:]}")
            purchases += json.loads(out.stdout)
    finally:
        if buyer is not None:
            buyer.stop()
        for seller in sellers.values():
            seller.stop()
    delivered = {role: 0 for role in roles}
    by_id = {v: k for k, v in ids.items()}
    for p in purchases:
        for provider, n in p["delivered"].items():
            delivered[by_id[provider]] += n
    paid = {role: paid_bytes(sellers[role].dir) for role in roles}
    seconds = [p["seconds"] for p in purchases]
    # The runs in which the faulty provider got a range and broke it: a run whose split
    # was made before its quote came never met it, and says nothing of the fault.
    bad = {ids[r] for r in roles if r in ("staller", "liar")}
    met = [p["seconds"] for p in purchases if not bad or bad & {f[0] for f in p["faults"]}]
    return {
        "providers": list(roles),
        "seconds": seconds,
        "median_s": statistics.median(met or seconds),
        "runs_meeting_the_fault": len(met) if bad else None,
        "MiB_per_s": len(payload) / (1 << 20) / statistics.median(seconds),
        "delivered": delivered,
        "paid": paid,
        "faults": sorted(
            {
                f"{by_id.get(f[0], f[0][:8])}: {f[1]} ({f[2]})"
                for p in purchases
                for f in p["faults"]
            }
        ),
    }


def buyer_role(data_dir: Path, runs: int, providers: int) -> None:
    """Inside the buyer's host: wait until the node lists every provider, then buy."""
    from kvx.p2p import SyncPeerClient
    from kvx.testing import wait_for

    chain = prefix_chain(FP, list(range(TOKENS)), LAYOUT.block)
    client = SyncPeerClient(data_dir, timeout_s=30)
    out = []
    try:
        wait_for(lambda: len(client.lookup(FP, chain, limit=8)[1]) >= providers, 60)
        for _ in range(runs):
            bought = client.fetch(FP, chain, params=135_000_000)
            out.append(
                {
                    "seconds": bought.seconds,
                    "delivered": {k.hex(): v for k, v in bought.delivered.items()},
                    "faults": [(f.provider.hex(), f.code.name, f.detail) for f in bought.faults],
                }
            )
    finally:
        client.close()
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rate", type=int, default=200, help="Mbit/s of a fast seller's link")
    parser.add_argument("--delay-ms", type=int, default=10)
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--role", choices=["buyer"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--providers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "buyer":
        buyer_role(args.dir, args.runs, args.providers)
        return
    if os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("ip") is None:
        sys.exit("bench/swarm.py needs root and iproute2 (ip, tc): network namespaces")
    hosts = Hosts(args.rate, args.delay_ms)
    work = Path(tempfile.mkdtemp(prefix="kvx-swarm-"))
    results = {}
    try:
        for name in args.cases:
            roles = CASES[name]
            started = time.monotonic()
            results[name] = run_case(hosts, name, roles, args.runs, work)
            took = time.monotonic() - started
            print(f"  {name}: {results[name]['median_s']:.2f} s ({took:.0f} s)", file=sys.stderr)
    finally:
        hosts.close()
        shutil.rmtree(work, ignore_errors=True)
    delivered = sum(sum(r["delivered"].values()) for r in results.values())
    paid = sum(sum(r["paid"].values()) for r in results.values())
    ratios = {"paid_bytes_vs_delivered": paid / delivered}
    for name, over, under in (
        ("striped_3_vs_single", "1 provider", "3 providers"),
        ("striped_with_staller_vs_without", "3 providers", "3 + staller"),
    ):
        if over in results and under in results:
            ratios[name] = results[over]["median_s"] / results[under]["median_s"]
    print(f"\n{'case':<24} {'median s':>9} {'MiB/s':>7}  runs (s)  kept MiB by provider")
    for name, r in results.items():
        kept = " ".join(f"{k}={v / (1 << 20) / args.runs:.0f}" for k, v in r["delivered"].items())
        runs = " ".join(f"{s:.2f}" for s in r["seconds"])
        if r["runs_meeting_the_fault"] is not None:
            runs += f" (median of the {r['runs_meeting_the_fault']} that met the fault)"
        print(f"{name:<24} {r['median_s']:>9.2f} {r['MiB_per_s']:>7.1f}  {runs}  {kept}")
        for fault in r["faults"]:
            print(f"{'':<24} fault: {fault}")
    delay = f"{args.delay_ms} ms" if hosts.delayed else "no delay (this kernel has no netem)"
    print(f"\nlinks: {args.rate} Mbit/s ({args.rate // 10} for the slow one), {delay}")
    for key, value in ratios.items():
        print(f"{key:<36} {value:.3f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cases": results,
                    "ratios": ratios,
                    "rate_mbit": args.rate,
                    "delay_ms": args.delay_ms if hosts.delayed else 0,
                    "runs": args.runs,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
