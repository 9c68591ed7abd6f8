"""Every conformance case, in the order the suite runs them: each part of the spec has its
module, and importing it registers its cases."""

from . import _cases_frames, _cases_fraud, _cases_gossip, _cases_trade  # noqa: F401
from ._case import CASES, Case

__all__ = ["CASES", "Case"]
