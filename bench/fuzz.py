"""A long fuzz run against a live node: hostile frames per second, memory, what refused them.

    python bench/fuzz.py [--frames 1000000] [--seed N] [--json OUT]

The node runs with rate limits and bans off, so every frame reaches its decoders. The
baseline in the same run is the same number of valid HELLO frames, answered.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zmq

from kvx.conformance.fuzz import frames
from kvx.protocol import Hello
from kvx.testing import NodeProcess
from kvx.trust import Identity, Signer, make_curve_client

LENIENT = "\n[scores]\nthreshold = -1e18\n"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def blast(ctl: str, key: bytes, batch: list[bytes], expect_answers: bool) -> float:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    make_curve_client(sock, Identity.generate(), key)
    sock.connect(ctl)
    start = time.perf_counter()
    answered = 0
    for i, frame in enumerate(batch):
        sock.send(frame)
        while sock.poll(0):
            sock.recv()
            answered += 1
        if i % 5000 == 4999:
            time.sleep(0.01)
    if expect_answers:  # the baseline is timed until the last answer arrives
        while answered < len(batch) and sock.poll(5000):
            sock.recv()
            answered += 1
    seconds = time.perf_counter() - start
    sock.close()
    ctx.term()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvx-fuzz-"))
    node = NodeProcess(root / "target", tables=LENIENT, rate_per_s=1e9, burst=10**9).start()
    try:
        info = node.wait_ready()
        key, target = bytes.fromhex(info["public_key"]), bytes.fromhex(info["node_id"])
        now = time.time_ns() // 1_000_000
        hello_signer = Signer(Identity.generate())
        baseline_n = min(args.frames, 20_000)
        hellos = [
            hello_signer.seal(Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1), now_ms=now, to=target)
            for _ in range(baseline_n)
        ]
        before = rss_kib(node.proc.pid)
        base_s = blast(info["ctl"], key, hellos, expect_answers=True)
        hostile = frames(args.frames, seed=args.seed, target=target, now_ms=now)
        fuzz_s = blast(info["ctl"], key, list(hostile), expect_answers=False)
        alive = node.proc.poll() is None
        growth = rss_kib(node.proc.pid) - before if alive else None
        codes = collections.Counter(
            json.loads(line)["code"]
            for line in (node.dir / "node.log").read_text().splitlines()
            if '"event": "rejected"' in line
        )
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)
    rate, base_rate = args.frames / fuzz_s, baseline_n / base_s
    print(f"{args.frames:,} hostile frames, seed {args.seed}")
    print(f"{'valid HELLOs answered (baseline)':<34} {base_rate:>10,.0f} /s")
    print(f"{'hostile frames sent':<34} {rate:>10,.0f} /s")
    print(f"{'node alive afterwards':<34} {'yes' if alive else 'NO':>10}")
    print(f"{'node memory growth':<34} {growth / 1024 if growth is not None else 0:>9.1f} MiB")
    for code, n in codes.most_common():
        print(f"  refused {code:<24} {n:>10,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "bench": "fuzz",
                    "frames": args.frames,
                    "seed": args.seed,
                    "alive": alive,
                    "rss_growth_kib": growth,
                    "refused": dict(codes),
                    "frames_per_s": rate,
                    "baseline_hellos_per_s": base_rate,
                    "ratios": {"hostile_vs_valid_frames_per_s": rate / base_rate},
                },
                f,
                indent=2,
            )
            f.write("\n")
    sys.exit(0 if alive else 1)


if __name__ == "__main__":
    main()
