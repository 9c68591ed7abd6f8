"""Names for identities and KV content: node ids, model fingerprints, prefix chains.

All hashes are BLAKE3-256 over byte strings built from the spec's exact layouts
(§7): purpose string first, length-prefixed fields, little-endian integers, so
that another language reproduces them without a msgpack library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import blake3
import numpy as np

from ._errors import ErrorCode, LocalProtocolError
from ._limits import MAX_BLOCK_TOKENS, MAX_TOKEN_ID
from ._payload import LAYOUT_NAME, KVLayout

NODE_ID_PURPOSE = b"kvx/node-id/1"
FINGERPRINT_PURPOSE = b"kvx/fingerprint/1"
CHAIN_PURPOSE = b"kvx/chain/1"
NAMESPACE_ID_CONTEXT = "kvx 2026-11 namespace id v1"
NAMESPACE_CHAIN_CONTEXT = "kvx 2026-11 namespace chain key v1"
NAMESPACE_PROOF_CONTEXT = "kvx 2026-11 namespace proof key v1"
MEMBERSHIP_PURPOSE = b"kvx/ns-proof/1"


def lp(data: bytes) -> bytes:
    """Length-prefixed bytes: u32 little-endian length, then the bytes (spec §7.1)."""
    return len(data).to_bytes(4, "little") + data


def u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def _local(reason: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.INVALID_FIELD, reason)


def node_id(public_key: bytes) -> bytes:
    """The 32-byte node id of an Ed25519 public key."""
    if len(public_key) != 32:
        raise _local(f"an Ed25519 public key has 32 bytes, not {len(public_key)}")
    return blake3.blake3(lp(NODE_ID_PURPOSE) + public_key).digest()


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything that makes two KV caches byte-for-byte interchangeable."""

    model_id: str
    revision: str
    weights_hash: bytes
    tokenizer_hash: bytes
    positional: str
    layout: KVLayout

    def encoded(self) -> bytes:
        """The exact bytes that are hashed (spec §7.2)."""
        if not self.model_id:
            raise _local("model_id is empty")
        if len(self.weights_hash) not in (0, 32):
            raise _local("weights_hash has 0 or 32 bytes")
        if not self.revision and not self.weights_hash:
            raise _local("a fingerprint needs a revision or a weights hash")
        if len(self.tokenizer_hash) != 32:
            raise _local("tokenizer_hash has 32 bytes")
        if not self.positional:
            raise _local("positional is empty")
        lay = self.layout
        return b"".join(
            [
                lp(FINGERPRINT_PURPOSE),
                lp(self.model_id.encode()),
                lp(self.revision.encode()),
                lp(self.weights_hash),
                lp(self.tokenizer_hash),
                lp(self.positional.encode()),
                lp(lay.dtype.encode()),
                u64(lay.layers),
                u64(lay.kv_heads),
                u64(lay.head_dim),
                u64(lay.block),
                lp(LAYOUT_NAME.encode()),
            ]
        )

    def digest(self) -> bytes:
        return blake3.blake3(self.encoded()).digest()


@dataclass(frozen=True)
class Namespace:
    """Who may match a chain: everyone (no secret) or the holders of a 32-byte secret."""

    secret: bytes | None = None

    def __post_init__(self) -> None:
        if self.secret is not None and len(self.secret) != 32:
            raise _local("a namespace secret has 32 bytes")

    @property
    def id(self) -> bytes | None:
        """The public name of a private namespace (None for the public one)."""
        if self.secret is None:
            return None
        return blake3.blake3(self.secret, derive_key_context=NAMESPACE_ID_CONTEXT).digest()

    def hasher(self) -> blake3.blake3:
        """Plain BLAKE3 for the public namespace, keyed BLAKE3 for a private one."""
        if self.secret is None:
            return blake3.blake3()
        key = blake3.blake3(self.secret, derive_key_context=NAMESPACE_CHAIN_CONTEXT).digest()
        return blake3.blake3(key=key)

    def proof(self, prover: bytes, verifier: bytes, challenge: bytes) -> bytes:
        """The membership proof of spec §7.6: only holders of the secret can compute it."""
        if self.secret is None or self.id is None:
            raise _local("the public namespace has no members to prove")
        key = blake3.blake3(self.secret, derive_key_context=NAMESPACE_PROOF_CONTEXT).digest()
        data = lp(MEMBERSHIP_PURPOSE) + self.id + prover + verifier + challenge
        return blake3.blake3(data, key=key).digest()


PUBLIC = Namespace()


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise _local(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        raise _local("token ids must be integers in [0, 2^32)")
    return arr.astype("<u4").tobytes()


def chain_seed(fingerprint: bytes, namespace: Namespace = PUBLIC) -> bytes:
    """h0 of the prefix chain (spec §7.3)."""
    if len(fingerprint) != 32:
        raise _local("a fingerprint has 32 bytes")
    h = namespace.hasher()
    h.update(lp(CHAIN_PURPOSE) + fingerprint)
    return h.digest()


def chain_extend(
    previous: bytes, tokens: Sequence[int] | np.ndarray, block: int, namespace: Namespace = PUBLIC
) -> list[bytes]:
    """Continue a chain from its last hash over whole blocks of tokens, for streaming input."""
    if not 1 <= block <= MAX_BLOCK_TOKENS:
        raise _local(f"block size {block} is outside [1, {MAX_BLOCK_TOKENS}]")
    data = _token_bytes(tokens)
    if len(data) % (4 * block):
        raise _local(f"{len(data) // 4} tokens are not a whole number of {block}-token blocks")
    hashes = []
    step = 4 * block
    for start in range(0, len(data), step):
        h = namespace.hasher()
        h.update(previous + data[start : start + step])
        previous = h.digest()
        hashes.append(previous)
    return hashes


def prefix_chain(
    fingerprint: bytes,
    tokens: Sequence[int] | np.ndarray,
    block: int,
    namespace: Namespace = PUBLIC,
) -> list[bytes]:
    """h1..hn over the whole blocks of `tokens`; a trailing partial block is not named."""
    whole = (len(tokens) // block) * block if block > 0 else 0
    return chain_extend(chain_seed(fingerprint, namespace), tokens[:whole], block, namespace)
