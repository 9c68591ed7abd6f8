"""Sealing the data channel (spec §9.6): a key per deal, agreed by ephemeral X25519 keys
that the signed QUOTE and ACCEPT carry, and AES-256-GCM over every frame after the
TRANSFER.

The keys are ephemeral and never stored, so a ledger (which keeps the QUOTE and ACCEPT)
or a published proof that quotes them opens no recorded stream. A chunk is decrypted in
the memory it landed in: no second copy of the payload is made on the buyer's side.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum

import blake3
import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._datachannel import CHUNK_INDEX, SEAL_BYTES, FrameTag, frame_header
from ._errors import ErrorCode, RemoteProtocolError

KX_BYTES = 32
KEY_CONTEXT = "kvx 0.3 data channel key"
_NONCE = struct.Struct("<BBHQ")  # direction, frame tag, zero, n
_BOUNCE = 256 * 1024  # small enough to stay in cache between the copy and the decryption


class Direction(IntEnum):
    TO_BUYER = 1
    TO_SELLER = 2


class Ephemeral:
    """One side's X25519 key for one deal: the public half goes into its signed QUOTE or
    ACCEPT, the secret half lives in memory until the deal's key is derived."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else os.urandom(KX_BYTES)
        self.public = nacl.bindings.crypto_scalarmult_base(self._secret)

    def shared(self, peer_public: bytes) -> bytes:
        try:
            return nacl.bindings.crypto_scalarmult(self._secret, peer_public)
        except nacl.exceptions.RuntimeError:  # a low-order point: the result would be 0
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, "kx is no usable key") from None


def channel_key(shared: bytes, quote_id: bytes, seller_kx: bytes, buyer_kx: bytes) -> bytes:
    """The deal's 32-byte AES key: both public keys and the quote id are bound in, so a
    key serves one deal between the two keys that signed for it."""
    material = shared + quote_id + seller_kx + buyer_kx
    return blake3.blake3(material, derive_key_context=KEY_CONTEXT).digest()


def nonce(direction: Direction, tag: FrameTag, n: int) -> bytes:
    """Unique per frame of a deal: a CHUNK's `n` is its index; any other frame's is the
    number of frames with its tag sent before it in its direction."""
    return _NONCE.pack(direction, tag, 0, n)


def _broken(tag: FrameTag) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_SEAL, f"a sealed {tag.name} frame does not open")


class SealedChannel:
    """One stream's side of a sealed data channel: it seals what this side sends and opens
    what it receives, keeping the frame counts the nonces need."""

    def __init__(self, key: bytes, sending: Direction) -> None:
        self.key = key
        self.sending = sending
        self.receiving = (
            Direction.TO_SELLER if sending == Direction.TO_BUYER else Direction.TO_BUYER
        )
        self._aead = AESGCM(key)
        self._sent: dict[FrameTag, int] = {}
        self._received: dict[FrameTag, int] = {}
        self._bounce = memoryview(bytearray(_BOUNCE))

    @staticmethod
    def _next(counts: dict[FrameTag, int], tag: FrameTag) -> int:
        n = counts.get(tag, 0)
        counts[tag] = n + 1
        return n

    def frame(self, tag: FrameTag, payload: bytes) -> bytes:
        """A whole sealed frame (not a CHUNK): header, ciphertext, tag."""
        head = frame_header(tag, len(payload) + SEAL_BYTES)
        n = self._next(self._sent, tag)
        return head + self._aead.encrypt(nonce(self.sending, tag, n), payload, head)

    def open(self, tag: FrameTag, sealed: bytes) -> bytes:
        """The payload of a received sealed frame (not a CHUNK), or BAD_SEAL."""
        head = frame_header(tag, len(sealed))
        n = self._next(self._received, tag)
        try:
            return self._aead.decrypt(nonce(self.receiving, tag, n), sealed, head)
        except InvalidTag:
            raise _broken(tag) from None

    def chunk_frame(self, index: int, data: memoryview, out: memoryview) -> tuple[bytes, bytes]:
        """Seal chunk `index` into `out` (as long as `data`): returns the clear part that
        goes before it (header and index) and the tag that goes after it."""
        head = frame_header(FrameTag.CHUNK, CHUNK_INDEX.size + len(data) + SEAL_BYTES)
        clear = head + CHUNK_INDEX.pack(index)
        sealer = Cipher(
            algorithms.AES(self.key), modes.GCM(nonce(self.sending, FrameTag.CHUNK, index))
        ).encryptor()
        sealer.authenticate_additional_data(clear)
        sealer.update_into(data, out)
        sealer.finalize()
        return clear, sealer.tag

    def open_chunk(self, index: int, pieces: list[memoryview], mac: bytes) -> None:
        """Decrypt chunk `index` where it landed, then check its tag: BAD_SEAL if it fails
        (the caller wipes what was written)."""
        length = sum(len(p) for p in pieces)
        clear = frame_header(FrameTag.CHUNK, CHUNK_INDEX.size + length + SEAL_BYTES)
        opener = Cipher(
            algorithms.AES(self.key),
            modes.GCM(nonce(self.receiving, FrameTag.CHUNK, index), mac),
        ).decryptor()
        opener.authenticate_additional_data(clear + CHUNK_INDEX.pack(index))
        bounce = self._bounce
        for piece in pieces:
            for at in range(0, len(piece), _BOUNCE):
                part = piece[at : at + _BOUNCE]
                held = bounce[: len(part)]
                held[:] = part
                opener.update_into(held, part)
        try:
            opener.finalize()
        except InvalidTag:
            raise _broken(FrameTag.CHUNK) from None
