"""Whether a sale of a large payload delays a node's answers to other peers.

    python bench/sale.py [--seconds 20] [--json OUT]

One node holds a 180 MiB payload (SmolLM2-135M's KV of 4,096 tokens in float32) on disk
only (a memory tier of 1 MiB), as a node does for a document it sold long ago. A
newcomer, in a process of its own and from an address of its own, says HELLO to it
every 0.1 s and times each answer: first for `--seconds` with nothing else going on
(the baseline), then for as long again while a buyer takes the payload again and again
(QUOTE_REQUEST, ACCEPT, the stream read to its END; each ACCEPT makes the seller read
the payload from disk and hash it against its root). A node that does that on its event
loop answers nobody meanwhile.
Reports HELLO p50/p99 quiet and during sales, the sales made, and
`hello_p99_quiet_vs_during_sales` (1.0: sales delay nobody).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from kvx.p2p import PublishRequest
from kvx.protocol import (
    Accept,
    FrameTag,
    Hello,
    KVLayout,
    Quote,
    QuoteRequest,
    Transfer,
    frame_header,
    parse_frame_header,
)
from kvx.testing import NodeProcess
from kvx.trust import Identity, Signer, make_curve_client, open_envelope

LAYOUT = KVLayout(dtype="float32", layers=30, kv_heads=3, head_dim=64, block=256)
BLOCKS = 16  # 4,096 tokens: 180 MiB
FP = b"\x5a" * 32
CHAIN = [bytes([i]) * 32 for i in range(1, BLOCKS + 1)]
NEWCOMER_FROM = "127.0.0.2"
EVERY_S = 0.1


class Peer:
    """A stranger with a CURVE connection to the node."""

    def __init__(self, info: dict, source: str | None = None) -> None:
        self.signer = Signer(Identity.generate())
        self.to = bytes.fromhex(info["node_id"])
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        make_curve_client(self.sock, self.signer.identity, bytes.fromhex(info["public_key"]))
        ctl = info["ctl"]
        self.sock.connect(ctl if source is None else ctl.replace("tcp://", f"tcp://{source}:0;"))

    def seal(self, message: object) -> bytes:
        return self.signer.seal(message, now_ms=time.time_ns() // 1_000_000, to=self.to)

    def ask(self, message: object, wait_s: float = 10.0) -> object | None:
        frame = self.seal(message)
        self.sock.send(frame)
        seq = open_envelope(frame).header.seq
        deadline = time.monotonic() + wait_s
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            answer = open_envelope(self.sock.recv()).message
            if getattr(answer, "re", None) == seq:
                return answer
        return None

    def close(self) -> None:
        self.sock.close()


def newcomer(data_dir: Path, seconds: float) -> list[float | None]:
    """HELLO latencies for `seconds` (the --newcomer mode: a process of its own, so that
    the buyer's thread here does not hold its GIL)."""
    info = json.loads((data_dir / "node.json").read_text())
    peer = Peer(info, source=NEWCOMER_FROM)
    hello = Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1)
    samples: list[float | None] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            answered = peer.ask(hello) is not None
            samples.append(time.perf_counter() - start if answered else None)
            time.sleep(EVERY_S)
    finally:
        peer.close()
    return samples


