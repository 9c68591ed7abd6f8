"""Evidence that a seller signed KV its own fingerprint refutes (spec §12.2): what a buyer
keeps when its layer-0 check fails, so that anyone holding the same weights convicts the
seller without trusting the buyer.

Everything here is checked without a model: the seller's own signed ADVERTISE binds the
fingerprint, the chain, the layout, the chunking and the content root; the token ids
hash to the first blocks of that chain; the chunk hashes hash to the root; the chunks
hash to their entries. What is left for a holder of the weights is one comparison: the
layer-0 keys and values `bind` extracts for one position against its own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import msgpack

from kvx.protocol import (
    MAX_CHUNK_BYTES,
    MAX_EVIDENCE_BYTES,
    PUBLIC,
    Advertise,
    ErrorCode,
    KVLayout,
    RemoteProtocolError,
    chunk_count,
    content_root,
    prefix_chain,
)

from ._envelope import open_envelope

MAX_EVIDENCE_TOKENS = 1 << 20
MAX_EVIDENCE_HASHES = 1 << 18


def _invalid(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID_FIELD, f"evidence: {detail}")


@dataclass(frozen=True)
class Evidence:
    """A layer-0 proof (spec §8.19): the seller's ADVERTISE `claim`, the token ids of the
    blocks up to and including the one holding `position`, every chunk hash of the
    claim's payload, and the chunks that hold that block's layer-0 keys and values."""

    claim: bytes
    tokens: tuple[int, ...]
    position: int
    hashes: bytes
    chunks: tuple[tuple[int, bytes], ...]

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(
            {
                "claim": self.claim,
                "tokens": struct.pack(f"<{len(self.tokens)}I", *self.tokens),
                "position": self.position,
                "hashes": self.hashes,
                "chunks": [[i, c] for i, c in self.chunks],
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> Evidence:
        """The evidence in `data`, refused (INVALID_FIELD or MALFORMED) unless it has
        exactly the shape of §8.19; nothing is allocated past the bounds."""
        if len(data) > MAX_EVIDENCE_BYTES:
            raise _invalid(f"{len(data)} bytes, over {MAX_EVIDENCE_BYTES}")
        try:
            raw = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                max_bin_len=MAX_CHUNK_BYTES,
                max_str_len=64,
                max_array_len=4,
                max_map_len=8,
                max_ext_len=0,
            )
        except Exception:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "evidence: not msgpack") from None
        keys = {"claim", "tokens", "position", "hashes", "chunks"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise _invalid(f"a map of exactly {sorted(keys)}")
        claim, tokens, position, hashes, chunks = (raw[k] for k in sorted(keys, key=_order))
        if not (isinstance(claim, bytes) and isinstance(tokens, bytes)):
            raise _invalid("claim and tokens are bytes")
        if not isinstance(hashes, bytes) or len(hashes) % 32:
            raise _invalid("hashes are 32-byte hashes, concatenated")
        if len(tokens) % 4 or len(tokens) // 4 > MAX_EVIDENCE_TOKENS:
            raise _invalid("tokens are u32le token ids")
        if type(position) is not int or position < 0:
            raise _invalid("position is a token index")
        if not isinstance(chunks, list) or not 1 <= len(chunks) <= 2:
            raise _invalid("one or two chunks")
        pairs = []
        for pair in chunks:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or type(pair[0]) is not int
                or pair[0] < 0
                or not isinstance(pair[1], bytes)
            ):
                raise _invalid("each chunk is [index, bytes]")
            pairs.append((pair[0], pair[1]))
        ids = struct.unpack(f"<{len(tokens) // 4}I", tokens)
        return cls(claim, ids, position, hashes, tuple(pairs))

    @property
    def id(self) -> bytes:
        """The evidence's name: BLAKE3 of its encoding, as an ACCUSE states it."""
        return evidence_id(self.encode())


