"""kvx.trust: who said what, and what they may do — identities, signed envelopes, the
replay guard, the encrypted control channel, namespaces, policy, peer scores, the ledger.
"""

from ._atrest import AtRestCipher
from ._config import ConfigFile, owner_only, read_secret, write_private
from ._credit import Allowance, source_network
from ._curve import make_curve_client, make_curve_server, peer_curve_key, start_authenticator
from ._envelope import (
    DEFAULT_TTL_MS,
    Inbox,
    Signer,
    Statement,
    open_envelope,
    seal,
    verify_envelope,
)
from ._evidence import Bound, Evidence, bind, covering_chunks, evidence_id
from ._freshness import ReplayGuard, water_fill
from ._identity import KEY_FILE_TAG, Identity, curve_public_key
from ._ledger import AuditEntry, Ledger, Receipted
from ._membership import Memberships
from ._policy import DEFAULT_VERIFY, NamespaceRule, Policy, ScoreRules, VerifyPolicy, load_policy
from ._scores import Event, PeerScores

__all__ = [
    "DEFAULT_TTL_MS",
    "DEFAULT_VERIFY",
    "KEY_FILE_TAG",
    "Allowance",
    "AtRestCipher",
    "AuditEntry",
    "Bound",
    "ConfigFile",
    "Event",
    "Evidence",
    "Identity",
    "Inbox",
    "Ledger",
    "Memberships",
    "NamespaceRule",
    "PeerScores",
    "Policy",
    "Receipted",
    "ReplayGuard",
    "ScoreRules",
    "Signer",
    "Statement",
    "VerifyPolicy",
    "bind",
    "covering_chunks",
    "curve_public_key",
    "evidence_id",
    "load_policy",
    "make_curve_client",
    "make_curve_server",
    "open_envelope",
    "owner_only",
    "peer_curve_key",
    "read_secret",
    "seal",
    "source_network",
    "start_authenticator",
    "verify_envelope",
    "water_fill",
    "write_private",
]