def hellos(data_dir: Path, seconds: float) -> list[float | None]:
    run = subprocess.run(
        [sys.executable, __file__, "--newcomer", str(data_dir), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)


def read(sock: socket.socket, size: int) -> memoryview:
    view, got = memoryview(bytearray(size)), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if not n:
            raise RuntimeError("the seller closed the stream early")
        got += n
    return view


def buyer(info: dict, stop: threading.Event, sales: list[float]) -> None:
    """Buys the payload again and again: QUOTE_REQUEST, ACCEPT, and the stream read to
    its END (not verified: the seller's side is measured). Each stream spends its deal,
    so the next ACCEPT loads the payload again."""
    peer = Peer(info)
    request = QuoteRequest(fp=FP, blocks=tuple(CHAIN), transports=("tcp",), max_price=10**15)
    try:
        while not stop.is_set():
            quote = peer.ask(request)
            if not isinstance(quote, Quote):
                raise RuntimeError(f"the seller refused to quote: {quote}")
            start = time.perf_counter()
            peer.sock.send(peer.seal(Accept(quote=quote.quote, price=quote.price, root=quote.root)))
            host, port = quote.data.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=30) as stream:
                transfer = peer.seal(Transfer(quote=quote.quote, token=quote.token, first=0))
                stream.sendall(frame_header(FrameTag.CONTROL, len(transfer)) + transfer)
                while True:
                    tag, length = parse_frame_header(bytes(read(stream, 5)))
                    if tag == FrameTag.END:
                        break
                    if tag == FrameTag.CONTROL:
                        raise RuntimeError("the seller refused the stream")
                    read(stream, length)
            sales.append(time.perf_counter() - start)
    finally:
        peer.close()


def percentile(samples: list[float | None], q: float) -> float:
    """An unanswered HELLO counts as 10 s."""
    values = sorted(10.0 if s is None else s for s in samples)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProcess(
            Path(tmp) / "seller",
            memory_bytes=1 << 20,
            payment_window_bytes=1 << 30,  # the buyer here pays nothing: no window to wait on
            tables="[policy]\ncredit_limit = 1000000000000000000\n"
            "stranger_unpaid_windows = 100000\nnetwork_unpaid_windows = 100000\n",
        ).start()
        try:
            info = node.wait_ready()
            payload = bytes(range(256)) * (LAYOUT.payload_bytes(BLOCKS) // 256)
            document = PublishRequest(FP, LAYOUT, tuple(CHAIN), payload, 135_000_000, chunk=4 << 20)
            node.call("publish", **document.to_admin())
            del payload, document
            quiet = hellos(node.dir, seconds)
            stop, sales = threading.Event(), []
            selling = threading.Thread(target=buyer, args=(info, stop, sales))
            selling.start()
            try:
                during = hellos(node.dir, seconds)
            finally:
                stop.set()
                selling.join()
        finally:
            node.stop()
    figures = {
        "payload_mib": LAYOUT.payload_bytes(BLOCKS) / (1 << 20),
        "hellos_quiet": len(quiet),
        "hellos_during_sales": len(during),
        "sales": len(sales),
        "sale_p50_s": round(statistics.median(sales), 3) if sales else None,
        "hello_p50_quiet_s": round(statistics.median(10.0 if s is None else s for s in quiet), 4),
        "hello_p99_quiet_s": round(percentile(quiet, 0.99), 4),
        "hello_p50_during_sales_s": round(
            statistics.median(10.0 if s is None else s for s in during), 4
        ),
        "hello_p99_during_sales_s": round(percentile(during, 0.99), 4),
    }
    figures["ratios"] = {
        "hello_p99_quiet_vs_during_sales": round(
            figures["hello_p99_quiet_s"] / figures["hello_p99_during_sales_s"], 3
        )
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--newcomer", nargs=2, metavar=("DATA_DIR", "SECONDS"))
    args = parser.parse_args()
    if args.newcomer:
        print(json.dumps(newcomer(Path(args.newcomer[0]), float(args.newcomer[1]))))
        return
    figures = run(args.seconds)
    rows = [
        ("", "quiet", "during sales"),
        ("HELLO p50 (s)", figures["hello_p50_quiet_s"], figures["hello_p50_during_sales_s"]),
        ("HELLO p99 (s)", figures["hello_p99_quiet_s"], figures["hello_p99_during_sales_s"]),
        ("HELLOs", figures["hellos_quiet"], figures["hellos_during_sales"]),
    ]
    for row in rows:
        print(f"{row[0]:<16}{row[1]!s:>12}{row[2]!s:>16}")
    print(
        f"sales of {figures['payload_mib']:.0f} MiB made meanwhile: {figures['sales']}"
        f" (p50 {figures['sale_p50_s']} s each)"
    )
    print(f"ratios: {figures['ratios']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
