"""Tunnel address -> underlay address (gateway/net/underlay.py) and its use by the policy decider:
`underlay_network` conditions see where the device's tunnel comes from right now."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest
from wireguard_tools import WireguardKey

from addons.policy import PolicyDecider, PolicyHolder
from gateway.proxy.connections import LiveConnections
from gateway.policy import compile_text
from gateway.registry.model import DeviceRecord
from gateway.net.underlay import UnderlayAddresses, endpoint_address, underlay_table


@pytest.mark.parametrize("endpoint,expected", [("203.0.113.7:51820", "203.0.113.7"),
                                               ("[2001:db8::7]:51820", "2001:db8::7"),
                                               ("[fe80::1%eth0]:51820", "fe80::1"),
                                               (None, None), ("", None), ("not-an-address:1", None)])
def test_endpoint_address(endpoint, expected):
    got = endpoint_address(endpoint)
    assert (str(got) if got else None) == expected


def test_table_from_peers_names_single_address_allowed_ips_only():
    peers = {
        "a": SimpleNamespace(allowed_ips=("10.77.0.2/32", "fd77:77::2/128"), endpoint="203.0.113.7:40000"),
        "b": SimpleNamespace(allowed_ips=("10.77.0.3/32",), endpoint=None),          # no handshake yet
        "c": SimpleNamespace(allowed_ips=("10.99.0.0/24",), endpoint="198.51.100.9:1"),  # a site, not a device
    }
    table = underlay_table(peers)
    assert {k: str(v) for k, v in table.items()} == {"10.77.0.2": "203.0.113.7", "fd77:77::2": "203.0.113.7"}


def test_replace_reports_roaming_and_lookups_ask_for_a_refresh_on_a_miss():
    misses = []
    under = UnderlayAddresses(on_miss=lambda: misses.append(1))
    assert under("10.77.0.2") is None and misses == [1]
    assert under.replace({"10.77.0.2": ipaddress.ip_address("203.0.113.7")}) == {"10.77.0.2"}
    assert str(under("::ffff:10.77.0.2")) == "203.0.113.7"
    assert under.replace({"10.77.0.2": ipaddress.ip_address("203.0.113.7")}) == set()
    assert under.replace({"10.77.0.2": ipaddress.ip_address("192.0.2.44")}) == {"10.77.0.2"}


def test_policy_decider_judges_with_the_current_underlay_and_keeps_one_context_per_device():
    policy = compile_text(
        "version: 1\nrules:\n"
        "  - {id: approved-lines, action: block, match: {domain: intranet.example.jp},"
        " unless: {underlay_network: 203.0.113.0/24}}\n", {}, filename="p.yaml")
    record = DeviceRecord("phone-1", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.2"))
    under = UnderlayAddresses()
    decider = PolicyDecider(PolicyHolder(policy, "p.yaml"), LiveConnections(), underlay_of=under)
    from gateway.policy import query_for_url
    from gateway.verdict import Stage

    def verdict():
        ctx = decider._context(record, "10.77.0.2")
        return policy.decide(query_for_url("https://intranet.example.jp/", ctx, stage=Stage.REQUEST))

    assert verdict().rule_id == "approved-lines"       # no handshake seen yet: not an approved line
    under.replace({"10.77.0.2": ipaddress.ip_address("203.0.113.7")})
    assert verdict().rule_id is None                   # from the office line
    under.replace({"10.77.0.2": ipaddress.ip_address("192.0.2.44")})
    assert verdict().rule_id == "approved-lines"       # roamed to a hotel
    assert len(decider._contexts) == 1


def test_a_miss_reads_the_peers_at_once_only_while_that_is_cheap():
    now = [100.0]
    reads, asked = [], []
    peers = {"a": SimpleNamespace(allowed_ips=("10.77.0.2/32",), endpoint="203.0.113.7:4000")}

    def read():
        reads.append(now[0])
        now[0] += cost[0]          # the read takes this long
        return peers

    cost = [0.02]                  # a loaded machine: 20 ms is still affordable
    changed = []
    under = UnderlayAddresses(read_peers=read, on_change=changed.append, on_miss=lambda: asked.append(1),
                              clock=lambda: now[0])
    assert str(under("10.77.0.2")) == "203.0.113.7" and len(reads) == 1 and changed == [{"10.77.0.2"}]
    assert under("10.77.0.9") is None and len(reads) == 2 and asked == [1]   # another device's first miss reads too
    assert under("10.77.0.9") is None and len(reads) == 2                    # but not on every query
    now[0] += 1.5
    cost[0] = 0.5                   # a very large interface: this read is slow...
    assert under("10.77.0.9") is None and len(reads) == 3
    now[0] += 1.5
    assert under("10.77.0.9") is None and len(reads) == 3   # ...so later misses only ask the background refresh
    assert len(asked) == 4
