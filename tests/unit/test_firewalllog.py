"""Firewall log (gateway/net/firewalllog.py): nfnetlink_log messages -> logged packets, the
aggregation that keeps a flood to a few records, and the log statements in the table
(gateway/net/steering.py)."""

from __future__ import annotations

import ipaddress
import struct
from datetime import UTC, datetime, timedelta

import pytest

from gateway.net import steering
from gateway.net.firewalllog import (NFULA_PAYLOAD, NFULA_PREFIX, NFULA_TIMESTAMP, REASONS, FirewallAggregator, FirewallLogError, LoggedPacket, ack_error, bind_messages, parse_ip_packet, parse_messages, reason_of)

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((-length) % 4)


def _nflog(payload: bytes, prefix: str | None, group: int = 7, stamp: float | None = None, family: int = 2) -> bytes:
    """One NFULNL_MSG_PACKET message laid out as linux/netfilter/nfnetlink_log.h says."""
    body = struct.pack("!BBH", family, 0, group)
    body += _attr(1, struct.pack("!HBB", 0x0800, 0, 0))                  # NFULA_PACKET_HDR
    if prefix is not None:
        body += _attr(NFULA_PREFIX, prefix.encode() + b"\0")
    if stamp is not None:
        body += _attr(NFULA_TIMESTAMP, struct.pack("!QQ", int(stamp), int(round((stamp % 1) * 1e6))))
    body += _attr(NFULA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body


def _ipv4(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, frag, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + struct.pack("!HHHH", sport, dport, 8, 0)


def _ipv6(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0) -> bytes:
    header = struct.pack("!IHBB16s16s", 0x60000000, 8, proto, 64,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return header + struct.pack("!HHHH", sport, dport, 8, 0)


def test_quic_packet_parsed_with_reason_ports_and_kernel_time():
    msg = _nflog(_ipv4("10.77.0.2", "192.0.2.10", 17, 40000, 443), "kanmon-fw:quic ", stamp=1_796_000_000.25)
    [packet] = list(parse_messages(msg))
    assert packet == LoggedPacket("quic", "10.77.0.2", "192.0.2.10", "udp", 40000, 443,
                                  datetime.fromtimestamp(1_796_000_000.25, UTC))


def test_several_messages_in_one_datagram_and_done_skipped():
    done = struct.pack("=IHHIIi", 20, 3, 2, 0, 0, 0)
    datagram = (_nflog(_ipv4("10.77.0.2", "10.77.0.3", 6, 1, 22), "kanmon-fw:device-to-device ")
                + _nflog(_ipv6("fd77::2", "2001:db8::1", 17, 5, 123), "kanmon-fw:not-tcp ", family=10) + done)
    packets = list(parse_messages(datagram))
    assert [(p.reason, p.source, p.destination, p.transport, p.destination_port) for p in packets] == [
        ("device-to-device", "10.77.0.2", "10.77.0.3", "tcp", 22),
        ("not-tcp", "fd77::2", "2001:db8::1", "udp", 123)]


def test_icmp_has_no_ports_and_later_fragment_has_no_ports():
    assert parse_ip_packet(_ipv4("10.77.0.2", "192.0.2.1", 1)) == ("10.77.0.2", "192.0.2.1", "icmp", None, None)
    assert parse_ip_packet(_ipv4("10.77.0.2", "192.0.2.1", 17, 1, 2, frag=185))[3:] == (None, None)


def test_foreign_or_missing_prefix_kept_as_unknown():
    assert reason_of(b"kanmon-fw:quic \0") == "quic"
    assert reason_of(b"kanmon-fw:made-up\0") == "unknown:kanmon-fw:made-up"
    assert reason_of(b"") == "unknown:"
    [packet] = list(parse_messages(_nflog(_ipv4("10.77.0.2", "192.0.2.1", 6, 1, 2), None)))
    assert packet.reason == "unknown:"


@pytest.mark.parametrize("datagram", [
    struct.pack("=IHHII", 9, 0x400, 0, 0, 0),                              # length below the header
    struct.pack("=IHHII", 200, 0x400, 0, 0, 0) + b"\0" * 4,                # length beyond the datagram
    struct.pack("=IHHII", 18, 0x400, 0, 0, 0) + b"\0\0",                   # no nfgenmsg
    _nflog(b"", "kanmon-fw:quic ")[:-4] + b"",                              # attribute cut short
    _nflog(b"\x45\0\0", "kanmon-fw:quic "),                                 # IPv4 header truncated
    _nflog(b"\x70" + b"\0" * 40, "kanmon-fw:quic "),                        # not IP
    struct.pack("=IHHIIi", 20, 2, 0, 0, 0, -1),                            # netlink error
])
def test_malformed_input_raises_not_half_a_packet(datagram):
    with pytest.raises(FirewallLogError):
        list(parse_messages(datagram))


def test_packet_message_without_payload_raises():
    body = struct.pack("!BBH", 2, 0, 7) + _attr(NFULA_PREFIX, b"kanmon-fw:quic \0")
    msg = struct.pack("=IHHII", 16 + len(body), 0x400, 0, 0, 0) + body
    with pytest.raises(FirewallLogError, match="payload"):
        list(parse_messages(msg))


def test_bind_messages_and_acks():
    messages = bind_messages(7)
    assert len(messages) == 4
    for m in messages:
        length, kind, flags = struct.unpack_from("=IHH", m)
        assert length == len(m) and kind == (4 << 8) | 1 and flags == 1 | 4
        assert struct.unpack_from("!H", m, 18)[0] == 7     # res_id = group, network order
    assert ack_error(struct.pack("=IHHIIi", 36, 2, 0, 1, 0, 0) + b"\0" * 16) == 0
    assert ack_error(struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -16) + b"\0" * 16) == -16
    assert ack_error(_nflog(_ipv4("10.77.0.2", "192.0.2.1", 6, 1, 2), "x")) is None


# -- aggregation ---------------------------------------------------------------------------

DEVICES = {"10.77.0.2": ("dev-a", "alice", ("sales",)), "10.77.0.9": ("dev-revoked", "bob", ())}


def _aggregator(**kw) -> FirewallAggregator:
    return FirewallAggregator(DEVICES.get, **kw)


def _pkt(dst="192.0.2.10", dport=443, reason="quic", src="10.77.0.2", sport=40000, transport="udp"):
    return LoggedPacket(reason, src, dst, transport, sport, dport)


def test_flood_becomes_one_record_with_count_and_time_span():
    agg = _aggregator(interval=10)
    for i in range(10_000):
        agg.add(_pkt(sport=1024 + i % 5000), T0 + timedelta(milliseconds=i), monotonic=100 + i / 1000)
    assert not agg.due(109.9) and agg.due(110.0)
    [record] = agg.flush()
    assert record["kanmon.firewall.packets"] == 10_000
    assert record["device.id"] == "dev-a" and record["user.name"] == "alice" and record["device.groups"] == ["sales"]
    assert record["rule.id"] == "kanmon:fw-quic" and record["event.action"] == "packet-rejected"
    assert record["kanmon.verdict"] == "block" and record["event.type"] == ["denied"]
    assert (record["source.ip"], record["destination.ip"], record["destination.port"],
            record["network.transport"]) == ("10.77.0.2", "192.0.2.10", 443, "udp")
    assert record["event.start"] == "2026-12-05T09:00:00.000000Z"
    assert record["event.end"] == "2026-12-05T09:00:09.999000Z"
    assert "source.port" not in record          # many source ports: none is named
    assert agg.flush() == [] and not agg.due(1e9)


def test_keys_split_by_destination_port_reason_and_device():
    agg = _aggregator()
    agg.add(_pkt(), T0, 0)
    agg.add(_pkt(dport=444, reason="not-tcp"), T0, 0)
    agg.add(_pkt(src="10.77.0.9", reason="blocked-device"), T0 + timedelta(seconds=1), 0)
    agg.add(_pkt(src="10.77.0.50", dst="10.77.0.2", dport=22, reason="device-to-device", transport="tcp"), T0, 0)
    records = agg.flush()
    assert len(records) == 4 and all(r["kanmon.firewall.packets"] == 1 for r in records)
    by_reason = {r["kanmon.firewall.reason"]: r for r in records}
    assert by_reason["blocked-device"]["device.id"] == "dev-revoked"
    assert by_reason["device-to-device"]["device.id"] is None      # unknown address: null, field present
    assert by_reason["quic"]["source.port"] == 40000                # one packet: its port is kept
    assert [r["@timestamp"] for r in records] == sorted(r["@timestamp"] for r in records)


def test_port_scan_beyond_the_per_source_bound_is_counted_per_source():
    agg = _aggregator(per_source=100)
    for port in range(1, 10_001):
        agg.add(_pkt(dport=port, reason="not-tcp"), T0, 0)
    agg.add(_pkt(src="10.77.0.9", dport=1, reason="not-tcp"), T0, 0)   # another device keeps its detail
    records = agg.flush()
    assert len(records) == 102
    overflow = [r for r in records if r.get("kanmon.firewall.aggregated") == "per-source"]
    assert len(overflow) == 1 and overflow[0]["destination.ip"] is None and overflow[0]["device.id"] == "dev-a"
    assert overflow[0]["kanmon.firewall.packets"] == 9_900
    assert sum(r["kanmon.firewall.packets"] for r in records) == 10_001
    assert agg.overflowed == 9_900
    assert any(r["source.ip"] == "10.77.0.9" and r["destination.port"] == 1 for r in records)


def test_many_sources_are_bounded_too():
    """Spoofed sources from outside (a proxy port): records per interval stay bounded."""
    agg = _aggregator(max_keys=50, per_source=5)
    for i in range(20_000):
        src = str(ipaddress.IPv4Address("192.0.2.0") + i)
        agg.add(_pkt(src=src, dst="10.0.0.1", dport=8080, reason="listener-from-outside", transport="tcp"), T0, 0)
    records = agg.flush()
    assert len(records) == 50 + 50 + 1
    [everything] = [r for r in records if r.get("kanmon.firewall.aggregated") == "all-sources"]
    assert everything["source.ip"] is None and everything["device.id"] is None
    assert everything["kanmon.firewall.packets"] == 20_000 - 100
    assert sum(r["kanmon.firewall.packets"] for r in records) == 20_000
    # the bounds are per interval: the next one starts with full detail again
    agg.add(_pkt(), T0, 0)
    [fresh] = agg.flush()
    assert fresh["destination.ip"] == "192.0.2.10"


def test_every_reason_has_an_action_and_explanation():
    for code, (action, text) in REASONS.items():
        assert action in ("packet-dropped", "packet-rejected") and text


# -- the table's log statements -------------------------------------------------------------

def _plan(**kw) -> steering.SteeringPlan:
    base = dict(table="kt", tunnel_interface="wg-k", uplink_interface="up0",
                ipv4_prefix=ipaddress.ip_network("10.77.0.0/24"), gateway_ipv4=ipaddress.ip_address("10.77.0.1"),
                ipv6_prefix=ipaddress.ip_network("fd77::/64"), gateway_ipv6=ipaddress.ip_address("fd77::1"),
                transparent_port=8080, dns_port=5353)
    return steering.SteeringPlan(**{**base, **kw})


def test_every_drop_and_reject_is_preceded_by_its_rate_limited_log_rule():
    lines = steering.render_ruleset(_plan(log_group=7)).splitlines()
    drops = [i for i, line in enumerate(lines)
             if (line.rstrip().endswith(" drop") or " reject" in line) and "local_out" not in "".join(lines[:i])]
    assert len(drops) >= 10
    for i in drops:
        logged = lines[i - 1]
        match = lines[i].strip().removesuffix(" drop").removesuffix("counter").split(" reject")[0].strip()
        assert 'log prefix "kanmon-fw:' in logged and logged.strip().endswith("group 7"), lines[i]
        assert "limit rate" in logged and logged.strip().startswith(match), (logged, lines[i])
        reason = logged.split('"kanmon-fw:')[1].split(" ")[0]
        assert reason in REASONS
    assert steering.render_ruleset(_plan()).count(" log ") == 0   # no group: the table without logs
    assert "fib daddr type local counter drop" in "\n".join(lines)


def test_reader_feeds_counts_and_flushes_without_a_socket():
    """The I/O edge's own logic (gateway/net/firewalllog_reader.py) with a fake store: packets
    counted by reason, unreadable messages counted and skipped, records written at flush."""
    from gateway.net.firewalllog_reader import FirewallLogReader
    from gateway.metrics import GatewayMetrics
    written, metrics = [], GatewayMetrics()
    reader = FirewallLogReader(7, written.append, DEVICES.get, metrics=metrics, interval=10)
    good = _nflog(_ipv4("10.77.0.2", "192.0.2.10", 17, 40000, 443), "kanmon-fw:quic ")
    reader.feed(good * 3, T0, 0.0)
    reader.feed(b"\x01\x00", T0, 0.0)                           # too short: no message, nothing counted
    reader.feed(struct.pack("=IHHII", 200, 0x400, 0, 0, 0), T0, 0.0)   # bad length: a parse error
    assert written == []
    reader.flush()
    [record] = written
    assert record["kanmon.firewall.packets"] == 3 and record["device.id"] == "dev-a"
    value = metrics.registry.get_sample_value
    assert value("kanmon_firewall_log_packets_total", {"reason": "quic"}) == 3
    assert value("kanmon_firewall_log_errors_total", {"kind": "parse"}) == 1
