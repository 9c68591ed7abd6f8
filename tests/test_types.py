"""The layers the type checker holds to `mypy --strict` (pyproject.toml's [tool.mypy]):
a change that breaks a signature another module relies on fails here, not in use."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
STRICT = ["kvx.protocol", "kvx.trust", "kvx.transport", "kvx.p2p"]


def installed_layout(into: Path) -> Path:
    """The folders as the package installs them (protocol/ as kvx/protocol, …): mypy
    finds packages by folder, not through the editable install's mapping."""
    kvx = into / "kvx"
    kvx.mkdir(parents=True)
    for item in (ROOT / "kvx").iterdir():
        (kvx / item.name).symlink_to(item)
    for folder, name in [
        ("protocol", "protocol"),
        ("trust", "trust"),
        ("transport", "transport"),
        ("p2p", "p2p"),
        ("spec", "conformance"),
    ]:
        (kvx / name).symlink_to(ROOT / folder)
    return into


def test_the_layers_type_check_strictly(tmp_path):
    tree = installed_layout(tmp_path / "tree")
    args = [f"-p={p}" for p in STRICT]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            f"--config-file={ROOT / 'pyproject.toml'}",
            f"--cache-dir={tmp_path / 'cache'}",
            *args,
        ],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
