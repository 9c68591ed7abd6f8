"""Peer scores: what each peer did to us, decaying with time, persisted across restarts.

A node lowers a peer's score for each fault it proves against it and raises it for good
deliveries; a peer below the threshold is ignored for a cooling period. Times are passed
in (seconds), so the rules are testable without sleeping.
"""

from __future__ import annotations

import os
import sqlite3
from enum import Enum

from kvx.protocol import ErrorCode

from ._config import owner_only
from ._policy import ScoreRules


class Event(Enum):
    """What a peer did, with its weight."""

    BAD_SIGNATURE = -20.0
    MALFORMED = -10.0
    REPLAY = -10.0
    BAD_CHUNK = -30.0
    LIED = -100.0  # KV or a layout that the buyer's own model refutes (§12.2)
    FALSE_ACCUSATION = -100.0  # an ACCUSE whose evidence the weights show false (§8.19)
    UNSERVABLE_AD = -15.0
    TIMEOUT = -5.0
    BAD_RECEIPT = -30.0  # a window receipt for what was not sent, or that does not pay (§9.4)
    GOOD_DELIVERY = 5.0

    @classmethod
    def for_code(cls, code: ErrorCode) -> Event | None:
        """The event a rejected frame's code proves against the peer that sent it."""
        return _BY_CODE.get(code)


_BY_CODE = {
    ErrorCode.MALFORMED: Event.MALFORMED,
    ErrorCode.FRAME_TOO_LARGE: Event.MALFORMED,
    ErrorCode.UNKNOWN_TYPE: Event.MALFORMED,
    ErrorCode.INVALID_FIELD: Event.MALFORMED,
    ErrorCode.LIFETIME_TOO_LONG: Event.MALFORMED,
    ErrorCode.BAD_SIGNATURE: Event.BAD_SIGNATURE,
    ErrorCode.SIGNER_MISMATCH: Event.BAD_SIGNATURE,
    ErrorCode.REPLAYED: Event.REPLAY,
    ErrorCode.EXPIRED: Event.REPLAY,
    ErrorCode.NOT_YET_VALID: Event.REPLAY,
    ErrorCode.CHUNK_HASH_MISMATCH: Event.BAD_CHUNK,
    ErrorCode.BAD_SEAL: Event.BAD_CHUNK,
    ErrorCode.ROOT_MISMATCH: Event.BAD_CHUNK,
    ErrorCode.SIZE_MISMATCH: Event.BAD_CHUNK,
    ErrorCode.STREAM_TRUNCATED: Event.TIMEOUT,
    ErrorCode.KV_MISMATCH: Event.LIED,
    ErrorCode.TIMEOUT: Event.TIMEOUT,
}


class PeerScores:
    def __init__(self, path: str | os.PathLike[str], rules: ScoreRules | None = None) -> None:
        self.rules = rules if rules is not None else ScoreRules()
        owner_only(path)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS scores (peer BLOB PRIMARY KEY, score REAL NOT NULL,"
            " updated REAL NOT NULL, banned_until REAL NOT NULL)"
        )
        # Verdicts that never decay (§8.19): a seller convicted of lying, or an accuser
        # of accusing falsely, with the signed ACCUSE and the evidence that show it.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS convictions (peer BLOB NOT NULL, kind TEXT NOT NULL,"
            " proof BLOB NOT NULL, accuse BLOB NOT NULL, evidence BLOB NOT NULL,"
            " at REAL NOT NULL, PRIMARY KEY (peer, kind))"
        )
        self._convicted: dict[bytes, tuple[str, bytes]] = {
            peer: (kind, proof)
            for peer, kind, proof in self._db.execute("SELECT peer, kind, proof FROM convictions")
        }
        self.write_failed = False  # the last write to disk failed (full disk): a metric
        self._rows: dict[bytes, tuple[float, float, float]] = {
            peer: (score, updated, banned)
            for peer, score, updated, banned in self._db.execute("SELECT * FROM scores")
        }

    def close(self) -> None:
        self._db.close()

    def _decayed(self, peer: bytes, now: float) -> tuple[float, float]:
        score, updated, banned = self._rows.get(peer, (0.0, now, 0.0))
        elapsed = max(0.0, now - updated)
        return score * 0.5 ** (elapsed / self.rules.half_life_s), banned

    def score(self, peer: bytes, now: float) -> float:
        return self._decayed(peer, now)[0]

    def record(self, peer: bytes, event: Event, now: float) -> float:
        """Apply one event; a score falling below the threshold starts a cooling period."""
        score, banned = self._decayed(peer, now)
        score += event.value
        if score < self.rules.threshold and banned <= now:
            banned = now + self.rules.cooldown_s
        self._rows[peer] = (score, now, banned)
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", (peer, score, now, banned)
            )
            self.write_failed = False
        except sqlite3.Error:
            # Scores keep working in memory; what a full disk costs is their persistence.
            self.write_failed = True
        return score

    def convict(
        self, peer: bytes, kind: str, proof: bytes, accuse: bytes, evidence: bytes, now: float
    ) -> None:
        """Keep, for good, that `peer` lied (kind "lied") or accused falsely ("false
        accusation"), with what proves it; the peer is also scored and banned."""
        self._convicted[peer] = (kind, proof)
        self.record(peer, Event.LIED if kind == "lied" else Event.FALSE_ACCUSATION, now)
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO convictions VALUES (?, ?, ?, ?, ?, ?)",
                (peer, kind, proof, accuse, evidence, now),
            )
        except sqlite3.Error:
            self.write_failed = True

    def convicted(self) -> dict[bytes, tuple[str, bytes]]:
        """Every peer convicted, with (kind, proof id)."""
        return dict(self._convicted)

    def conviction(self, peer: bytes) -> tuple[str, bytes] | None:
        """(kind, proof id) when `peer` stands convicted."""
        return self._convicted.get(peer)

    def evidence(self, proof: bytes, offset: int, size: int) -> tuple[bytes, int] | None:
        """Bytes [offset, offset + size) of the evidence of a conviction this node holds,
        by proof id, and the evidence's whole length (read a part at a time: up to
        MAX_EVIDENCE_BYTES each)."""
        row = self._db.execute(
            "SELECT substr(evidence, ?, ?), length(evidence) FROM convictions"
            " WHERE proof = ? AND kind = 'lied'",
            (offset + 1, size, proof),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def is_banned(self, peer: bytes, now: float) -> bool:
        return peer in self._convicted or self._decayed(peer, now)[1] > now

    def table(self, now: float) -> list[tuple[bytes, float, bool]]:
        """(peer, score, banned) for every peer, lowest score first."""
        rows = [(p, self.score(p, now), self.is_banned(p, now)) for p in self._rows]
        return sorted(rows, key=lambda r: r[1])