def evidence_id(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def _order(key: str) -> int:
    return ("claim", "tokens", "position", "hashes", "chunks").index(key)


@dataclass(frozen=True)
class Bound:
    """Evidence whose every hash and signature checked: the seller, its fingerprint and
    layout, the tokens up to the lie, and the layer-0 keys and values the seller's own
    root commits it to at `position`, as raw little-endian elements [kv_heads][head_dim]."""

    seller: bytes  # node id
    signer: bytes  # public key
    fp: bytes
    root: bytes
    layout: KVLayout
    tokens: tuple[int, ...]
    position: int
    keys: bytes
    values: bytes


def layer0_span(layout: KVLayout, block: int) -> tuple[int, int]:
    """Payload bytes [start, stop) holding layer 0's keys then values of one block (§7.4)."""
    start = block * layout.block_bytes
    return start, start + 2 * layout.kv_heads * layout.block * layout.head_dim * layout.itemsize


def covering_chunks(layout: KVLayout, chunk: int, position: int) -> range:
    """The chunks that hold layer 0 of the block holding `position`."""
    start, stop = layer0_span(layout, position // layout.block)
    return range(start // chunk, (stop - 1) // chunk + 1)


def bind(evidence: Evidence) -> Bound:
    """Check everything the evidence says that needs no model; INVALID_FIELD (or the
    claim's own code) for evidence that does not bind a seller to these bytes."""
    st = open_envelope(evidence.claim)  # signature, shape: never freshness (§8.19)
    ad = st.message
    if not isinstance(ad, Advertise):
        raise _invalid("the claim is not an ADVERTISE")
    if ad.ns is not None:
        raise _invalid("a private namespace's purchase is never accused in public")
    layout, chunk = ad.layout, ad.chunk
    block = evidence.position // layout.block
    if block >= len(ad.blocks):
        raise _invalid("the position lies past the advertised blocks")
    if len(evidence.tokens) != (block + 1) * layout.block:
        raise _invalid(f"tokens must be the {block + 1} blocks up to the position's")
    chain = prefix_chain(ad.fp, list(evidence.tokens), layout.block, PUBLIC)
    if chain != list(ad.blocks[: block + 1]):
        raise _invalid("the tokens do not hash to the claim's chain")
    size = ad.size
    count = chunk_count(size, chunk)
    if len(evidence.hashes) != 32 * count or count > MAX_EVIDENCE_HASHES:
        raise _invalid(f"the claim's payload has {count} chunk hashes")
    hashes = [evidence.hashes[i : i + 32] for i in range(0, len(evidence.hashes), 32)]
    if content_root(size, chunk, hashes) != ad.root:
        raise _invalid("the chunk hashes do not hash to the claim's root")
    wanted = covering_chunks(layout, chunk, evidence.position)
    if [i for i, _ in evidence.chunks] != list(wanted):
        raise _invalid(f"the chunks must be {list(wanted)}")
    data = b""
    for index, piece in evidence.chunks:
        if len(piece) != min(chunk, size - index * chunk):
            raise _invalid(f"chunk {index} has the wrong length")
        if blake3.blake3(piece).digest() != hashes[index]:
            raise _invalid(f"chunk {index} does not hash to its entry")
        data += piece
    start, _ = layer0_span(layout, block)
    at = start - wanted.start * chunk
    row = layout.head_dim * layout.itemsize
    t = evidence.position - block * layout.block
    heads = range(layout.kv_heads)
    keys = b"".join(data[at + (h * layout.block + t) * row :][:row] for h in heads)
    values_at = at + layout.kv_heads * layout.block * row
    values = b"".join(data[values_at + (h * layout.block + t) * row :][:row] for h in heads)
    return Bound(
        seller=st.signer_id,
        signer=st.signer,
        fp=ad.fp,
        root=ad.root,
        layout=layout,
        tokens=evidence.tokens,
        position=evidence.position,
        keys=keys,
        values=values,
    )
