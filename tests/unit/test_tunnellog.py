"""Tunnel log (gateway/net/tunnellog.py): successive WireGuard peer readings -> auth records for
session start, resumption after a gap, roaming, and the reconciler's peer changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.net.tunnel import PeerState
from gateway.net.tunnellog import DeviceInfo, TunnelEvents, peer_change_records, split_endpoint

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
H0 = T0.timestamp()
KEY_A, KEY_X = "A" * 43 + "=", "X" * 43 + "="
DEVICES = {KEY_A: DeviceInfo("dev-a", "alice", "10.77.0.2", ("sales",))}


def _peer(key, endpoint, handshake):
    return PeerState(key, ("10.77.0.2/32",), endpoint, handshake)


def test_first_handshake_starts_a_session_once():
    events = TunnelEvents(DEVICES.get)
    assert events.observe({KEY_A: _peer(KEY_A, None, None)}, T0) == []          # peer, no handshake yet
    [record] = events.observe({KEY_A: _peer(KEY_A, "203.0.113.7:40000", H0 + 5)}, T0 + timedelta(seconds=6))
    assert record["event.action"] == "wireguard-handshake" and record["kanmon.tunnel.event"] == "session-start"
    assert record["event.outcome"] == "success"
    assert (record["device.id"], record["user.name"], record["source.ip"], record["source.port"]) == \
        ("dev-a", "alice", "203.0.113.7", 40000)
    assert record["client.ip"] == "203.0.113.7" and record["kanmon.tunnel.ip"] == "10.77.0.2"
    assert record["@timestamp"] == T0 + timedelta(seconds=5)                    # the handshake's own time
    assert record["kanmon.peer.public_key"] == KEY_A and record["device.groups"] == ["sales"]
    # the same reading again, and the regular re-key two minutes later: nothing new
    assert events.observe({KEY_A: _peer(KEY_A, "203.0.113.7:40000", H0 + 5)}, T0 + timedelta(seconds=7)) == []
    assert events.observe({KEY_A: _peer(KEY_A, "203.0.113.7:40000", H0 + 125)}, T0 + timedelta(seconds=126)) == []


def test_handshake_after_more_than_three_minutes_is_a_resumed_session():
    events = TunnelEvents(DEVICES.get)
    events.observe({KEY_A: _peer(KEY_A, "203.0.113.7:40000", H0)}, T0)
    assert events.observe({KEY_A: _peer(KEY_A, "203.0.113.7:40000", H0 + 180)}, T0) == []   # exactly 3 min: same
    [record] = events.observe({KEY_A: _peer(KEY_A, "203.0.113.7:40000", H0 + 180 + 181)}, T0)
    assert record["kanmon.tunnel.event"] == "resumed" and record["kanmon.tunnel.gap_seconds"] == 181


def test_endpoint_change_is_roaming_with_previous_address():
    events = TunnelEvents(DEVICES.get)
    events.observe({KEY_A: _peer(KEY_A, "203.0.113.7:40000", H0)}, T0)
    later = T0 + timedelta(seconds=30)
    [record] = events.observe({KEY_A: _peer(KEY_A, "198.51.100.20:5000", H0)}, later)
    assert record["event.action"] == "wireguard-endpoint-changed" and record["@timestamp"] == later
    assert (record["source.ip"], record["source.port"]) == ("198.51.100.20", 5000)
    assert (record["kanmon.tunnel.previous_ip"], record["kanmon.tunnel.previous_port"]) == ("203.0.113.7", 40000)
    # roaming with a new handshake after a gap: both events
    records = events.observe({KEY_A: _peer(KEY_A, "192.0.2.1:6000", H0 + 1000)}, later)
    assert [r["event.action"] for r in records] == ["wireguard-handshake", "wireguard-endpoint-changed"]


def test_unknown_key_logged_with_null_device_and_removed_peer_forgotten():
    events = TunnelEvents(DEVICES.get)
    [record] = events.observe({KEY_X: _peer(KEY_X, "[2001:db8::7]:51820", H0)}, T0)
    assert record["device.id"] is None and record["user.name"] is None
    assert (record["source.ip"], record["source.port"]) == ("2001:db8::7", 51820)
    assert events.observe({}, T0) == []
    [again] = events.observe({KEY_X: _peer(KEY_X, "[2001:db8::7]:51820", H0)}, T0)   # re-added: new session
    assert again["kanmon.tunnel.event"] == "session-start"


def test_split_endpoint_bad_input():
    assert split_endpoint(None) == (None, None)
    assert split_endpoint("not-an-address:1") == (None, None)
    assert split_endpoint("203.0.113.7:x") == ("203.0.113.7", None)


def test_peer_change_records():
    a = DEVICES[KEY_A]
    b = DeviceInfo("dev-b", "bob", "10.77.0.3")
    records = peer_change_records([a], [(b, "revoked")], {"dev-a": KEY_A, "dev-b": KEY_X}, T0)
    assert [(r["event.action"], r["device.id"], r["user.name"], r["source.ip"], r["kanmon.peer.public_key"])
            for r in records] == [("wireguard-peer-added", "dev-a", "alice", "10.77.0.2", KEY_A),
                                  ("wireguard-peer-removed", "dev-b", "bob", "10.77.0.3", KEY_X)]
    assert records[1]["event.reason"] == "device no longer admitted (revoked)"
    assert all(r["event.outcome"] == "success" and r["@timestamp"] == T0 for r in records)


def test_peer_endpoints_read_from_the_interface_bracket_ipv6(monkeypatch):
    """An IPv6 outer address must come out as "[addr]:port", or the port is read as part of it."""
    import ipaddress
    from types import SimpleNamespace

    from gateway.net.tunnel import WireGuardInterface
    peers = {KEY_A: SimpleNamespace(endpoint_host=ipaddress.ip_address("2001:db8::7"), endpoint_port=51820,
                                    allowed_ips=["10.77.0.2/32"], last_handshake=H0),
             KEY_X: SimpleNamespace(endpoint_host=ipaddress.ip_address("203.0.113.7"), endpoint_port=40000,
                                    allowed_ips=["10.77.0.3/32"], last_handshake=None)}
    iface = WireGuardInterface("wg-test")
    monkeypatch.setattr(iface, "_read_config", lambda: SimpleNamespace(peers=peers))
    got = iface.peers()
    assert got[KEY_A].endpoint == "[2001:db8::7]:51820" and got[KEY_X].endpoint == "203.0.113.7:40000"
    assert split_endpoint(got[KEY_A].endpoint) == ("2001:db8::7", 51820)
