"""Token buckets per key: what each connection may send us, and what we send each peer.

Both are flow control, never blame (spec §12.6): a frame over a receive bucket is dropped
and counted, a relayable statement over a send bucket is not sent (anti-entropy carries
it later), and nobody is scored for volume.

Identities cost nothing, so the buckets must not outlive their use: a bucket that has
refilled to its burst is the same as a new one, and `prune` drops it. What stays is
bounded by the peers active within one refill period.
"""

from __future__ import annotations


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at


class RateLimits:
    """`rate` statements a second per key, up to `burst` at once; times are passed in."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[bytes, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: bytes, now: float, wanted: int = 1) -> int:
        """Take up to `wanted` tokens; how many there were (0 when the bucket is empty)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        granted = min(wanted, int(bucket.tokens))
        bucket.tokens -= granted
        return granted

    def prune(self, now: float) -> None:
        """Forget every bucket that has refilled: it holds nothing a new one would not."""
        full = [
            k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
