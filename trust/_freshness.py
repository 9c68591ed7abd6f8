"""The replay and expiry guard (spec §6.2): stale, far-future and repeated statements die here."""

from __future__ import annotations

import heapq
import threading

from kvx.protocol import MAX_CLOCK_SKEW_MS, ErrorCode, Header, RemoteProtocolError


class ReplayGuard:
    """Remembers each accepted (signer, seq) until its statement expires.

    Once a statement is past exp + skew it is refused as expired anyway, so forgetting it
    then is safe: memory is bounded by the statements alive at once, and capped outright.
    """

    def __init__(
        self,
        *,
        skew_ms: int = MAX_CLOCK_SKEW_MS,
        max_per_signer: int = 65_536,
        max_total: int = 262_144,
    ) -> None:
        self.skew_ms = skew_ms
        self.max_per_signer = max_per_signer
        self.max_total = max_total
        self._seen: dict[bytes, set[int]] = {}
        self._expiry: list[tuple[int, bytes, int]] = []
        self._lock = threading.Lock()  # data streams are admitted from worker threads

    def __len__(self) -> int:
        return len(self._expiry)

    def _forget_expired(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] + self.skew_ms < now_ms:
            _, signer, seq = heapq.heappop(self._expiry)
            seqs = self._seen[signer]
            seqs.discard(seq)
            if not seqs:
                del self._seen[signer]

    def check(self, signer: bytes, header: Header, now_ms: int) -> None:
        """Accept the statement once, or raise the reason it must be dropped."""
        if header.iat > now_ms + self.skew_ms:
            raise RemoteProtocolError(
                ErrorCode.NOT_YET_VALID, f"issued {header.iat - now_ms} ms in the future"
            )
        if header.exp + self.skew_ms < now_ms:
            raise RemoteProtocolError(ErrorCode.EXPIRED, f"expired {now_ms - header.exp} ms ago")
        with self._lock:
            self._remember(signer, header, now_ms)

    def _remember(self, signer: bytes, header: Header, now_ms: int) -> None:
        self._forget_expired(now_ms)
        seqs = self._seen.get(signer, set())
        if header.seq in seqs:
            raise RemoteProtocolError(ErrorCode.REPLAYED, f"sequence {header.seq} already seen")
        if len(seqs) >= self.max_per_signer or len(self._expiry) >= self.max_total:
            raise RemoteProtocolError(
                ErrorCode.RATE_LIMITED, "too many live statements to remember; try later"
            )
        self._seen.setdefault(signer, seqs).add(header.seq)
        heapq.heappush(self._expiry, (header.exp, signer, header.seq))
