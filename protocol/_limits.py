"""Every number the spec fixes, in one place, so the code and spec/PROTOCOL.md agree."""

from __future__ import annotations

PROTOCOL_VERSION = 3

MAX_FRAME_BYTES = 1 << 20
"""Largest control frame (one envelope) a node accepts; larger ones are never decoded."""

MAX_CLOCK_SKEW_MS = 30_000
"""How far issued-at may lie in the future, and expires-at in the past, before rejection."""

MAX_LIFETIME_MS = 300_000
"""Longest exp - iat for a direct (point-to-point) statement."""

MAX_ADVERT_LIFETIME_MS = 86_400_000
"""Longest exp - iat for a relayable statement (ADVERTISE, WITHDRAW)."""

MAX_MAP_KEYS = 64
"""Keys in any one msgpack map, unknown ones included (spec §4.4)."""

MAX_ARRAY_ITEMS = 8192
"""Items in any one msgpack array: twice the longest field (a chain, a digest: 4096), so an
over-long field is still INVALID_FIELD up to there and MALFORMED past it (spec §4.4)."""

MAX_UNKNOWN_BYTES = 4096
"""Encoded bytes of unknown keys and their values a relayable statement may carry (§4.5)."""

DEFAULT_BLOCK_TOKENS = 256
MAX_BLOCK_TOKENS = 65_536
MAX_CHAIN_BLOCKS = 4096
"""Blocks in one prefix chain: 4096 x 256 tokens covers a million-token document."""

DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20

MAX_TOKEN_ID = (1 << 32) - 1
MAX_UINT64 = (1 << 64) - 1
MAX_PROOF_BYTES = 65_536
"""The largest frame a PROBE_ACK carries as its target's proof of life (spec §8.18)."""

MAX_EVIDENCE_BYTES = 2 * MAX_CHUNK_BYTES + (8 << 20)
"""The largest evidence an ACCUSE names (spec §8.19): the layer-0 part of one block may
straddle two chunks; the claim, the chunk list and the token ids fit in the rest."""
MAX_EVIDENCE_PART = 512 << 10
"""Evidence bytes one EVIDENCE frame carries: the asker pulls the rest part by part."""
