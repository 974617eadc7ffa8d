"""Firewall log, pure part: what the kernel's netfilter log hands us, and the records it becomes.

Every drop and reject of device traffic in the nftables table (gateway/net/steering.py) carries a
`log group N prefix "kanmon-fw:<reason> "` statement, rate limited in the kernel. The kernel
sends each logged packet's first bytes over nfnetlink_log to whoever bound group N; the
reader (gateway/net/firewalllog_reader.py, the I/O edge) receives the datagrams and feeds them
here:

* ``parse_messages`` -- netlink datagram -> ``LoggedPacket`` (reason, addresses, ports,
  protocol); malformed input raises ``FirewallLogError``, never half a packet;
* ``FirewallAggregator`` -- one record per (source, destination, port, protocol, reason) per
  interval, with the packet count, so a flood of dropped packets writes a few lines, not one
  per packet; and a bound on distinct keys per interval (a port scan), beyond which packets
  are counted per (source, reason) only.

Nothing in this module does I/O; the clock is passed in.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.logstore.fields import format_timestamp

PREFIX = "kanmon-fw:"

# Stable reason codes (rule.id is "kanmon:fw-<code>"), one per drop/reject in the table.
REASONS: dict[str, tuple[str, str]] = {
    # code: (verdict action written to the log, explanation)
    "blocked-device": ("packet-dropped", "source is a revoked, suspended or blocked device"),
    "spoofed-source": ("packet-dropped", "source address outside the tunnel prefix"),
    "ipv6-disabled": ("packet-dropped", "IPv6 from a device while no IPv6 prefix is configured"),
    "device-to-device": ("packet-dropped", "destination is another device's tunnel address"),
    "gateway-address": ("packet-dropped", "destination is an address of the gateway host"),
    "quic": ("packet-rejected", "QUIC (UDP 443) rejected so the client falls back to TCP"),
    "not-tcp": ("packet-dropped", "UDP (other than DNS) or another non-TCP protocol"),
    "local-service": ("packet-dropped", "device traffic to a gateway port that is not a proxy listener"),
    "listener-from-outside": ("packet-dropped", "proxy listener port reached from outside the tunnel"),
    "forward-from-tunnel": ("packet-dropped", "device traffic that would be routed around the proxy"),
    "forward-to-tunnel": ("packet-dropped", "traffic routed towards the tunnel around the proxy"),
}

# netlink / nfnetlink_log constants (linux/netlink.h, linux/netfilter/nfnetlink_log.h)
NETLINK_NETFILTER = 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULA_TIMESTAMP, NFULA_PAYLOAD, NFULA_PREFIX = 3, 9, 10
NLM_F_REQUEST, NLM_F_ACK = 1, 4
_NLA_TYPE_MASK = 0x3FFF
COPY_RANGE = 80   # IPv6 header (40) + extension-free transport ports: enough for the log

_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"}


class FirewallLogError(ValueError):
    """A netlink message that is not a well-formed nfnetlink_log packet message."""


@dataclass(frozen=True)
class LoggedPacket:
    reason: str                 # code from REASONS, or "unknown:<prefix>" for a foreign prefix
    source: str
    destination: str
    transport: str              # tcp, udp, icmp, ipv6-icmp, or the protocol number
    source_port: int | None
    destination_port: int | None
    at: datetime | None = None  # kernel timestamp, when the kernel gave one


def _attributes(data: bytes, start: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    pos = start
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4 or pos + length > len(data):
            raise FirewallLogError(f"attribute at offset {pos} has bad length {length}")
        attrs[kind & _NLA_TYPE_MASK] = data[pos + 4:pos + length]
        pos += (length + 3) & ~3
    return attrs


def reason_of(prefix: bytes) -> str:
    text = prefix.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    if text.startswith(PREFIX):
        code = text[len(PREFIX):]
        if code in REASONS:
            return code
    return "unknown:" + text[:40]


def parse_ip_packet(payload: bytes) -> tuple[str, str, str, int | None, int | None]:
    """First bytes of an IPv4/IPv6 packet -> (source, destination, transport, sport, dport).
    Ports only for TCP/UDP/SCTP/UDP-Lite and only when present in the copied bytes."""
    if not payload:
        raise FirewallLogError("empty packet payload")
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            raise FirewallLogError("IPv4 header truncated")
        ihl = (payload[0] & 0x0F) * 4
        if ihl < 20:
            raise FirewallLogError(f"IPv4 header length {ihl} < 20")
        proto = payload[9]
        src, dst = ipaddress.IPv4Address(payload[12:16]), ipaddress.IPv4Address(payload[16:20])
        fragment_offset = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        l4 = ihl if fragment_offset == 0 else None
    elif version == 6:
        if len(payload) < 40:
            raise FirewallLogError("IPv6 header truncated")
        proto = payload[6]
        src, dst = ipaddress.IPv6Address(payload[8:24]), ipaddress.IPv6Address(payload[24:40])
        l4 = 40   # extension headers are not followed: the ports are then left out
    else:
        raise FirewallLogError(f"not an IP packet (version {version})")
    transport = _PROTOCOLS.get(proto, str(proto))
    sport = dport = None
    if l4 is not None and proto in (6, 17, 132, 136) and len(payload) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", payload, l4)
    return str(src), str(dst), transport, sport, dport


def parse_messages(datagram: bytes) -> Iterator[LoggedPacket]:
    """One netlink datagram (possibly several messages: the kernel batches up to the queue
    threshold) -> the logged packets in it. Acks, DONE and other message types are skipped;
    a malformed packet message raises FirewallLogError."""
    pos = 0
    while pos + 16 <= len(datagram):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", datagram, pos)
        if length < 16 or pos + length > len(datagram):
            raise FirewallLogError(f"netlink message at offset {pos} has bad length {length}")
        body = datagram[pos + 16:pos + length]
        pos += (length + 3) & ~3
        if kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", body, 0)[0] if len(body) >= 4 else 0
            if code != 0:
                raise FirewallLogError(f"netlink error {code}")
            continue
        if kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            continue
        if len(body) < 4:
            raise FirewallLogError("nfnetlink_log message without its header")
        attrs = _attributes(body, 4)
        payload = attrs.get(NFULA_PAYLOAD)
        if payload is None:
            raise FirewallLogError("nfnetlink_log packet without payload (copy mode not set?)")
        at = None
        if (stamp := attrs.get(NFULA_TIMESTAMP)) is not None and len(stamp) >= 16:
            sec, usec = struct.unpack_from("!QQ", stamp, 0)
            at = datetime.fromtimestamp(sec + usec / 1e6, UTC)
        src, dst, transport, sport, dport = parse_ip_packet(payload)
        yield LoggedPacket(reason_of(attrs.get(NFULA_PREFIX, b"")), src, dst, transport, sport, dport, at)


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((-length) % 4)


def config_message(group: int, attrs: list[tuple[int, bytes]], seq: int) -> bytes:
    """NFULNL_MSG_CONFIG for `group` with the given attributes, asking for an ack."""
    payload = struct.pack("!BBH", 0, 0, group) + b"".join(_attr(k, v) for k, v in attrs)
    return struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                       NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload


def bind_messages(group: int, queue_threshold: int = 64, flush_centiseconds: int = 10) -> list[bytes]:
    """Bind `group`, copy the first COPY_RANGE bytes of each packet, batch up to
    `queue_threshold` packets or `flush_centiseconds` per datagram."""
    return [
        config_message(group, [(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))], 1),
        config_message(group, [(NFULA_CFG_MODE, struct.pack("!IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0))], 2),
        config_message(group, [(NFULA_CFG_QTHRESH, struct.pack("!I", queue_threshold))], 3),
        config_message(group, [(NFULA_CFG_TIMEOUT, struct.pack("!I", flush_centiseconds))], 4),
    ]


def ack_error(datagram: bytes) -> int | None:
    """The error code of an NLMSG_ERROR reply (0: an ack), None if the datagram is no reply."""
    if len(datagram) >= 20:
        length, kind = struct.unpack_from("=IH", datagram, 0)
        if kind == NLMSG_ERROR:
            return struct.unpack_from("=i", datagram, 16)[0]
    return None


# -- aggregation ---------------------------------------------------------------------------

@dataclass
class _Bucket:
    packets: int
    first: datetime
    last: datetime
    source_port: int | None


Key = tuple[str | None, str | None, int | None, str | None, str]   # source, destination, dport, transport, reason


@dataclass
class FirewallAggregator:
    """Counts logged packets per (source, destination, port, protocol, reason) and turns
    them into one record per key every ``interval`` seconds (``due``/``flush``).

    Records per interval are bounded whatever arrives, so a flood or a scan cannot fill the
    disk: a source keeps at most ``per_source`` destination keys (a port scan, an address
    sweep: further packets are counted under (source, reason) with no destination), all
    sources together at most ``max_keys``; and when even the per-source keys reach
    ``max_keys`` (many sources: traffic from outside to a proxy port), packets are counted per
    reason only. At most 2 x ``max_keys`` + one per reason records per interval.
    ``device_of(source_ip)`` returns (device id, user, groups) or None."""

    device_of: Callable[[str], tuple[str | None, str | None, tuple[str, ...]] | None]
    interval: float = 10.0
    max_keys: int = 256
    per_source: int = 32
    _buckets: dict[Key, _Bucket] = field(default_factory=dict)
    _opened: float | None = None
    _per_source: dict[str, int] = field(default_factory=dict)
    _detailed: int = 0
    _coarse: int = 0
    overflowed: int = 0   # packets counted without their destination

    def _key(self, packet: LoggedPacket) -> Key:
        key: Key = (packet.source, packet.destination, packet.destination_port, packet.transport, packet.reason)
        if key in self._buckets:
            return key
        if self._detailed < self.max_keys and self._per_source.get(packet.source, 0) < self.per_source:
            self._detailed += 1
            self._per_source[packet.source] = self._per_source.get(packet.source, 0) + 1
            return key
        self.overflowed += 1
        key = (packet.source, None, None, None, packet.reason)
        if key in self._buckets:
            return key
        if self._coarse < self.max_keys:
            self._coarse += 1
            return key
        return (None, None, None, None, packet.reason)

    def add(self, packet: LoggedPacket, now: datetime, monotonic: float) -> None:
        if self._opened is None:
            self._opened = monotonic
        at = packet.at or now
        key = self._key(packet)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = _Bucket(1, at, at, packet.source_port)
        else:
            bucket.packets += 1
            bucket.first, bucket.last = min(bucket.first, at), max(bucket.last, at)

    def due(self, monotonic: float) -> bool:
        return self._opened is not None and monotonic - self._opened >= self.interval

    def pending(self) -> int:
        return sum(b.packets for b in self._buckets.values())

    def flush(self) -> list[dict[str, Any]]:
        """The interval's records (conn stream), oldest first; starts a new interval."""
        buckets, self._buckets, self._opened = self._buckets, {}, None
        self._per_source, self._detailed, self._coarse = {}, 0, 0
        records = [self._record(key, bucket) for key, bucket in buckets.items()]
        records.sort(key=lambda r: r["@timestamp"])
        return records

    def _record(self, key: Key, bucket: _Bucket) -> dict[str, Any]:
        source, destination, dport, transport, reason = key
        action, explanation = REASONS.get(reason, ("packet-dropped", "dropped by a rule of the gateway's table"))
        device = self.device_of(source) if source is not None else None
        record: dict[str, Any] = {
            "@timestamp": format_timestamp(bucket.first),
            "event.dataset": "kanmon.firewall",
            "event.action": action,
            "event.type": ["denied"],
            "event.start": format_timestamp(bucket.first),
            "event.end": format_timestamp(bucket.last),
            "kanmon.verdict": "block",
            "kanmon.stage": "firewall",
            "rule.id": f"kanmon:fw-{reason}",
            "event.reason": explanation,
            "kanmon.firewall.reason": reason,
            "kanmon.firewall.packets": bucket.packets,
            "device.id": device[0] if device else None,
            "user.name": device[1] if device else None,
            "source.ip": source,
            "destination.ip": destination,
            "destination.port": dport,
            "network.transport": transport,
        }
        if device and device[2]:
            record["device.groups"] = sorted(device[2])
        if bucket.packets == 1 and bucket.source_port is not None:
            record["source.port"] = bucket.source_port
        if destination is None:   # over the key bounds: destinations (and sources) not kept
            record["kanmon.firewall.aggregated"] = "per-source" if source is not None else "all-sources"
        return record
