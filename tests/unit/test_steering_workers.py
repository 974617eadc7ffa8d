"""issue #22: the table with several inspection workers -- devices spread by a hash of their
tunnel source address, DNS and TCP of one device to the same worker, nft accepts it."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from gateway.net.steering import HASH_SEED, render_ruleset
from tests.availability import unavailable
from tests.unit.test_steering import plan


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_the_hash_takes_the_host_bits_of_the_ipv4_prefix():
    wide = dataclasses.replace(plan(), workers=2, ipv4_prefix=ipaddress.ip_network("10.64.0.0/12"))
    assert "jhash @nh,96,32 & 0xfffff mod 2" in render_ruleset(wide)
    assert "jhash @nh,160,32 & 0xfffff mod 2" in render_ruleset(wide)


def test_one_worker_renders_the_single_process_table():
    assert render_ruleset(dataclasses.replace(plan(), workers=1)) == render_ruleset(plan())


def test_three_workers_hash_the_source_to_one_port_per_worker():
    lines = lines_of(render_ruleset(dataclasses.replace(plan(), workers=3)))
    tcp_map = "map { 0 : 8080, 1 : 8081, 2 : 8082 }"
    dns_map = "map { 0 : 8053, 1 : 8054, 2 : 8055 }"
    for family, low32 in (("ipv4", "@nh,96,32"), ("ipv6", "@nh,160,32")):
        head = f'meta nfproto {family} iifname "kmwg0"'
        hashed = f"jhash {low32} & 0xff mod 3 seed {HASH_SEED}"   # the host number under the /24
        udp = lines.index(f"{head} udp dport 53 redirect to :{hashed} {dns_map}")
        tcp53 = lines.index(f"{head} tcp dport 53 redirect to :{hashed} {dns_map}")
        tcp = lines.index(f"{head} meta l4proto tcp redirect to :{hashed} {tcp_map}")
        assert udp < tcp and tcp53 < tcp, "DNS over TCP must be matched before the catch-all TCP redirect"
    # the same hash expression everywhere: a device's DNS and TCP land in the same worker
    assert len({m for line in lines for m in re.findall(r"jhash @nh,\d+,32 & 0xff mod 3 seed \S+", line)}) == 2
    # no redirect goes to a fixed port any more (every TCP connection is spread by the hash)
    assert not any(re.search(r"redirect to :\d+$", line) for line in lines)
    # every worker's ports admitted from the tunnel only; the rest of the gateway stays closed
    assert 'iifname "kmwg0" tcp dport { 8080-8082, 8053-8055 } accept' in lines
    assert 'iifname "kmwg0" udp dport { 8053-8055 } accept' in lines
    assert 'iifname != "kmwg0" tcp dport { 8080-8082, 8053-8055 } drop' in lines
    assert 'iifname != "kmwg0" udp dport { 8053-8055 } drop' in lines
    # a device can never address a worker's port itself: gateway addresses are dropped before the redirect
    assert "fib daddr type local counter drop" in lines


@pytest.mark.parametrize("v6", [True, False])
def test_nft_accepts_the_worker_table(v6):
    if shutil.which("nft") is None or os.geteuid() != 0:
        unavailable("needs nft and root")
    text = render_ruleset(dataclasses.replace(plan(v6=v6, blocked=["10.77.0.9"]), workers=4))
    result = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
