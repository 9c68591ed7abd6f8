"""Content-root throughput of a 256 MiB KV tensor against plain BLAKE3 over the same bytes.

    python bench/hash.py [--mib 256] [--repeats 5] [--json OUT]

Both sides hash the tensor's memory in place with every core BLAKE3 will use; the runs
are interleaved so that a busy neighbour slows both alike, and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import blake3
import torch

from kvx.protocol import (
    DEFAULT_CHUNK_BYTES,
    ContentHasher,
    byte_view,
    chunk_hashes,
    content_root,
)

STREAM_PIECE = 1 << 20  # what one network receive might hand the hasher


def plain_blake3(tensor: torch.Tensor) -> bytes:
    return blake3.blake3(byte_view(tensor), max_threads=blake3.blake3.AUTO).digest()


def whole_root(tensor: torch.Tensor) -> bytes:
    return content_root(
        tensor.numel() * tensor.element_size(),
        DEFAULT_CHUNK_BYTES,
        chunk_hashes(tensor, DEFAULT_CHUNK_BYTES),
    )


def streamed_root(tensor: torch.Tensor) -> bytes:
    view = byte_view(tensor)
    hasher = ContentHasher(DEFAULT_CHUNK_BYTES)
    for start in range(0, len(view), STREAM_PIECE):
        hasher.update(view[start : start + STREAM_PIECE])
    return hasher.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", metavar="OUT", help="write the figures to this file")
    args = parser.parse_args()

    size = args.mib << 20
    torch.manual_seed(0)
    tensor = torch.randn(size // 2, dtype=torch.bfloat16)  # bf16 KV-like values
    cases: dict[str, Callable[[torch.Tensor], bytes]] = {
        "blake3 (baseline)": plain_blake3,
        "content root": whole_root,
        "content root, streamed 1 MiB pieces": streamed_root,
    }
    assert whole_root(tensor) == streamed_root(tensor)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn(tensor)
            times[name].append(time.perf_counter() - start)

    gbps = {name: size / statistics.median(ts) / 1e9 for name, ts in times.items()}
    base = gbps["blake3 (baseline)"]
    print(
        f"hashing {args.mib} MiB, chunk {DEFAULT_CHUNK_BYTES >> 20} MiB, "
        f"{os.cpu_count()} cpus, median of {args.repeats}"
    )
    print(f"{'case':<38} {'GB/s':>8} {'vs blake3':>10}")
    for name, value in gbps.items():
        print(f"{name:<38} {value:>8.2f} {value / base:>10.3f}")

    if args.json:
        figures = {
            "bench": "hash",
            "payload_bytes": size,
            "chunk_bytes": DEFAULT_CHUNK_BYTES,
            "repeats": args.repeats,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "gbps": {
                "blake3": base,
                "content_root": gbps["content root"],
                "content_root_streamed": gbps["content root, streamed 1 MiB pieces"],
            },
            "ratios": {
                "content_root_vs_blake3": gbps["content root"] / base,
                "streamed_content_root_vs_blake3": gbps["content root, streamed 1 MiB pieces"]
                / base,
            },
        }
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
