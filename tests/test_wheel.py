"""kvx as a user installs it: a wheel built from this tree, installed into a fresh venv,
runs its command and carries the spec and vectors the conformance suite reads."""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    source = tmp_path / "source"  # setuptools writes build/ beside the sources it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), source],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("kvx-*.whl"))
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    pip = [str(fresh / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=300)
    # kvx's dependencies come from the test's own environment, by path only: its .pth
    # files (such as this checkout's editable install) are not run, so `kvx` can only be
    # the wheel's.
    site = subprocess.run(
        [
            str(fresh / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    help_text = subprocess.run(
        [str(fresh / "bin" / "kvx"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_text.returncode == 0 and "conformance" in help_text.stdout
    probe = subprocess.run(
        [
            str(fresh / "bin" / "python"),
            "-c",
            "import kvx, json; from importlib.resources import files;"
            "spec = files('kvx.conformance');"
            "print(json.dumps([kvx.__file__, kvx.__version__,"
            " sorted(p.name for p in (spec / 'vectors').iterdir()),"
            " (spec / 'PROTOCOL.md').is_file()]))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not this checkout, whose folders would shadow the wheel
    )
    assert probe.returncode == 0, probe.stderr
    where, version, vectors, has_spec = json.loads(probe.stdout)
    assert where.startswith(site)  # the installed wheel, not this checkout
    assert version == "0.1.0" and has_spec
    assert vectors == sorted(p.name for p in (ROOT / "spec" / "vectors").iterdir())
    dry = subprocess.run(
        [str(fresh / "bin" / "kvx"), "conformance", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0 and "8.2/1" in dry.stdout
