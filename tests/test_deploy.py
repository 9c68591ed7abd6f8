"""docs/deploy/: the example config is a valid node config that writes out every budget,
and the systemd unit passes `systemd-analyze verify`."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvx.p2p._config import BUDGETS, load_node_config

DEPLOY = Path(__file__).parents[1] / "docs" / "deploy"


def test_the_example_config_loads_and_writes_out_every_budget():
    config = load_node_config(DEPLOY / "node.toml")
    assert config.advertise == "10.0.0.1" and config.data_port == 7001
    written = tomllib.loads((DEPLOY / "node.toml").read_text())["node"]
    assert sorted(set(BUDGETS) - set(written)) == []


def test_the_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = (DEPLOY / "kvx-node.service").read_text()
    assert "ExecStart=/opt/kvx/.venv/bin/kvx " in unit
    # verify checks that the command exists: point it at this installation's kvx
    here = Path(sys.executable).with_name("kvx")
    (tmp_path / "kvx-node.service").write_text(unit.replace("/opt/kvx/.venv/bin/kvx", str(here)))
    run = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "kvx-node.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stderr == "", run.stderr
