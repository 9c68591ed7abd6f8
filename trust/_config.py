"""Reading the node's TOML config so that every mistake is reported with its line.

tomllib reports syntax errors with a position but knows nothing of meaning; a key with
a bad value is located here by scanning the text for its table and key, which is enough
to point a person at the line to fix.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kvx.protocol import ConfigError

T = TypeVar("T")
_HEADER = re.compile(r"^\s*\[(\[)?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B|B)?\s*$")
_UNITS: dict[str, int] = {"B": 1} | {
    f"{p}{i}B": (1024 if i else 1000) ** n for n, p in enumerate("KMGT", 1) for i in ("i", "")
}


def parse_size(text: str) -> int | None:
    """Bytes in `text` ("2GiB", "512 MiB", "1GB", "4096"), or None."""
    match = _SIZE.match(text)
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2) or "B"]


class ConfigFile:
    """A parsed TOML file that can say where each key stands."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path}: not UTF-8 text") from None
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None

    def only_tables(self, known: tuple[str, ...]) -> None:
        """Refuse a table nobody reads: a misspelt one would otherwise leave the real
        one empty, and the error would name a key missing from it instead."""
        for table in self.data:
            if table not in known:
                kind = "key" if not isinstance(self.data[table], dict | list) else "table"
                raise self.error(table, None, f"unknown {kind} (the tables are {', '.join(known)})")

    def line_of(self, table: str, key: str | None = None, index: int = 0) -> int | None:
        """1-based line of `key` in `table` (the index-th of an array of tables), if found."""
        current, seen = "", -1
        for number, line in enumerate(self.text.splitlines(), 1):
            header = _HEADER.match(line)
            if header:
                current = header.group(2).replace(" ", "").replace('"', "")
                if current == table:
                    seen += 1
                    if key is None and seen == index:
                        return number
                continue
            if current == table and seen == index and key is not None:
                head = line.split("=", 1)[0].strip().strip('"')
                if "=" in line and head == key:
                    return number
        return None

    def error(self, table: str, key: str | None, reason: str, index: int = 0) -> ConfigError:
        line = self.line_of(table, key, index)
        where = f"{self.path}" + (f", line {line}" if line else "")
        name = ".".join(p for p in (table, key) if p)
        return ConfigError(f"{where}: {name}: {reason}")


class Section:
    """One table of a ConfigFile; every read checks the type and removes the key, so
    whatever is left at the end is a key nobody knows — a typo, reported as such."""

    def __init__(self, config: ConfigFile, table: str, index: int = 0) -> None:
        self.config = config
        self.table = table
        self.index = index
        value: Any = config.data
        for part in table.split("."):
            value = value.get(part, {}) if isinstance(value, dict) else {}
        if isinstance(value, list):
            value = value[index]
        if not isinstance(value, dict):
            raise config.error(table, None, "must be a table")
        self._left = dict(value)

    def error(self, key: str | None, reason: str) -> ConfigError:
        return self.config.error(self.table, key, reason, self.index)

    def take(
        self, key: str, kind: type[T], default: T, check: Callable[[T], str | None] | None = None
    ) -> T:
        """The value of `key`, of type `kind`, passing `check` (which returns a problem)."""
        if key not in self._left:
            return default
        value = self._left.pop(key)
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise self.error(key, f"expected {kind.__name__}, got {type(value).__name__}")
        problem = check(value) if check else None
        if problem:
            raise self.error(key, problem)
        return value

    def take_bytes(
        self, key: str, default: int, check: Callable[[int], str | None] | None = None
    ) -> int:
        """A size: an integer of bytes, or a string such as "2GiB", "512 MiB" or "1GB"."""
        if isinstance(self._left.get(key), str):
            text = self._left[key]
            size = parse_size(text)
            if size is None:
                raise self.error(key, f'{text!r} is no size (bytes, or e.g. "2GiB", "512MB")')
            self._left[key] = size
        return self.take(key, int, default, check)

    def finish(self) -> None:
        for key in self._left:
            raise self.error(key, "unknown key")


def check_private(path: Path, what: str) -> None:
    """Refuse a file that group or others may read or write, saying how to fix it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path} has mode {mode:04o}: group or others may access it; "
            f"run `chmod 600 {path}` if it has not leaked, else make a new one"
        )


def owner_only(path: str | os.PathLike[str]) -> None:
    """Create `path` (if absent) or narrow it to its owner, before a library opens it: a
    node's files hold its deals, scores and KV, private namespaces' included, whatever
    the umask or the data dir's mode. SQLite gives its WAL and shared-memory files the
    database's own mode. SQLite's in-memory database is no file at all."""
    if os.fspath(path) == ":memory:":
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def write_private(path: str | os.PathLike[str], text: str, what: str) -> None:
    """Create a file readable by its owner only; an existing file is never replaced."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a {what}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; be exact anyway
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret(path: Path) -> bytes:
    """A 32-byte secret stored as hex in a private file (namespace secrets, at-rest keys)."""
    check_private(path, "secret file")
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        secret = b""
    if len(secret) != 32:
        raise ConfigError(f"{path} does not hold a 32-byte hex secret")
    return secret
