"""Declarative wire types: one description per field drives validation both ways.

Every message is a frozen dataclass whose fields carry their wire type in the field
metadata (`wire(...)`). Decoding checks a peer's map against those types; encoding
checks our own values with the very same rules, so what we send always decodes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from ._errors import ErrorCode
from ._limits import MAX_UINT64


class Invalid(Exception):
    """A value broke its field's rule; the codec turns it into a Local or Remote error."""

    def __init__(self, path: str, reason: str, code: ErrorCode = ErrorCode.INVALID_FIELD) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.code = code


class WireType(Protocol):
    def decode(self, value: object, path: str) -> Any: ...

    def encode(self, value: Any, path: str) -> object: ...


def _kind(value: object) -> str:
    return type(value).__name__


@dataclass(frozen=True)
class UInt:
    lo: int = 0
    hi: int = MAX_UINT64

    def decode(self, value: object, path: str) -> int:
        # bool is an int subclass in Python but a distinct msgpack type on the wire.
        if type(value) is not int:
            raise Invalid(path, f"expected unsigned integer, got {_kind(value)}")
        if not self.lo <= value <= self.hi:
            raise Invalid(path, f"{value} is outside [{self.lo}, {self.hi}]")
        return value

    encode = decode


@dataclass(frozen=True)
class Bin:
    lo: int = 0
    hi: int = MAX_UINT64

    def decode(self, value: object, path: str) -> bytes:
        if type(value) is not bytes:
            raise Invalid(path, f"expected bin, got {_kind(value)}")
        if not self.lo <= len(value) <= self.hi:
            raise Invalid(path, f"length {len(value)} is outside [{self.lo}, {self.hi}]")
        return value

    encode = decode


@dataclass(frozen=True)
class Str:
    lo: int = 0
    hi: int = 256
    pattern: str | None = None

    def decode(self, value: object, path: str) -> str:
        if type(value) is not str:
            raise Invalid(path, f"expected str, got {_kind(value)}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if not self.lo <= size <= self.hi:
            raise Invalid(path, f"UTF-8 length {size} is outside [{self.lo}, {self.hi}]")
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise Invalid(path, f"{value!r} does not match {self.pattern}")
        return value

    encode = decode


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def decode(self, value: object, path: str) -> str:
        if type(value) is not str or value not in self.choices:
            raise Invalid(path, f"expected one of {', '.join(self.choices)}, got {value!r:.40}")
        return value

    encode = decode


@dataclass(frozen=True)
class Bool:
    def decode(self, value: object, path: str) -> bool:
        if type(value) is not bool:
            raise Invalid(path, f"expected bool, got {_kind(value)}")
        return value

    encode = decode


@dataclass(frozen=True)
class Array:
    item: WireType
    lo: int = 0
    hi: int = MAX_UINT64

    def _items(self, value: object, path: str, accepted: tuple[type, ...]) -> list[Any]:
        if type(value) not in accepted:
            raise Invalid(path, f"expected array, got {_kind(value)}")
        assert isinstance(value, list | tuple)
        if not self.lo <= len(value) <= self.hi:
            raise Invalid(path, f"{len(value)} items is outside [{self.lo}, {self.hi}]")
        return list(value)

    def decode(self, value: object, path: str) -> tuple[Any, ...]:
        items = self._items(value, path, (list,))
        return tuple(self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(items))

    def encode(self, value: Any, path: str) -> list[object]:
        items = self._items(value, path, (list, tuple))
        return [self.item.encode(v, f"{path}[{i}]") for i, v in enumerate(items)]


@dataclass(frozen=True)
class Struct:
    cls: type

    def decode(self, value: object, path: str) -> Any:
        return decode_struct(self.cls, value, path)

    def encode(self, value: Any, path: str) -> dict[str, object]:
        if type(value) is not self.cls:
            raise Invalid(path, f"expected {self.cls.__name__}, got {_kind(value)}")
        return encode_struct(value, path)


def wire(wire_type: WireType, **kwargs: Any) -> Any:
    """Declare a dataclass field with its wire type; a `default` makes it optional."""
    return dataclasses.field(metadata={"wire": wire_type}, **kwargs)


def _check(obj: Any, path: str) -> None:
    # Rules that span fields live in a `check` method raising Invalid(field name, reason).
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except Invalid as exc:
            raise Invalid(f"{path}.{exc.path}", exc.reason, exc.code) from None


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool, bool], ...]:
    """(name, wire type, required, optional-as-None) of each field of a message class."""
    return tuple(
        (
            f.name,
            f.metadata["wire"],
            f.default is dataclasses.MISSING,
            f.default is None,
        )
        for f in dataclasses.fields(cls)
    )


def decode_struct(cls: type, value: object, path: str) -> Any:
    """Build `cls` from a peer's map; unknown keys are ignored (spec §4.5)."""
    if type(value) is not dict:
        raise Invalid(path, f"expected map, got {_kind(value)}")
    kwargs: dict[str, Any] = {}
    for name, wire, required, _ in _fields(cls):
        if name in value:
            kwargs[name] = wire.decode(value[name], f"{path}.{name}")
        elif required:
            raise Invalid(f"{path}.{name}", "required field is missing")
    obj = cls(**kwargs)
    _check(obj, path)
    return obj


def encode_struct(obj: Any, path: str) -> dict[str, object]:
    """The map for `obj`; optional fields left at None are omitted, never sent as nil."""
    out: dict[str, object] = {}
    cls: type = type(obj)
    for name, wire, _, optional in _fields(cls):
        value = getattr(obj, name)
        if value is None and optional:
            continue
        out[name] = wire.encode(value, f"{path}.{name}")
    _check(obj, path)
    return out


def unknown_bytes(cls: type, value: dict[str, Any], *also: type) -> int:
    """Encoded size of the keys (with their values) in a decoded map, and in the maps
    nested in its known fields, that `cls` (and `also`) do not define."""
    known = {f.name: f.metadata["wire"] for c in (cls, *also) for f in dataclasses.fields(c)}
    total = 0
    for key, item in value.items():
        kind = known.get(key)
        if kind is None:
            total += len(msgpack.packb(key)) + len(msgpack.packb(item, use_bin_type=True))
        elif isinstance(kind, Struct):
            total += unknown_bytes(kind.cls, item)
        elif isinstance(kind, Array) and isinstance(kind.item, Struct):
            total += sum(unknown_bytes(kind.item.cls, v) for v in item)
    return total
