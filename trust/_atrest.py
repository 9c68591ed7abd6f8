"""Encryption of stored KV at rest with a node-local key (XSalsa20-Poly1305, PyNaCl)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from kvx.protocol import IntegrityError

from ._config import read_secret, write_private


class AtRestCipher:
    """Seals blobs so that a copied disk reveals nothing and a changed byte is detected."""

    def __init__(self, key: bytes) -> None:
        self._box = SecretBox(key)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> AtRestCipher:
        """Load the node's at-rest key, creating it (mode 0600) on first use."""
        p = Path(path)
        if not p.exists():
            write_private(p, secrets.token_bytes(32).hex() + "\n", "at-rest key")
        return cls(read_secret(p))

    def seal(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data))

    def open(self, blob: bytes) -> bytes:
        try:
            return self._box.decrypt(blob)
        except CryptoError:
            raise IntegrityError(
                "a stored blob failed authentication: corrupt or tampered"
            ) from None
