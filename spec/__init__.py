"""kvx.conformance: the spec's test vectors and their generator (the black-box suite follows)."""

from ._wire_json import from_json, to_json

__all__ = ["from_json", "to_json"]
