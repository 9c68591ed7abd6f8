"""Per-connection rate limits: a token bucket for each CURVE key that sends us frames.

Identities cost nothing, so the buckets must not outlive their use: a bucket that has
refilled to its burst is the same as a new one, and `prune` drops it. What stays is
bounded by the peers active within one refill period.
"""

from __future__ import annotations


class _Bucket:
    __slots__ = ("at", "last_scored", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at, self.last_scored = tokens, at, float("-inf")


class RateLimits:
    """`rate` messages a second per key, up to `burst` at once; times are passed in."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[bytes, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: bytes, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def should_score(self, key: bytes, now: float) -> bool:
        """At most once a second a flooding key is scored down, not for every frame."""
        bucket = self._buckets.get(key)
        if bucket is None or now - bucket.last_scored < 1.0:
            return False
        bucket.last_scored = now
        return True

    def prune(self, now: float) -> None:
        """Forget every bucket that has refilled: it holds nothing a new one would not."""
        full = [
            k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
