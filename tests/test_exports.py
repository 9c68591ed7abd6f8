"""Each package's public surface is exactly its __all__, and nothing leaks in or out."""

import dataclasses
import importlib
import subprocess
import sys

import pytest

from kvx.protocol import MESSAGE_CLASSES, Header

PACKAGES = [
    "kvx",
    "kvx.protocol",
    "kvx.trust",
    "kvx.transport",
    "kvx.p2p",
    "kvx.conformance",
    "kvx.testing",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exact(name):
    module = importlib.import_module(name)
    public = {
        attr
        for attr in vars(module)
        if not attr.startswith("_") and not isinstance(getattr(module, attr), type(importlib))
    }
    assert sorted(n for n in module.__all__ if not n.startswith("_")) == sorted(public)
    assert len(module.__all__) == len(set(module.__all__))
    assert all(hasattr(module, n) for n in module.__all__)


def test_no_top_level_layer_modules_are_installed(tmp_path):
    # From a directory outside the checkout, only what the install provides is importable.
    probe = (
        "import importlib.util as u, sys; import kvx.protocol;"
        "bad = [t for t in ('protocol','trust','p2p','transport','spec') if u.find_spec(t)];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_message_fields_never_shadow_header_fields():
    header = {f.name for f in dataclasses.fields(Header)}
    for cls in MESSAGE_CLASSES.values():
        assert not header & {f.name for f in dataclasses.fields(cls)}, cls


def test_what_an_agent_catches_and_passes_is_named_by_kvx_itself():
    import kvx

    assert issubclass(kvx.AdminError, kvx.KvxError) and issubclass(kvx.Miss, kvx.KvxError)
    for name in ("Namespace", "KVLayout", "ModelFingerprint", "Fault"):  # fetch/publish take them
        assert name in kvx.__all__


def test_the_node_package_exports_no_internals():
    import kvx.p2p

    internals = {"AdIndex", "PeerTable", "LocalStore", "NodeProcess", "wait_for", "Simulation"}
    assert not internals & set(kvx.p2p.__all__)
