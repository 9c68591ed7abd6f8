"""The conformance suite against a real node (every MUST passes), against a deliberately
broken implementation (the failing case is named), and in vector-only mode."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq
from imports import imported
from swarm import NodeProcess

from kvx.conformance import CASES
from kvx.protocol import (
    Hello,
    MessageType,
    Peers,
    RemoteProtocolError,
    decode_body,
    node_id,
    parse_envelope,
)
from kvx.trust import Identity, Signer, make_curve_server, start_authenticator

KVX = Path(sys.executable).with_name("kvx")


def conformance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KVX), "conformance", *args], capture_output=True, text=True, timeout=300
    )


def test_a_real_node_passes_every_must_case(tmp_path):
    # A payment window smaller than the long fixture, as spec/README.md asks of a target.
    node = NodeProcess(
        tmp_path / "target", payment_window_bytes=1 << 18, max_ads_per_signer=512
    ).start()
    info = node.wait_ready()
    loaded = conformance("--publish-fixture", str(node.dir))
    assert loaded.returncode == 0, loaded.stderr
    out = tmp_path / "report.json"
    run = conformance(
        "--target", info["ctl"], "--target-key", info["public_key"], "--json", str(out)
    )
    node.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    cases = json.loads(out.read_text())["cases"]
    assert {c["id"] for c in cases} >= {"8.2/1", "10.1/1", "5.3/1", "6.4/2", "12.6/1"}
    for c in cases:
        assert set(c) >= {"id", "section", "level", "result"}
        assert c["level"] in ("MUST", "SHOULD") and c["result"] in ("pass", "fail", "skip")
        if c["level"] == "MUST":
            assert c["result"] == "pass", c


class BrokenNode:
    """A deliberately broken implementation: it answers every HELLO with PEERS and never
    checks a signature — exactly what the suite must catch."""

    def __init__(self) -> None:
        self.identity = Identity.generate()
        self.signer = Signer(self.identity)
        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        make_curve_server(self.router, self.identity)
        self.address = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.running:
            if not self.router.poll(100):
                continue
            routing, frame = self.router.recv_multipart(copy=False)
            try:
                raw = parse_envelope(frame.bytes)
                header, message = decode_body(raw.type, raw.body)  # no signature check!
            except RemoteProtocolError:
                continue
            if raw.type == MessageType.HELLO and isinstance(message, Hello):
                reply = self.signer.seal(
                    Peers(peers=(), re=header.seq), now_ms=header.iat, to=node_id(raw.signer)
                )
                self.router.send_multipart([routing.bytes, reply])

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.router.close()
        self.auth.stop()
        self.ctx.term()


def test_a_node_that_skips_signature_checks_is_caught():
    broken = BrokenNode()
    try:
        run = conformance(
            "--target",
            broken.address,
            "--target-key",
            broken.identity.public_key.hex(),
            "--only",
            "8.2/1",
            "--only",
            "5.3/1",
        )
    finally:
        broken.close()
    assert run.returncode == 1
    assert "5.3/1" in run.stdout and "acted on" in run.stdout
    assert "1 passed, 1 failed" in run.stdout


def test_vectors_only_mode_passes_the_reference_adapter_and_catches_a_lax_one(tmp_path):
    good = conformance(
        "--vectors-only", "--adapter", f"{sys.executable} -m kvx.conformance.adapter"
    )
    assert good.returncode == 0, good.stdout[-2000:]
    lax = tmp_path / "lax.py"  # an adapter that accepts every frame
    lax.write_text(
        "import sys, json\n"
        "for line in sys.stdin:\n"
        "    print(json.dumps({'result': 'valid'}), flush=True)\n"
    )
    bad = conformance("--vectors-only", "--adapter", f"{sys.executable} {lax}")
    assert bad.returncode == 1 and "vector/codec/not-msgpack" in bad.stdout


def test_dry_run_lists_every_case_with_its_section_and_level():
    listed = conformance("--dry-run")
    assert listed.returncode == 0
    assert "5.3/1" in listed.stdout and "MUST" in listed.stdout and "SHOULD" in listed.stdout


@pytest.mark.parametrize("args", [["--target", "tcp://127.0.0.1:1"], ["--vectors-only"]])
def test_incomplete_arguments_are_refused(args):
    run = conformance(*args)
    assert run.returncode == 2 and "kvx: error" in run.stderr


def test_the_suite_imports_nothing_of_the_node_or_its_transport():
    """The suite shares no code with what it tests: a bug in kvx's own node or data path
    must not pass kvx's own conformance run."""
    spec = Path(__file__).parent.parent / "spec"
    for path in spec.glob("*.py"):
        for name in imported(path):
            assert not name.startswith(("kvx.p2p", "kvx.transport")), (path.name, name)
            assert name.split(".")[0] not in ("p2p", "transport"), (path.name, name)


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert sorted(i for i in set(ids) if ids.count(i) > 1) == []
