"""Identities and key files."""

import os
import stat

import pytest

from kvx.protocol import ConfigError, node_id
from kvx.trust import KEY_FILE_TAG, Identity, curve_public_key


def test_save_writes_mode_0600_and_load_round_trips(tmp_path):
    path = tmp_path / "node.key"
    ident = Identity.generate()
    old = os.umask(0)  # even a permissive umask must not widen the file
    try:
        ident.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_key == ident.public_key
    assert loaded.node_id == node_id(ident.public_key)


def test_save_never_overwrites(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        Identity.generate().save(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_load_refuses_a_key_file_others_can_reach(tmp_path, mode):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as err:
        Identity.load(path)
    assert f"{mode:04o}" in str(err.value) and "chmod 600" in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "kvx-ed25519-seed-v1",
        f"{KEY_FILE_TAG} zz",
        f"{KEY_FILE_TAG} {'00' * 31}",
        f"other-tag {'00' * 32}",
    ],
)
def test_load_refuses_malformed_key_files(tmp_path, content):
    path = tmp_path / "node.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError):
        Identity.load(path)


def test_missing_key_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Identity.load(tmp_path / "absent.key")


def test_repr_does_not_leak_the_seed():
    seed = bytes(range(32))
    ident = Identity.from_seed(seed)
    assert seed.hex() not in repr(ident) and seed.hex()[:16] not in repr(ident)


def test_curve_keys_are_derived_from_the_signing_key():
    ident = Identity.from_seed(b"\x01" * 32)
    public, secret = ident.curve_keypair()
    assert public == curve_public_key(ident.public_key)
    assert len(secret) == 32 and secret != public
