"""The JSON form of msgpack values used by the vectors: bin becomes {"hex": ...}.

It maps wire values, not any implementation's objects, so another language can compare
its own decoding of a body with a vector using nothing but msgpack and JSON.
"""

from __future__ import annotations

from typing import Any


def to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"hex"}:
            return bytes.fromhex(value["hex"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
