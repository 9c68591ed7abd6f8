"""Every conformance case, in the order the suite runs them: each part of the spec has its
module, and importing it registers its cases."""

from . import _cases_frames, _cases_fraud, _cases_gossip, _cases_trade  # noqa: F401
from ._case import (
    CASES,
    FIXTURE_CHAIN,
    FIXTURE_CHUNK,
    FIXTURE_FP,
    FIXTURE_LAYOUT,
    FIXTURE_PAYLOAD,
    FIXTURES,
    Case,
)

__all__ = [
    "CASES",
    "FIXTURES",
    "FIXTURE_CHAIN",
    "FIXTURE_CHUNK",
    "FIXTURE_FP",
    "FIXTURE_LAYOUT",
    "FIXTURE_PAYLOAD",
    "Case",
]
