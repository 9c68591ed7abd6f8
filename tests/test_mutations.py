"""The suite bites: against a kvx node with one rule of the spec switched off
(tests/mutant.py patches it in the node's process), the case written for that rule
fails. The same cases pass against an intact node (tests/test_conformance.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mutant import MUTATIONS
from swarm import NodeProcess

MUTANT = Path(__file__).with_name("mutant.py")
CAUGHT_BY = {
    "window": "9.4/2",
    "receipt": "9.4/4",
    "replay": "10.6/2",
    "accept-wait": "9.2/6",
    "counters": "10.1/3",
    "recent": "8.3/1",
    "pull": "8.3/2",
    "transfer-errors": "9.2/8",
    "unknown-bytes": "4.5/3",
    "leave": "8.22/1",
    "address": "8.1a/1",
    "partial-receipt": "10.6/4",
    "leave-inc": "8.22/2",
}


def conformance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvx.cli", "conformance", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_mutation_has_the_case_that_catches_it():
    assert set(CAUGHT_BY) == set(MUTATIONS)


@pytest.mark.parametrize("rule", CAUGHT_BY)
def test_a_node_with_one_rule_switched_off_fails_that_rules_case(tmp_path, rule):
    node = NodeProcess(
        tmp_path / "mutant",
        prefix=(sys.executable, str(MUTANT), rule, "--"),
        payment_window_bytes=1 << 18,
    ).start()
    try:
        info = node.wait_ready()
        assert conformance("--publish-fixture", str(node.dir)).returncode == 0
        out = tmp_path / "report.json"
        conformance(
            *("--target", info["ctl"], "--target-key", info["public_key"]),
            *("--only", CAUGHT_BY[rule], "--strict", "--json", str(out)),
        )
    finally:
        node.stop()
    (result,) = json.loads(out.read_text())["cases"]
    assert result["result"] == "fail", result
