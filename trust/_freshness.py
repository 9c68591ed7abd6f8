"""The replay and expiry guard (spec §6.2): stale, far-future and repeated statements die here."""

from __future__ import annotations

import heapq
import threading
from itertools import islice

from kvx.protocol import MAX_CLOCK_SKEW_MS, ErrorCode, Header, RemoteProtocolError


class ReplayGuard:
    """Remembers each accepted (signer, seq) until its statement expires, within budgets.

    Once a statement is past exp + skew it is refused as expired anyway, so forgetting it
    then is safe. A full memory never refuses anyone (that would let one stranger with
    long-lived statements silence a node for a day): it forgets the oldest pairs of the
    signers holding the most. Forgetting is safe in kvx because a direct statement is
    only accepted from a connection authenticated as its signer, so only the signer could
    replay it, and a relayed statement is recognised by the advertisement index (§6.2).
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
        self.forgotten = 0  # live pairs forgotten to stay within budget (a metric)
        self._seen: dict[bytes, dict[int, int]] = {}  # signer -> seq -> exp, oldest first
        self._count = 0
        self._expiry: list[tuple[int, bytes, int]] = []  # may hold pairs already forgotten
        self._lock = threading.Lock()  # data streams are admitted from worker threads

    def __len__(self) -> int:
        return self._count

    def signers(self) -> int:
        return len(self._seen)

    def check(self, signer: bytes, header: Header, now_ms: int, *, remember: bool = True) -> None:
        """Accept the statement once, or raise the reason it must be dropped.

        With `remember` False it is checked but not yet remembered: a relayed statement is
        remembered only once the node has taken it (`remember`), so one it dropped (a
        private ad that arrived before its signer's proof, say) can still arrive again.
        """
        if header.iat > now_ms + self.skew_ms:
            raise RemoteProtocolError(
                ErrorCode.NOT_YET_VALID, f"issued {header.iat - now_ms} ms in the future"
            )
        if header.exp + self.skew_ms < now_ms:
            raise RemoteProtocolError(ErrorCode.EXPIRED, f"expired {now_ms - header.exp} ms ago")
        with self._lock:
            self._forget_expired(now_ms)
            seqs = self._seen.get(signer)
            if seqs is not None and header.seq in seqs:
                raise RemoteProtocolError(ErrorCode.REPLAYED, f"sequence {header.seq} already seen")
            if remember:
                self._remember(signer, header)

    def remember(self, signer: bytes, header: Header) -> None:
        """Remember a statement that `check(..., remember=False)` let through."""
        with self._lock:
            if header.seq not in self._seen.get(signer, ()):
                self._remember(signer, header)

    def _remember(self, signer: bytes, header: Header) -> None:
        seqs = self._seen.get(signer)
        if seqs is not None and len(seqs) >= self.max_per_signer:
            self._trim(signer, len(seqs) - self.max_per_signer + 1)
        if self._count >= self.max_total:
            self._make_room()
        self._seen.setdefault(signer, {})[header.seq] = header.exp
        self._count += 1
        heapq.heappush(self._expiry, (header.exp, signer, header.seq))
        if len(self._expiry) > 2 * self._count + 1024:  # drop forgotten pairs from the heap
            self._expiry = [(e, s, q) for s, seqs in self._seen.items() for q, e in seqs.items()]
            heapq.heapify(self._expiry)

    def _forget_expired(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] + self.skew_ms < now_ms:
            exp, signer, seq = heapq.heappop(self._expiry)
            seqs = self._seen.get(signer)
            if seqs is not None and seqs.get(seq) == exp:  # not forgotten already
                del seqs[seq]
                self._count -= 1
                if not seqs:
                    del self._seen[signer]

    def _trim(self, signer: bytes, n: int) -> None:
        """Forget the `n` oldest pairs of one signer."""
        seqs = self._seen[signer]
        for seq in list(islice(seqs, n)):
            del seqs[seq]
        self._count -= n
        self.forgotten += n
        if not seqs:
            del self._seen[signer]

    def _make_room(self) -> None:
        """Free a sixteenth of the memory from the largest holders (water-filling): every
        signer above some level is cut to it, so small honest signers are the last to lose."""
        need = self._count - (self.max_total - max(1, self.max_total // 16))
        for signer, cut in water_fill({s: len(q) for s, q in self._seen.items()}, need).items():
            self._trim(signer, cut)


def water_fill(sizes: dict[bytes, int], need: int) -> dict[bytes, int]:
    """How many to cut from each holder to free `need` (or all they hold): every holder
    above some level is cut to it, so the smallest holders are the last to lose."""
    if need <= 0 or not sizes:
        return {}
    lo, hi = 0, max(sizes.values())  # the highest level that frees enough
    while lo < hi:
        level = (lo + hi + 1) // 2
        if sum(max(0, n - level) for n in sizes.values()) >= need:
            lo = level
        else:
            hi = level - 1
    cuts: dict[bytes, int] = {}
    for holder, n in sorted(sizes.items(), key=lambda item: -item[1]):
        if n > lo and need > 0:
            cuts[holder] = min(n - lo, need)
            need -= cuts[holder]
    return cuts
