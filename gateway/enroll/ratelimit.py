"""Per-source limits for the enrollment endpoint: token buckets for attempts, and connection
slots per source address. No I/O; the clock is passed in.

Each source IP may make `burst` attempts at once and then `rate_per_minute` on average.
The table is bounded (`max_sources`): when full, buckets that have refilled completely
(indistinguishable from a new bucket) are dropped first, then the least recently used —
so a flood of spoofed sources cannot grow memory without bound.
"""

from __future__ import annotations
from gateway.hostname import canonical_address

import ipaddress
import math
import threading
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


def source_key(ip: str) -> str:
    """The unit a per-source limit counts: an IPv4 address, or the /64 of an IPv6 address
    (one subscriber line usually gets a whole /64: counting single IPv6 addresses would let
    one attacker hold any number of slots). IPv4-mapped IPv6 counts as its IPv4 address;
    anything unparsable counts as itself."""
    addr = canonical_address(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class ConnectionSlots:
    """At most `total` connections at once, at most `per_source` of them from one source
    (`source_key`). Taken at accept, before TLS, and given back when the connection ends: one
    address holding idle connections fills its own share and nothing else. Thread-safe."""

    SOURCE_FULL = "source-limit"
    ALL_FULL = "slots-full"

    def __init__(self, total: int, per_source: int) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("total and per_source must be >= 1")
        self.total = total
        self.per_source = per_source
        self._lock = threading.Lock()
        self._by_source: dict[str, int] = {}
        self._used = 0

    def acquire(self, ip: str) -> str | None:
        """None when a slot was taken for `ip`; else why not (SOURCE_FULL or ALL_FULL)."""
        key = source_key(ip)
        with self._lock:
            held = self._by_source.get(key, 0)
            if held >= self.per_source:
                return self.SOURCE_FULL
            if self._used >= self.total:
                return self.ALL_FULL
            self._by_source[key] = held + 1
            self._used += 1
            return None

    def release(self, ip: str) -> None:
        key = source_key(ip)
        with self._lock:
            held = self._by_source.get(key, 0)
            if held <= 0:
                raise RuntimeError(f"no connection slot held for {ip}")
            if held == 1:
                del self._by_source[key]     # the table holds only sources with live connections
            else:
                self._by_source[key] = held - 1
            self._used -= 1

    def held(self, ip: str | None = None) -> int:
        with self._lock:
            return self._used if ip is None else self._by_source.get(source_key(ip), 0)
