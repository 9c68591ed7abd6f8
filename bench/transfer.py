"""Moving a 256 MiB KV payload between two processes on loopback, against raw baselines.

    python bench/transfer.py [--mib 256] [--repeats 2] [--rounds 5] [--json OUT]

Six cases, each a seller process and a receiver process: raw socket sendall/recv_into,
the TCP transport (chunk list, per-chunk BLAKE3 verification, placement), the same
sealed (AES-256-GCM per chunk, spec §9.6), raw ucxx send/recv of one message, and the
UCX transport plain and sealed. The cases run interleaved, round after round, so that
drift of a shared machine falls on all of them alike. The receiver also reports its peak
memory beyond the payload itself. UCX runs with UCX_TLS=tcp unless the environment says
otherwise, as on any machine without RDMA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

import blake3
import numpy as np
import torch

from kvx.protocol import DEFAULT_CHUNK_BYTES, Transfer, chunk_hashes, content_root
from kvx.transport import Expected, Offer, Sessions, Source, TcpDataServer, fetch
from kvx.trust import Identity, Inbox, Signer

CASES = (
    "raw socket",
    "tcp transport",
    "sealed tcp",
    "raw ucxx",
    "ucx transport",
    "sealed ucx",
)
KEY = b"\x4b" * 32  # the sealed cases' channel key, as a deal's X25519 agreement gives one
SELLER = Identity.from_seed(b"\x5e" * 32)
BUYER = Identity.from_seed(b"\xb0" * 32)
QUOTE = b"\x71" * 16


def make_payload(size: int) -> np.ndarray:
    return np.frombuffer(blake3.blake3(b"bench payload").digest(length=size), dtype=np.uint8)


def expected_for(payload: np.ndarray) -> tuple[Expected, list[bytes]]:
    hashes = chunk_hashes(payload, DEFAULT_CHUNK_BYTES)
    root = content_root(len(payload), DEFAULT_CHUNK_BYTES, hashes)
    return Expected(root, len(payload), DEFAULT_CHUNK_BYTES, len(payload)), hashes


def token(i: int) -> bytes:
    return bytes([i + 1]) * 32


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def cpu_seconds() -> float:
    """User and system time of this process, all its threads."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


SERVING = [0.0]  # the seller's CPU time when it began to serve


def serving(address: str) -> None:
    print(address, flush=True)
    SERVING[0] = cpu_seconds()


# ---- seller side -------------------------------------------------------------------


async def seller(case: str, size: int, repeats: int) -> None:
    payload = make_payload(size)
    expected, hashes = expected_for(payload)
    done = asyncio.Event()
    served = 0

    def finished(*_ended: object) -> None:
        nonlocal served
        served += 1
        if served == repeats:
            done.set()

    if case == "raw socket":
        listener = socket.create_server(("127.0.0.1", 0))
        serving(f"127.0.0.1:{listener.getsockname()[1]}")
        for _ in range(repeats):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(payload)
        return
    if case == "raw ucxx":
        import ucxx

        async def send_one(ep: ucxx.Endpoint) -> None:
            await ep.send(payload)
            await ep.recv(np.empty(1, dtype=np.uint8))  # closing before delivery would cut it
            await ep.close()
            finished()

        listener = ucxx.create_listener(send_one)
        serving(f"127.0.0.1:{listener.port}")
        await done.wait()
        listener.close()
        return
    sessions = Sessions()
    for i in range(repeats):
        sessions.authorize(
            Offer.build(
                quote=QUOTE,
                token=token(i),
                buyer=BUYER.public_key,
                payload=payload,
                hashes=hashes,
                expected=expected,
                expires_ms=now_ms() + 600_000,
                key=KEY if case.startswith("sealed") else None,
            )
        )
    if case in ("tcp transport", "sealed tcp"):
        server = TcpDataServer(
            sessions, Inbox(SELLER.node_id), Signer(SELLER), on_finished=finished
        )
    else:
        from kvx.transport._ucx import UcxDataServer

        server = UcxDataServer(
            sessions, Inbox(SELLER.node_id), Signer(SELLER), on_finished=finished
        )
    await server.start()
    serving(server.address)
    await done.wait()
    await server.close()


# ---- receiver side -----------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def receiver(
    case: str, size: int, repeats: int, address: str, root: bytes, digest: bytes
) -> dict:
    """Receives `repeats` times; never holds the payload but in its destination, so its peak
    memory beyond the payload is what receiving costs."""
    expected = Expected(root, size, DEFAULT_CHUNK_BYTES, size)
    base_kib = rss_kib()
    dest = torch.zeros(size, dtype=torch.uint8)  # preallocated and touched, as a buyer does
    host, port = address.rsplit(":", 1)
    signer = Signer(BUYER)
    times = []
    cpu = cpu_seconds()
    for i in range(repeats):
        start = time.perf_counter()
        if case == "raw socket":
            with socket.create_connection((host, int(port))) as sock:
                view = memoryview(dest.numpy())
                while view:
                    got = sock.recv_into(view, len(view), socket.MSG_WAITALL)
                    assert got, "the seller closed early"
                    view = view[got:]
        elif case == "raw ucxx":
            import ucxx

            ep = await ucxx.create_endpoint(host, int(port))
            await ep.recv(dest.numpy())
            await ep.send(np.zeros(1, dtype=np.uint8))
            await ep.close()
        else:

            def transfer(first: int, last: int | None, i: int = i) -> bytes:
                return signer.seal(
                    Transfer(quote=QUOTE, token=token(i), first=first, last=last),
                    now_ms=now_ms(),
                    to=SELLER.node_id,
                )

            kind = "tcp" if case in ("tcp transport", "sealed tcp") else "ucx"
            key = KEY if case.startswith("sealed") else None
            await fetch(
                [Source(SELLER.node_id, kind, address, expected, transfer, key=key)],
                dest,
                timeout_s=120,
            )
        times.append(time.perf_counter() - start)
    cpu = cpu_seconds() - cpu
    # The bytes arrived intact in every case (the transports verified them already).
    assert blake3.blake3(dest.numpy()).digest() == digest
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": times,
        "receiver_cpu_s": cpu,
        "peak_extra_mib": max(0.0, (peak_kib - base_kib) * 1024 - size) / 2**20,
    }


