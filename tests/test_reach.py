"""Binding one address and advertising another: a node says in one line when peers
could not dial what it would advertise, and a wildcard bind with `--advertise` is
dialed at the advertised address (the multi-host case is in test_multihost.py)."""

import subprocess
import sys

import pytest
from swarm import NodeProcess, eventually

from kvx.trust import Identity


def node_cli(data_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvx.cli", "node", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--listen", "tcp://0.0.0.0:7000"], "listen 0.0.0.0: a wildcard binds every interface"),
        (["--data-host", "0.0.0.0"], "data_host 0.0.0.0: a wildcard binds every interface"),
        (["--listen", "tcp://localhost:7005"], "listen 'localhost': not an IP address"),
        (["--advertise", "0.0.0.0"], "advertise: no peer can dial 0.0.0.0"),
        (["--advertise", "224.0.0.1"], "advertise: no peer can dial 224.0.0.1"),
        (["--advertise", "peer.example"], "advertise 'peer.example': not an IP address"),
    ],
)
def test_a_node_refuses_to_advertise_an_address_no_peer_can_dial(tmp_path, args, said):
    run = node_cli(tmp_path / "n", *args)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert said in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_node_refuses_an_address_its_own_policy_would_refuse_from_a_peer(tmp_path):
    (tmp_path / "n").mkdir()
    conf = tmp_path / "n" / "node.toml"
    conf.write_text('[node]\ndata_dir = "."\n[policy]\nallow_loopback = false\n')
    run = subprocess.run(
        [sys.executable, "-m", "kvx.cli", "node", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "own [policy] refuses 127.0.0.1" in run.stderr


def test_a_wildcard_bind_advertises_the_address_it_names(tmp_path):
    seller = NodeProcess(
        tmp_path / "a", listen="tcp://0.0.0.0:0", data_host="0.0.0.0", advertise="127.0.0.1"
    ).start()
    try:
        info = seller.wait_ready()
        assert info["ctl"].startswith("tcp://127.0.0.1:")
        assert [d["addr"].split(":")[0] for d in info["data"]] == ["127.0.0.1"]
        buyer = NodeProcess(tmp_path / "b", [seller.dir / "node.json"]).start()
        try:
            buyer.wait_ready()
            seller_id = Identity.load(seller.dir / "node.key").node_id.hex()
            eventually(
                lambda: any(
                    p["node_id"] == seller_id and p["state"] == "alive" and p["ctl"] == info["ctl"]
                    for p in buyer.call("peers")["peers"]
                ),
                30,
            )
        finally:
            buyer.stop()
    finally:
        seller.stop()
