"""The `kvx` command, run as a user would run it."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from deals import deal
from swarm import NodeProcess

from kvx.protocol import Namespace
from kvx.trust import Identity, Ledger

KVX = Path(sys.executable).with_name("kvx")  # the installed entry point, venv or not


def kvx(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(KVX), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_keygen_then_id_print_both_names_labelled(tmp_path):
    made = kvx("keygen", str(tmp_path))  # a data dir: the key the node will use
    assert made.returncode == 0, made.stderr
    key = tmp_path / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity = Identity.load(key)
    public_line, node_line = made.stdout.splitlines()
    assert public_line.split()[:3] == ["public", "key", identity.public_key.hex()]
    assert node_line.split()[:3] == ["node", "id", identity.node_id.hex()]
    assert kvx("id", str(tmp_path)).stdout == made.stdout
    shown = json.loads(kvx("id", str(key), "--json").stdout)
    assert shown == {"public_key": identity.public_key.hex(), "node_id": identity.node_id.hex()}
    again = kvx("keygen", str(key))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_a_node_runs_with_the_key_keygen_made_for_its_data_dir(tmp_path):
    made = json.loads(kvx("keygen", str(tmp_path / "new" / "node"), "--json").stdout)
    assert stat.S_IMODE((tmp_path / "new" / "node").stat().st_mode) == 0o700
    node = NodeProcess(tmp_path / "new" / "node").start()
    try:
        assert node.wait_ready()["public_key"] == made["public_key"]
    finally:
        node.stop()


def test_id_refuses_a_key_file_others_can_read(tmp_path):
    key = tmp_path / "node.key"
    kvx("keygen", str(key))
    key.chmod(0o644)
    result = kvx("id", str(key))
    assert result.returncode == 2
    assert "0644" in result.stderr and "group or others" in result.stderr
    assert result.stdout == ""


def test_namespace_create_and_join_agree(tmp_path):
    created = kvx("namespace", "create", str(tmp_path / "a.ns"))
    assert created.returncode == 0, created.stderr
    secret = (tmp_path / "a.ns").read_text()
    joined = kvx("namespace", "join", str(tmp_path / "b.ns"), stdin=secret)
    assert joined.returncode == 0, joined.stderr
    assert created.stdout == joined.stdout
    assert created.stdout.strip() == Namespace(bytes.fromhex(secret.strip())).id.hex()
    assert stat.S_IMODE((tmp_path / "b.ns").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", ["", "zz", "00" * 31])
def test_namespace_join_refuses_a_bad_secret(tmp_path, bad):
    result = kvx("namespace", "join", str(tmp_path / "b.ns"), stdin=bad)
    assert result.returncode == 2 and "64 hex digits" in result.stderr
    assert not (tmp_path / "b.ns").exists()


def test_ledger_prints_balances_and_audit_log(tmp_path):
    seller = Identity.generate()
    seller.save(tmp_path / "node.key")
    buyer = Identity.generate()
    ledger = Ledger(tmp_path / "ledger.db", seller.node_id)
    for i, price in enumerate((300, 450)):
        quote, accept, receipt = deal(seller, buyer, bytes([i + 1]) * 16, price)
        ledger.record_accept(quote, accept, now_ms=1_800_000_000_000, limit=10**6)
        ledger.record_delivery(bytes([i + 1]) * 16, now_ms=1)
        ledger.record_receipt(receipt, now_ms=2)
    ledger.close()
    result = kvx("ledger", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert buyer.node_id.hex()[:16] in result.stdout
    assert "750" in result.stdout  # the balance
    assert result.stdout.count("sold") == 2


def test_ledger_without_a_ledger_says_so(tmp_path):
    result = kvx("ledger", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "no ledger" in result.stderr
