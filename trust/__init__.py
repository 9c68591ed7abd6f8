"""kvx.trust: who said what — identities, signed envelopes, the replay and expiry guard."""

from ._envelope import DEFAULT_TTL_MS, Inbox, Signer, Statement, open_envelope, seal
from ._freshness import ReplayGuard
from ._identity import KEY_FILE_TAG, Identity, curve_public_key

__all__ = [
    "DEFAULT_TTL_MS",
    "KEY_FILE_TAG",
    "Identity",
    "Inbox",
    "ReplayGuard",
    "Signer",
    "Statement",
    "curve_public_key",
    "open_envelope",
    "seal",
]