# ---- orchestration -----------------------------------------------------------------


def run_case(case: str, size: int, repeats: int, root: bytes, digest: bytes) -> dict:
    me = [sys.executable, __file__, "--mib", str(size >> 20), "--repeats", str(repeats)]
    seller_proc = subprocess.Popen(
        [*me, "--role", "seller", "--case", case], stdout=subprocess.PIPE, text=True
    )
    try:
        address = seller_proc.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"{case}: the seller did not start")
        out = subprocess.run(
            [
                *me,
                "--role",
                "receiver",
                "--case",
                case,
                "--address",
                address,
                "--root",
                root.hex(),
                "--digest",
                digest.hex(),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{case}: receiver failed:\n{out.stderr}")
        seller_proc.wait(timeout=60)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run["seller_cpu_s"] = json.loads(seller_proc.stdout.readline())["cpu_s"]
        return run
    finally:
        seller_proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="transfers per process")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs of every case")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--role", choices=["seller", "receiver"], help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=bytes.fromhex, help=argparse.SUPPRESS)
    parser.add_argument("--digest", type=bytes.fromhex, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.mib << 20
    if args.role == "seller":
        asyncio.run(seller(args.case, size, args.repeats))
        print(json.dumps({"cpu_s": cpu_seconds() - SERVING[0]}), flush=True)
        return
    if args.role == "receiver":
        print(
            json.dumps(
                asyncio.run(
                    receiver(args.case, size, args.repeats, args.address, args.root, args.digest)
                )
            )
        )
        return

    payload = make_payload(size)
    root = expected_for(payload)[0].root
    digest = blake3.blake3(payload).digest()
    del payload
    results: dict[str, dict] = {
        c: {"seconds": [], "peak_extra_mib": 0.0, "cpu_s": 0.0} for c in CASES
    }
    per_round: list[dict[str, float]] = []  # each case's median seconds, round by round
    for _ in range(args.rounds):
        per_round.append({})
        for case in CASES:
            run = run_case(case, size, args.repeats, root, digest)
            per_round[-1][case] = statistics.median(run["seconds"])
            results[case]["seconds"] += run["seconds"]
            results[case]["cpu_s"] += run["seller_cpu_s"] + run["receiver_cpu_s"]
            results[case]["peak_extra_mib"] = max(
                results[case]["peak_extra_mib"], run["peak_extra_mib"]
            )
    for r in results.values():
        r["gbps"] = size / statistics.median(r["seconds"]) / 1e9
        # Both ends' CPU per GB moved: what a transport costs where cores are not shared.
        r["cpu_s_per_gb"] = r["cpu_s"] / (size * len(r["seconds"]) / 1e9)
    gbps = {case: r["gbps"] for case, r in results.items()}
    pairs = {
        "tcp_vs_raw_socket": ("tcp transport", "raw socket"),
        "ucx_vs_raw_ucxx": ("ucx transport", "raw ucxx"),
        "encrypted_vs_plain_tcp": ("sealed tcp", "tcp transport"),
        "encrypted_vs_plain_ucx": ("sealed ucx", "ucx transport"),
    }
    ratios = {name: gbps[a] / gbps[b] for name, (a, b) in pairs.items()}
    # The same ratio in each round alone: how far one run's figure can stray.
    spread = {
        name: (min(r[b] / r[a] for r in per_round), max(r[b] / r[a] for r in per_round))
        for name, (a, b) in pairs.items()
    }
    print(
        f"{args.mib} MiB over loopback, chunk {DEFAULT_CHUNK_BYTES >> 20} MiB, "
        f"UCX_TLS={os.environ['UCX_TLS']}, {os.cpu_count()} cpus, "
        f"median of {args.rounds} rounds x {args.repeats}"
    )
    print(f"{'case':<16} {'GB/s':>7} {'CPU s/GB':>9} {'peak extra MiB':>15}")
    for case, r in results.items():
        print(
            f"{case:<16} {r['gbps']:>7.2f} {r['cpu_s_per_gb']:>9.2f} {r['peak_extra_mib']:>15.1f}"
        )
    print(f"{'ratio (median of all runs)':<28} {'value':>6}   rounds' spread")
    for name, value in ratios.items():
        low, high = spread[name]
        print(f"{name:<28} {value:>6.3f}   {low:.3f} - {high:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "bench": "transfer",
                    "payload_bytes": size,
                    "chunk_bytes": DEFAULT_CHUNK_BYTES,
                    "ucx_tls": os.environ["UCX_TLS"],
                    "results": results,
                    "ratios": ratios,
                    "ratio_spread": spread,
                },
                f,
                indent=2,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
