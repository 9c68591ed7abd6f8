"""The local KV store: a memory tier bounded in bytes (LRU) over a disk tier of
content-addressed files with a SQLite index. Both survive nothing unverified: every
payload read back from disk is checked against its content root before it is used.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvx.protocol import (
    DEFAULT_CHUNK_BYTES,
    IntegrityError,
    KVLayout,
    byte_view,
    chunk_hashes,
    content_root,
)
from kvx.trust import AtRestCipher, owner_only


@dataclass(frozen=True)
class Entry:
    """What the store knows of one payload, without the payload itself."""

    root: bytes
    fp: bytes
    ns: bytes | None
    layout: KVLayout
    blocks: tuple[bytes, ...]
    chunk: int
    params: int = 0  # parameters of the model that computed it, for pricing (0: unknown)

    @property
    def size(self) -> int:
        return self.layout.payload_bytes(len(self.blocks))

    def matched(self, fp: bytes, ns: bytes | None, chain: tuple[bytes, ...]) -> int:
        """How many leading blocks of `chain` this entry holds."""
        if fp != self.fp or ns != self.ns:
            return 0
        n = 0
        for mine, theirs in zip(self.blocks, chain, strict=False):
            if mine != theirs:
                break
            n += 1
        return n


@dataclass(frozen=True)
class Payload:
    entry: Entry
    data: bytes
    hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class PublishRequest:
    """What publishing a payload takes: one list of fields from the client's call through
    the admin socket and the node core to the store."""

    fp: bytes  # the model fingerprint
    layout: KVLayout
    blocks: tuple[bytes, ...]  # the prefix chain the payload holds the KV of
    payload: object  # bytes, or a tensor: the KV of every block, in the layout's order
    params: int = 0  # the model's parameters, from which the node prices it
    ns: bytes | None = None  # a private namespace to sell it in (None: public)
    chunk: int = DEFAULT_CHUNK_BYTES

    def to_admin(self) -> dict[str, object]:
        """The admin request's arguments (msgpack: plain types)."""
        return {
            "fp": self.fp,
            "ns": self.ns,
            "layout": self.layout.__dict__,
            "blocks": list(self.blocks),
            "payload": bytes(byte_view(self.payload)),
            "chunk": self.chunk,
            "params": self.params,
        }

    @classmethod
    def from_admin(cls, args: dict[str, Any]) -> PublishRequest:
        return cls(
            fp=args["fp"],
            layout=KVLayout(**args["layout"]),
            blocks=tuple(args["blocks"]),
            payload=args["payload"],
            params=args.get("params", 0),
            ns=args.get("ns"),
            chunk=args.get("chunk", DEFAULT_CHUNK_BYTES),
        )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    root BLOB PRIMARY KEY, fp BLOB NOT NULL, ns BLOB, layout TEXT NOT NULL,
    blocks BLOB NOT NULL, chunk INTEGER NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL,
    params INTEGER NOT NULL DEFAULT 0
)
"""


class LocalStore:
    def __init__(
        self,
        directory: Path,
        *,
        memory_bytes: int,
        disk_bytes: int,
        cipher: AtRestCipher | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir = directory
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self.cipher = cipher
        owner_only(directory / "index.db")
        self._db = sqlite3.connect(directory / "index.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._memory: OrderedDict[bytes, Payload] = OrderedDict()
        self._entries = {
            row[0]: self._entry(row)
            for row in self._db.execute(
                "SELECT root, fp, ns, layout, blocks, chunk, params FROM entries"
            )
        }
        # An index row whose file is gone cannot be served: forget it now.
        for root in [r for r in self._entries if not self._path(r).exists()]:
            self.drop(root)

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> Entry:
        root, fp, ns, layout, blocks, chunk, params = row
        return Entry(
            root,
            fp,
            ns,
            KVLayout(**json.loads(layout)),
            tuple(blocks[i : i + 32] for i in range(0, len(blocks), 32)),
            chunk,
            params,
        )

    def _path(self, root: bytes) -> Path:
        return self.dir / f"{root.hex()}.kv"

    def close(self) -> None:
        self._db.close()

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def disk_used(self) -> int:
        return sum(e.size for e in self._entries.values())

    def memory_used(self) -> int:
        return sum(p.entry.size for p in self._memory.values())

    def put(self, request: PublishRequest) -> tuple[Entry, list[Entry]]:
        """Store a payload under its content root; returns it and what was evicted for it."""
        fp, ns, layout, blocks, chunk = (
            request.fp,
            request.ns,
            request.layout,
            request.blocks,
            request.chunk,
        )
        data = bytes(byte_view(request.payload))
        if len(data) != layout.payload_bytes(len(blocks)):
            raise ValueError(
                f"{len(data)} bytes, but {len(blocks)} blocks of this layout "
                f"are {layout.payload_bytes(len(blocks))}"
            )
        if len(data) > self.disk_bytes:
            raise ValueError("the payload is larger than the whole disk tier")
        hashes = tuple(chunk_hashes(data, chunk))
        root = content_root(len(data), chunk, hashes)
        entry = Entry(root, fp, ns, layout, tuple(blocks), chunk, request.params)
        evicted = []
        while self.disk_used() + entry.size > self.disk_bytes:
            victim = self._least_used()
            evicted.append(self._entries[victim])
            self.drop(victim)
        blob = self.cipher.seal(data) if self.cipher else data
        tmp = self._path(root).with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._path(root))
        self._db.execute(
            "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                root,
                fp,
                ns,
                json.dumps(layout.__dict__),
                b"".join(blocks),
                chunk,
                len(data),
                time.time(),
                request.params,
            ),
        )
        self._entries[root] = entry
        self._remember(Payload(entry, data, hashes))
        return entry, evicted

    def _least_used(self) -> bytes:
        root: bytes = self._db.execute("SELECT root FROM entries ORDER BY used LIMIT 1").fetchone()[
            0
        ]
        return root

    def drop(self, root: bytes) -> None:
        """Forget a payload (evicted, or failed its root): it is never served again."""
        self._memory.pop(root, None)
        self._entries.pop(root, None)
        self._db.execute("DELETE FROM entries WHERE root = ?", (root,))
        self._path(root).unlink(missing_ok=True)

    def _remember(self, payload: Payload) -> None:
        root = payload.entry.root
        self._memory[root] = payload
        self._memory.move_to_end(root)
        while sum(p.entry.size for p in self._memory.values()) > self.memory_bytes:
            self._memory.popitem(last=False)  # still on disk

    def verify_all(self) -> list[Entry]:
        """Check every payload on disk against its root; drop and return the ones that fail."""
        dropped = []
        for entry in self.entries():
            try:
                self.read(entry)
            except IntegrityError:
                self.drop(entry.root)
                dropped.append(entry)
        return dropped

    def read(self, entry: Entry) -> Payload:
        """The payload of an entry, read and checked against its root, or IntegrityError.
        Touches neither the index nor the memory tier's order, so that a driver may call
        it off the event loop; `used` then records the read, or `drop` forgets a failure."""
        payload = self._memory.get(entry.root)
        if payload is not None:
            return payload
        root = entry.root
        try:
            data = self._path(root).read_bytes()
            data = self.cipher.open(data) if self.cipher else data
        except (OSError, IntegrityError) as exc:
            raise IntegrityError(f"stored payload {root.hex()[:16]} is unreadable: {exc}") from None
        hashes = tuple(chunk_hashes(data, entry.chunk)) if len(data) == entry.size else ()
        if not hashes or content_root(len(data), entry.chunk, hashes) != root:
            raise IntegrityError(f"stored payload {root.hex()[:16]} failed its content root")
        return Payload(entry, data, hashes)

    def cached(self, root: bytes) -> Payload | None:
        """The payload if the memory tier holds it (verified when it was put or read)."""
        return self._memory.get(root)

    def used(self, entry: Entry, payload: Payload | None = None) -> None:
        """An entry was sold: the last to be evicted; its payload, if it was read for it,
        kept in memory if it fits."""
        if payload is not None:
            self._remember(payload)
        # When it was read orders eviction, nothing more: not worth a flush to disk on
        # every sale (the next durable write carries it).
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute(
                "UPDATE entries SET used = ? WHERE root = ?", (time.time(), entry.root)
            )
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def get(self, root: bytes) -> Payload:
        """The payload with this root, verified; IntegrityError (and it is dropped) if corrupt."""
        entry = self._entries.get(root)
        if entry is None:
            raise KeyError(root.hex())
        try:
            payload = self.read(entry)
        except IntegrityError:
            self.drop(root)
            raise
        self.used(entry, payload)
        return payload

    def best_match(
        self, fp: bytes, ns: bytes | None, chain: tuple[bytes, ...]
    ) -> tuple[int, Entry | None]:
        best: tuple[int, Entry | None] = (0, None)
        for entry in self._entries.values():
            n = entry.matched(fp, ns, chain)
            if n > best[0]:
                best = (n, entry)
        return best
