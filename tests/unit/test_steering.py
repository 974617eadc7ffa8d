"""The nftables table: what it says, and that nft accepts it."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

import pytest

from gateway.net.steering import SteeringPlan, render_ruleset
from tests.availability import unavailable


def plan(v6: bool = True, blocked=()) -> SteeringPlan:
    return SteeringPlan(
        table="kanmon_t", tunnel_interface="kmwg0", uplink_interface="eth0",
        ipv4_prefix=ipaddress.ip_network("10.77.0.0/24"), gateway_ipv4=ipaddress.ip_address("10.77.0.1"),
        ipv6_prefix=ipaddress.ip_network("fd77:77::/64") if v6 else None,
        gateway_ipv6=ipaddress.ip_address("fd77:77::1") if v6 else None,
        transparent_port=8080, dns_port=8053, blocked=tuple(ipaddress.ip_address(b) for b in blocked))


def test_ruleset_replaces_table_atomically_and_steers_everything():
    text = render_ruleset(plan(blocked=["10.77.0.9", "fd77:77::9"]))
    lines = [l.strip() for l in text.splitlines()]
    assert lines[:3] == ["table inet kanmon_t {}", "delete table inet kanmon_t", "table inet kanmon_t {"]
    assert "set blocked_v4 { type ipv4_addr; elements = { 10.77.0.9 } }" in lines
    assert "set blocked_v6 { type ipv6_addr; elements = { fd77:77::9 } }" in lines
    dns = lines.index('iifname "kmwg0" udp dport 53 redirect to :8053')
    tcp = lines.index('iifname "kmwg0" meta l4proto tcp redirect to :8080')
    assert dns < tcp, "DNS over TCP must be matched before the catch-all TCP redirect"
    assert "udp dport 443 reject with icmpx type port-unreachable" in lines
    assert "ip daddr 10.77.0.0/24 ip daddr != 10.77.0.1 drop" in lines
    assert "ip6 daddr fd77:77::/64 ip6 daddr != fd77:77::1 drop" in lines
    assert 'oifname "kmwg0" ct state new counter drop' in lines
    assert 'iifname "kmwg0" counter drop' in lines  # nothing is forwarded around the proxy
    # every accept in from_device is followed by the final drop
    body = lines[lines.index("chain from_device {"):]
    assert body[body.index("}") - 1] == "counter drop"


def test_without_ipv6_prefix_ipv6_from_devices_is_dropped():
    lines = [l.strip() for l in render_ruleset(plan(v6=False)).splitlines()]
    assert "meta nfproto ipv6 drop" in lines
    assert not any(l.startswith("ip6 daddr") for l in lines)


@pytest.mark.parametrize("v6", [True, False])
def test_nft_accepts_the_ruleset(v6):
    if shutil.which("nft") is None or os.geteuid() != 0:
        unavailable("needs nft and root")
    result = subprocess.run(["nft", "-c", "-f", "-"], input=render_ruleset(plan(v6=v6, blocked=["10.77.0.9"])),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
