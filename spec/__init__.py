"""kvx.conformance: the spec's test vectors, their generator, and the black-box suite that
tests any implementation over the network (or its codec through an adapter)."""

from ._case import (
    FIXTURE_CHAIN,
    FIXTURE_CHUNK,
    FIXTURE_FP,
    FIXTURE_LAYOUT,
    FIXTURE_PAYLOAD,
    FIXTURES,
)
from ._cases import CASES, Case
from ._runner import dry_run, report, run_live, run_vectors
from ._wire_json import from_json, to_json

__all__ = [
    "CASES",
    "FIXTURES",
    "FIXTURE_CHAIN",
    "FIXTURE_CHUNK",
    "FIXTURE_FP",
    "FIXTURE_LAYOUT",
    "FIXTURE_PAYLOAD",
    "Case",
    "dry_run",
    "from_json",
    "report",
    "run_live",
    "run_vectors",
    "to_json",
]
