"""The README's first command: the demo runs, says nothing on stderr, and its table reads
as the README says — the question, a token-exact answer, and a bought time to first
token whose parts add up to it."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the demo needs the 'hf' extra")


def test_the_demo_reads_clearly_and_warns_of_nothing(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "kvx.demo", "--tokens", "512", "--runs", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "120"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no FutureWarning, no progress bars of other libraries
    out = run.stdout
    assert "median (min-max) of 2 runs" in out
    assert "what does a buyer send after it has verified" in out
    assert re.search(r"answer token-exact against a full prefill\s+│\s+yes", out)
    parts = [float(x) for x in re.findall(r"(?:median run:|=|\+) [^│]*│\s+([\d.]+) s", out)]
    assert len(parts) == 6  # five parts, then their sum
    assert abs(sum(parts[:5]) - parts[5]) < 0.0015  # they add up (to rounding)
    assert "the limit: what no exchange can beat" in out
