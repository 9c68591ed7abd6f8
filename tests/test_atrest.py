"""At-rest encryption of stored KV."""

import stat

import pytest

from kvx.protocol import ConfigError, IntegrityError
from kvx.trust import AtRestCipher


def test_round_trip_hides_the_plaintext_and_key_is_private(tmp_path):
    key = tmp_path / "atrest.key"
    cipher = AtRestCipher.from_key_file(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    data = b"KV bytes " * 1000
    blob = cipher.seal(data)
    assert data[:64] not in blob
    assert AtRestCipher.from_key_file(key).open(blob) == data  # same key after a restart


def test_a_changed_byte_is_detected(tmp_path):
    cipher = AtRestCipher.from_key_file(tmp_path / "k")
    blob = bytearray(cipher.seal(b"payload"))
    blob[-1] ^= 1
    with pytest.raises(IntegrityError):
        cipher.open(bytes(blob))


def test_another_key_cannot_open(tmp_path):
    blob = AtRestCipher.from_key_file(tmp_path / "a").seal(b"payload")
    with pytest.raises(IntegrityError):
        AtRestCipher.from_key_file(tmp_path / "b").open(blob)


def test_a_key_file_others_can_read_is_refused(tmp_path):
    key = tmp_path / "k"
    AtRestCipher.from_key_file(key)
    key.chmod(0o640)
    with pytest.raises(ConfigError, match="0640"):
        AtRestCipher.from_key_file(key)
