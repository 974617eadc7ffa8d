"""Per-device resource limits (issue #14: one device cannot stall the rest). The pure part:
the `limits:` settings, token buckets, the per-device tables and the rate-limited report of
limits that bit. No I/O here: the mitmproxy hooks and the HTTP/1 header cap are in
addons/limits.py, the DNS datagram check in gateway/proxy/dnslistener.py.

What one flooding device did before these limits (issue #14): four connections sending
endless headers took the gateway from 171 MB to 1.7 GB RSS (mitmproxy 12.2.3 reads HTTP/1
headers without any bound: "FIXME: protect against header size DoS" in
proxy/layers/http/_http1.py); 27k sockets from one device used 18.9k of 20k descriptors and
closing them stalled every device for 5-8 s; 147k DNS queries in 12 s built a 2.5-minute backlog.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Limit names: the `limit` label of kanmon_device_limited_total and `kanmon.limit.name` in the log.
LIMIT_CONNECTIONS = "connections"                   # concurrent TCP connections of one device
LIMIT_CONNECTION_RATE = "connection-rate"           # new TCP connections per second
LIMIT_DNS_RATE = "dns-rate"                         # DNS queries per second
LIMIT_HEADER_BYTES = "request-header-bytes"         # HTTP/1 request line + header block
LIMIT_HEADER_COUNT = "request-header-count"         # HTTP/1 header fields in one request
LIMIT_RESPONSE_HEADER = "response-header-size"      # a server's HTTP/1 response head (same caps)
LIMIT_CLIENTHELLO = "tls-clienthello-size"          # a TLS ClientHello still incomplete at MAX_CLIENTHELLO_BYTES
LIMIT_NAMES = (LIMIT_CONNECTIONS, LIMIT_CONNECTION_RATE, LIMIT_DNS_RATE, LIMIT_HEADER_BYTES,
               LIMIT_HEADER_COUNT, LIMIT_RESPONSE_HEADER, LIMIT_CLIENTHELLO)

# mitmproxy buffers a ClientHello until it is complete, and its length field allows 16 MiB (re-parsed
# from the start at every read). Real ones are 0.5-2 KiB (8 KiB with every extension and a
# post-quantum key share); a connection whose hello is still incomplete at this size is cut.
MAX_CLIENTHELLO_BYTES = 64 * 1024

RULE_DEVICE_LIMIT = "kanmon:device-limit"


@dataclass(frozen=True)
class LimitSettings:
    """The `limits:` section. Defaults, and why (README "Per-device limits"):

    * ``request_header_bytes`` 32 KiB: request line + all header lines of one HTTP/1 request,
      nginx's default total (large_client_header_buffers 4 x 8 KiB), so whatever works behind
      a stock nginx works here; HTTP/2 is bounded by h2 itself (64 KiB). Buffered per connection
      while reading, so a device holds at most connections x (32 KiB + one 64 KiB read) of
      header buffers: 24 MiB at the default connection cap. Smaller also means a device
      sending endless headers gets cut sooner, and with the connection rate its header
      bytes are bounded (50/s x 32 KiB).
    * ``request_header_count`` 100: Apache's LimitRequestFields default; browsers send 10-30.
    * ``connections_per_device`` 256: Chrome's own cap on sockets per profile is 256; a
      device's apps together stay well below. Bounds one device's descriptors (2 per proxied
      connection) and the work when all of them close at once.
    * ``new_connections_per_second`` 50, burst 200: a cold page load opens tens of
      connections within a second; each new connection costs the proxy a TLS handshake.
    * ``dns_queries_per_second`` 20, burst 100: a page load asks A + AAAA for a few dozen
      names at once (the burst); a busy device averages a few queries a second.
    * ``tunnel_packets_per_second`` 4000: encrypted packets per WireGuard endpoint (outer
      address and port) into the tunnel, kernel-only (gateway/net/limitsnft.py). Every device's
      packets queue in the one UDP socket of the tunnel before they are decrypted and any other
      limit can tell devices apart; a device sending faster than the tunnel decrypts filled it
      and the others' packets were lost with its own (bench/noisy_neighbour.py:
      UdpRcvbufErrors). 4,000 full-size packets a second is about 45 Mbit/s of upload per
      device; a download sends about one packet (an ACK) per two it receives, so downloads
      reach about twice that. Why not more: at 10,000 the neighbour's p99 was 3.56x its idle
      p99 on the 2-core lab (goal 3x), at 4,000 1.41x -- decrypting a flood costs the gateway
      CPU that the other devices wait for. A box with more cores or kernel WireGuard can raise
      it; keep-alive browsing at 850 requests a second is about 3,000 packets a second.
    * ``log_interval_seconds`` 10: a limit that keeps biting writes one log record per device
      and limit per interval, with the count.
    """

    request_header_bytes: int = 32 * 1024
    request_header_count: int = 100
    connections_per_device: int = 256
    new_connections_per_second: float = 50.0
    new_connections_burst: int = 200
    dns_queries_per_second: float = 20.0
    dns_burst: int = 100
    tunnel_packets_per_second: int = 4000
    log_interval_seconds: float = 10.0


LIMITS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "request_header_bytes": {"type": "integer", "minimum": 1024, "maximum": 16 * 1024 * 1024},
        "request_header_count": {"type": "integer", "minimum": 8, "maximum": 10000},
        "connections_per_device": {"type": "integer", "minimum": 1},
        "new_connections_per_second": {"type": "number", "exclusiveMinimum": 0},
        "new_connections_burst": {"type": "integer", "minimum": 1},
        "dns_queries_per_second": {"type": "number", "exclusiveMinimum": 0},
        "dns_burst": {"type": "integer", "minimum": 1},
        "tunnel_packets_per_second": {"type": "integer", "minimum": 100},
        "log_interval_seconds": {"type": "number", "minimum": 1},
    },
}


def limit_settings(section: dict | None) -> LimitSettings:
    """The settings from a schema-checked `limits:` mapping (absent: the defaults)."""
    if not section:
        return LimitSettings()
    return LimitSettings(**{key: section[key] for key in LIMITS_SCHEMA["properties"] if key in section})


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per event."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class DeviceLimiter:
    """Per-device counters and buckets, keyed by device id (a device's IPv4 and IPv6 tunnel
    addresses share one budget). Every operation is O(1); `sweep` drops idle entries so the
    tables hold only devices that are busy now."""

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.open_connections: dict[str, int] = {}
        self._connection_buckets: dict[str, TokenBucket] = {}
        self._dns_buckets: dict[str, TokenBucket] = {}

    def admit_connection(self, key: str) -> str | None:
        """A new TCP connection of device `key`: None when admitted (and counted: call
        `release_connection` when it closes), else the name of the limit that refuses it.
        A connection refused by the cap takes no rate token."""
        s = self.settings
        held = self.open_connections.get(key, 0)
        if held >= s.connections_per_device:
            return LIMIT_CONNECTIONS
        now = self.clock()
        bucket = self._connection_buckets.get(key)
        if bucket is None:
            bucket = self._connection_buckets[key] = TokenBucket(s.new_connections_per_second,
                                                                 s.new_connections_burst, now)
        if not bucket.take(now):
            return LIMIT_CONNECTION_RATE
        self.open_connections[key] = held + 1
        return None

    def release_connection(self, key: str) -> None:
        held = self.open_connections.get(key, 0)
        if held <= 1:
            self.open_connections.pop(key, None)
        else:
            self.open_connections[key] = held - 1

    def admit_dns(self, key: str) -> bool:
        now = self.clock()
        bucket = self._dns_buckets.get(key)
        if bucket is None:
            s = self.settings
            bucket = self._dns_buckets[key] = TokenBucket(s.dns_queries_per_second, s.dns_burst, now)
        return bucket.take(now)

    def sweep(self) -> None:
        """Forget buckets that have refilled (their device is idle): same answers, less memory."""
        now = self.clock()
        for table in (self._connection_buckets, self._dns_buckets):
            for key in [k for k, b in table.items() if b.full(now)]:
                del table[key]

    def __len__(self) -> int:
        return len(self._connection_buckets) + len(self._dns_buckets)


@dataclass
class _Window:
    started: float
    suppressed: int = 0
    context: dict | None = None


# emit(key, limit, count, context): one log record for `count` bites of `limit` by device `key`.
Emit = Callable[[str, str, int, dict], None]


class LimitReporter:
    """Rate-limited report of limits that bit, so a flood cannot flood the log: the first
    bite of a device and limit is reported at once (count 1); later bites within
    ``interval`` seconds are only counted, and `flush` reports them as one record with their
    count once the interval has passed. At most one record per device, limit and interval
    (plus the first), whatever the flood's rate."""

    MAX_WINDOWS = 65536   # devices x limits; a backstop, the windows close every interval

    def __init__(self, emit: Emit, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def hit(self, key: str, limit: str, context: dict) -> None:
        now = self.clock()
        window = self._windows.get((key, limit))
        if window is not None and now - window.started < self.interval:
            window.suppressed += 1
            window.context = context
            return
        if window is not None and window.suppressed:
            self.emit(key, limit, window.suppressed, window.context or context)
            # this bite opens the next window: counted, reported with it
            self._windows[(key, limit)] = _Window(now, 1, context)
            return
        if len(self._windows) >= self.MAX_WINDOWS:
            self.flush(force=True)
        self._windows[(key, limit)] = _Window(now)
        self.emit(key, limit, 1, context)

    def flush(self, force: bool = False) -> None:
        """Report the bites counted in windows that have ended (all windows with ``force``).
        A window with bites starts again (a flood that goes on gets one record per interval);
        a quiet one is forgotten, so the next bite is reported at once."""
        now = self.clock()
        for pair in [p for p, w in self._windows.items() if force or now - w.started >= self.interval]:
            window = self._windows.pop(pair)
            if window.suppressed:
                self.emit(pair[0], pair[1], window.suppressed, window.context or {})
                if not force:
                    self._windows[pair] = _Window(now)

    def __len__(self) -> int:
        return len(self._windows)
