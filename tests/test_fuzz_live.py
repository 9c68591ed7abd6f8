"""A live node under 100,000 generated and mutated frames: it never crashes, its memory
stays bounded, and it keeps answering honest peers."""

import time

from swarm import NodeProcess, TestPeer

from kvx.conformance.fuzz import frames
from kvx.protocol import Hello, Peers
from kvx.trust import Identity, Signer

FRAMES = 100_000
# Let every frame reach the decoders: no rate limit or ban cuts the fuzzer off.
LENIENT = "\n[scores]\nthreshold = -1e18\n"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def answers_hello(node: NodeProcess) -> bool:
    peer = TestPeer(node, Identity.generate())
    try:
        peer.send(
            Signer(peer.identity).seal(
                Hello(ctl="tcp://127.0.0.1:9", data=(), inc=1),
                now_ms=time.time_ns() // 1_000_000,
                to=peer.node_id,
            )
        )
        answer = peer.recv(timeout=10)
        return answer is not None and isinstance(answer.message, Peers)
    finally:
        peer.close()


def test_a_node_survives_100000_hostile_frames(tmp_path):
    node = NodeProcess(tmp_path / "target", tables=LENIENT, rate_per_s=1e9, burst=10**9).start()
    info = node.wait_ready()
    assert answers_hello(node)
    before = rss_kib(node.proc.pid)
    fuzzer = TestPeer(node, Identity.generate())
    now = time.time_ns() // 1_000_000
    for i, frame in enumerate(
        frames(FRAMES, seed=20261123, target=bytes.fromhex(info["node_id"]), now_ms=now)
    ):
        fuzzer.send(frame)
        if i % 5000 == 4999:  # let the node keep up, and drain what it answered
            while fuzzer.sock.poll(0):
                fuzzer.sock.recv()
            time.sleep(0.05)
    fuzzer.close()
    assert answers_hello(node)  # it kept answering
    assert node.proc.poll() is None  # it never crashed
    growth = rss_kib(node.proc.pid) - before
    assert growth < 64 * 1024, f"memory grew by {growth} KiB"
    log = (node.dir / "node.log").read_text()
    assert "task_failed" not in log
    assert node.call("status")["internal_errors"] == 0, log[-3000:]  # no fault of kvx's own
    # The frames reached the decoders: nearly all of them were refused, one by one.
    assert log.count('"event": "rejected"') > 0.9 * FRAMES
    node.stop()
