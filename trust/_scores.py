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

from ._policy import ScoreRules


class Event(Enum):
    """What a peer did, with its weight."""

    BAD_SIGNATURE = -20.0
    MALFORMED = -10.0
    REPLAY = -10.0
    FLOOD = -10.0
    BAD_CHUNK = -30.0
    LIED = -100.0  # KV or a layout that the buyer's own model refutes (§12.2)
    UNSERVABLE_AD = -15.0
    TIMEOUT = -5.0
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
    ErrorCode.RATE_LIMITED: Event.FLOOD,
    ErrorCode.CHUNK_HASH_MISMATCH: Event.BAD_CHUNK,
    ErrorCode.ROOT_MISMATCH: Event.BAD_CHUNK,
    ErrorCode.SIZE_MISMATCH: Event.BAD_CHUNK,
    ErrorCode.STREAM_TRUNCATED: Event.TIMEOUT,
    ErrorCode.KV_MISMATCH: Event.LIED,
    ErrorCode.TIMEOUT: Event.TIMEOUT,
}


class PeerScores:
    def __init__(self, path: str | os.PathLike[str], rules: ScoreRules | None = None) -> None:
        self.rules = rules if rules is not None else ScoreRules()
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS scores (peer BLOB PRIMARY KEY, score REAL NOT NULL,"
            " updated REAL NOT NULL, banned_until REAL NOT NULL)"
        )
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

    def is_banned(self, peer: bytes, now: float) -> bool:
        return self._decayed(peer, now)[1] > now

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

    def table(self, now: float) -> list[tuple[bytes, float, bool]]:
        """(peer, score, banned) for every peer, lowest score first."""
        rows = [(p, self.score(p, now), self.is_banned(p, now)) for p in self._rows]
        return sorted(rows, key=lambda r: r[1])
