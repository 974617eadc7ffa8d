"""Per-source-IP token buckets for the enrollment endpoint. No I/O; the clock is passed in.

Each source IP may make `burst` attempts at once and then `rate_per_minute` on average.
The table is bounded (`max_sources`): when full, buckets that have refilled completely
(indistinguishable from a new bucket) are dropped first, then the least recently used —
so a flood of spoofed sources cannot grow memory without bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    def __init__(self, rate_per_minute: float, burst: int, *, max_sources: int = 10_000) -> None:
        if rate_per_minute <= 0 or burst < 1:
            raise ValueError("rate_per_minute must be > 0 and burst >= 1")
        self.rate = rate_per_minute / 60.0      # tokens per second
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, source: str, now: float) -> float:
        """0.0 when the attempt is allowed (a token is taken), else the seconds to wait."""
        bucket = self._buckets.get(source)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def retry_after_header(self, wait: float) -> str:
        return str(max(1, math.ceil(wait)))

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_sources:
            return
        full_after = self.burst / self.rate
        for source in [s for s, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[source]
        while len(self._buckets) >= self.max_sources:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
