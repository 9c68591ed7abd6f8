"""Node identities: an Ed25519 key pair, its node id, and the key file that holds it."""

from __future__ import annotations

import os
from pathlib import Path

from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from kvx.protocol import ConfigError, node_id

from ._config import check_private, write_private

KEY_FILE_TAG = "kvx-ed25519-seed-v1"


def curve_public_key(ed25519_public_key: bytes) -> bytes:
    """The CURVE (X25519) key a node with this Ed25519 key uses on its ZeroMQ sockets."""
    return bytes(VerifyKey(ed25519_public_key).to_curve25519_public_key())


class Identity:
    """A node's signing key. The seed never appears in repr, logs or errors."""

    def __init__(self, signing_key: SigningKey) -> None:
        self._key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: bytes = node_id(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(SigningKey(seed))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data`."""
        return self._key.sign(data).signature

    def curve_keypair(self) -> tuple[bytes, bytes]:
        """(public, secret) CURVE keys derived from this identity, for zmq's CURVE mechanism."""
        secret: PrivateKey = self._key.to_curve25519_private_key()
        public: PublicKey = secret.public_key
        return bytes(public), bytes(secret)

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id.hex()[:16]}…)"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a new key file readable by its owner only; an existing file is never replaced."""
        write_private(path, f"{KEY_FILE_TAG} {bytes(self._key).hex()}\n", "key file")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key file, refusing one that group or others could read or change."""
        p = Path(path)
        check_private(p, "key file")
        parts = p.read_text(errors="replace").split()
        if len(parts) != 2 or parts[0] != KEY_FILE_TAG:
            raise ConfigError(f"{p} is not a kvx key file (expected '{KEY_FILE_TAG} <hex seed>')")
        try:
            seed = bytes.fromhex(parts[1])
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ConfigError(f"{p} does not hold a 32-byte hex seed")
        return cls.from_seed(seed)
