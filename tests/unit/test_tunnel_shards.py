"""Issue #22, more than 65,536 devices: the pool split over WireGuard interfaces by address
block (gateway/devices/shards.py), the interfaces behind one tunnel object
(gateway/net/tunnelshards.py), and the tables and configs that follow the split."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from gateway.config import load_config_text
from gateway.devices.shards import MAX_PEERS_PER_INTERFACE, MAX_SHARDS, ShardError, ShardLayout, layout_problems
from gateway.limits import LimitSettings
from gateway.net.limitsnft import render_limits_table
from gateway.net.steering import SteeringPlan, render_ruleset
from gateway.net.tunnel import PeerSpec, PeerSyncResult, TunnelError
from gateway.net.tunnelshards import ShardedTunnel
from gateway.yamlsource import SourceErrors
from tests.availability import unavailable
from tests.unit.test_config import VALID
from tests.unit.test_registry import key

P4, P6 = ipaddress.ip_network("10.64.0.0/15"), ipaddress.ip_network("fd77:77::/64")
BIG = ShardLayout("kmwg0", 51820, P4, P6)                       # 131,072 addresses: two shards


def test_shard_is_the_65536_address_block_of_the_ipv4_address_and_v6_follows_the_host_number():
    assert BIG.count == 2 and BIG.interfaces == ("kmwg0", "kmwg0-1")
    assert BIG.shard_of("10.64.0.2") == 0
    assert BIG.shard_of("10.64.255.255") == 0          # last address of the first block
    assert BIG.shard_of("10.65.0.0") == 1              # first address of the second
    assert BIG.shard_of("10.65.255.254") == 1
    # the registry mirrors the IPv4 host number into the IPv6 pool: same shard for both
    for host in (2, 65535, 65536, 70000, 131070):
        v4, v6 = P4[host], P6[host]
        assert BIG.shard_of(v4) == BIG.shard_of(v6) == host // 65536
    assert (BIG.port_of(0), BIG.port_of(1)) == (51820, 51821)
    assert BIG.block_v4(1) == ipaddress.ip_network("10.65.0.0/16")
    assert BIG.block_v6(1) == ipaddress.ip_network("fd77:77::1:0/112")
    for outside in ("10.66.0.1", "192.0.2.1", "fd78::1", str(P6[131072])):
        with pytest.raises(ShardError):
            BIG.shard_of(outside)


def test_shard_does_not_depend_on_how_many_devices_or_shards_exist():
    # a larger pool (a /14 after a re-plan would be a new pool; here: the same /15 and a /14 with the
    # same start) keeps every existing address in its shard and port
    wider = ShardLayout("kmwg0", 51820, ipaddress.ip_network("10.64.0.0/14"), P6)
    for host in (2, 65535, 65536, 131070):
        assert wider.shard_of(P4[host]) == BIG.shard_of(P4[host])
        assert wider.endpoint_for("gw.example.jp:51820", P4[host]) == BIG.endpoint_for("gw.example.jp:51820", P4[host])


def test_a_pool_that_fits_one_interface_keeps_todays_interface_port_and_route():
    small = ShardLayout("kmwg0", 51820, ipaddress.ip_network("10.77.0.0/16"), P6)
    assert small.count == 1 and small.interfaces == ("kmwg0",)
    assert small.block_v4(0) == ipaddress.ip_network("10.77.0.0/16") and small.block_v6(0) == P6
    assert small.endpoint_for("gw.example.jp:51820", "10.77.255.254") == "gw.example.jp:51820"


def test_exported_endpoint_names_the_port_of_the_devices_shard():
    assert BIG.endpoint_for("gw.example.jp:51820", "10.64.3.4") == "gw.example.jp:51820"
    assert BIG.endpoint_for("gw.example.jp:51820", "10.65.3.4") == "gw.example.jp:51821"
    assert BIG.endpoint_for("[2001:db8::1]:4500", "10.65.0.9") == "[2001:db8::1]:4501"
    with pytest.raises(ShardError):
        BIG.endpoint_for("gw.example.jp:65535", "10.65.0.9")


def test_layout_problems_are_bilingual_and_name_the_setting():
    bad = {k: t for k, t in layout_problems(ShardLayout("kmwg0", 51820, P4, P6, size=1000))}
    assert set(bad) == {"peers_per_interface"} and "2 のべき乗" in bad["peers_per_interface"].ja
    too_many = layout_problems(ShardLayout("kmwg0", 1000, ipaddress.ip_network("10.0.0.0/8"), None, size=1024))
    assert [k for k, _ in too_many] == ["ipv4_prefix"] and str(MAX_SHARDS) in too_many[0][1].en
    long_name = dict(layout_problems(ShardLayout("kanmon-tunnel0", 51820, P4, P6)))
    assert "interface" in long_name and "kanmon-tunnel0-1" in long_name["interface"].en
    assert "listen_port" in dict(layout_problems(ShardLayout("kmwg0", 65535, P4, P6)))
    assert "endpoint" in dict(layout_problems(BIG, endpoint="gw.example.jp:65535"))
    assert layout_problems(BIG, endpoint="gw.example.jp:51820") == []


def test_config_accepts_a_split_pool_and_refuses_a_bad_block_size():
    text = VALID.replace("ipv4_prefix: 10.77.0.0/24", "ipv4_prefix: 10.77.0.0/24\n  peers_per_interface: 64\n"
                                                      "  endpoint: gw.example.jp:51820")
    cfg = load_config_text(text, "k.yaml")
    assert cfg.tunnel_shards.count == 4 and cfg.tunnel_shards.interfaces[1] == "kmwg0-1"
    assert cfg.device_endpoint(ipaddress.ip_address("10.77.0.70")) == "gw.example.jp:51821"
    assert cfg.device_endpoint(ipaddress.ip_address("10.77.0.7")) == "gw.example.jp:51820"
    assert load_config_text(VALID, "k.yaml").tunnel_shards.count == 1
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text.replace("peers_per_interface: 64", "peers_per_interface: 100"), "k.yaml")
    (error,) = exc.value.errors
    assert "peers_per_interface" in str(error) and "power of two" in str(error) and "2 のべき乗" in str(error)


def _plan(**kw) -> SteeringPlan:
    return SteeringPlan(
        table="kanmon_t", tunnel_interface="kmwg0", uplink_interface="eth0", ipv4_prefix=P4,
        gateway_ipv4=P4[1], ipv6_prefix=P6, gateway_ipv6=P6[1], transparent_port=8080, dns_port=8053,
        log_group=7, **kw)


def test_steering_table_matches_every_shard_interface_wherever_it_matched_the_tunnel():
    one, split = render_ruleset(_plan()), render_ruleset(_plan(shard_interfaces=("kmwg0-1",)))
    assert '"kmwg0-1"' not in one
    both = '{ "kmwg0", "kmwg0-1" }'
    # every tunnel match of the single-interface table is the same match on both interfaces
    assert split == one.replace('"kmwg0"', both)
    assert one.count('"kmwg0"') == split.count(both) > 15


def test_limits_table_covers_every_shard_interface_and_port():
    text = render_limits_table("kanmon_t_limits", ("kmwg0", "kmwg0-1"), LimitSettings(), 51820, 2)
    assert 'iifname != { "kmwg0", "kmwg0-1" } return' in text
    assert text.count("udp dport 51820-51821 ") == 2
    assert render_limits_table("t", "kmwg0", LimitSettings()) == render_limits_table("t", ("kmwg0",), LimitSettings())
    # every per-address set can hold every address the pool can ever have: a full dynamic set
    # makes `add @set` fail and its rule not match (the kernel backstop off for the rest)
    sizes = {int(n) for n in re.findall(r"; size (\d+);", text)}
    assert len(sizes) == 1 and sizes.pop() >= MAX_SHARDS * MAX_PEERS_PER_INTERFACE


def test_nft_accepts_the_split_tables():
    if shutil.which("nft") is None or os.geteuid() != 0:
        unavailable("needs nft and root")
    for text in (render_ruleset(_plan(shard_interfaces=("kmwg0-1",), workers=2)),
                 render_limits_table("kanmon_t_limits", ("kmwg0", "kmwg0-1"), LimitSettings(), 51820, 2)):
        proc = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr


# -- the interfaces behind one tunnel object ----------------------------------------------------

class FakeInterface:
    """One shard's interface: its peers, the calls made, and an optional failure."""

    def __init__(self, shard: int):
        self.shard, self.name, self.kind = shard, f"if{shard}", "wireguard-go"
        self.state: dict[str, PeerSpec] = {}
        self.calls: list[tuple] = []
        self.fail: str | None = None

    def peers(self):
        return dict(self.state)

    def sync_peers(self, desired, add=True):
        removed = [k for k in self.state if k not in desired]
        for k in removed:
            del self.state[k]
        if self.fail == "sync":
            raise TunnelError("wireguard-go refused configuration: errno=1")
        added = [k for k in desired if k not in self.state] if add else []
        if add:
            self.state.update(desired)
        self.calls.append(("sync", sorted(desired)))
        return PeerSyncResult(tuple(added), tuple(removed), ())

    def remove_peers(self, keys):
        keys = list(keys)
        for k in keys:
            self.state.pop(k, None)
        self.calls.append(("remove", keys))

    def upsert_peers(self, peers):
        peers = list(peers)
        self.state.update({p.public_key: p for p in peers})
        self.calls.append(("upsert", [p.public_key for p in peers]))


def sharded(layout=BIG):
    made: dict[int, FakeInterface] = {}

    def build(shard):
        made[shard] = FakeInterface(shard)
        return made[shard]
    tunnel = ShardedTunnel(layout, build=build)
    tunnel._make(0)
    return tunnel, made


def spec(host: int) -> PeerSpec:
    return PeerSpec(key(), (f"{P4[host]}/32", f"{P6[host]}/128"))


def test_sync_puts_each_peer_on_its_shard_and_makes_a_shard_only_when_needed():
    tunnel, made = sharded()
    low = [spec(h) for h in (2, 3, 65535)]
    tunnel.sync_peers({p.public_key: p for p in low})
    assert set(made) == {0}, "no device in the second block: no second interface"
    high = [spec(h) for h in (65536, 100000)]
    result = tunnel.sync_peers({p.public_key: p for p in low + high})
    assert set(made) == {0, 1}
    assert set(made[0].state) == {p.public_key for p in low}
    assert set(made[1].state) == {p.public_key for p in high}
    assert set(result.added) == {p.public_key for p in high}
    assert set(tunnel.peers()) == {p.public_key for p in low + high}
    # every peer of a shard that has none desired any more is removed from it
    result = tunnel.sync_peers({p.public_key: p for p in low})
    assert made[1].state == {} and set(result.removed) == {p.public_key for p in high}


def test_removal_and_upsert_go_to_the_peers_own_shard_and_a_moved_peer_leaves_the_old_one():
    tunnel, made = sharded()
    a, b = spec(5), spec(70000)
    tunnel.upsert_peers([a, b])
    assert a.public_key in made[0].state and b.public_key in made[1].state
    tunnel.remove_peers([b.public_key])
    assert made[1].calls[-1] == ("remove", [b.public_key]) and not any(c[0] == "remove" for c in made[0].calls)
    moved = PeerSpec(a.public_key, (f"{P4[80000]}/32",))
    tunnel.upsert_peers([moved])
    assert a.public_key not in made[0].state and made[1].state[a.public_key] == moved


def test_a_key_the_tunnel_does_not_know_is_looked_up_before_it_is_removed():
    tunnel, made = sharded()
    stray = spec(70000)
    tunnel._make(1).state[stray.public_key] = stray        # left by an earlier run
    tunnel.remove_peers([stray.public_key])
    assert made[1].state == {} and not any(c[0] == "remove" for c in made[0].calls)


def test_one_failing_shard_does_not_stop_the_others_and_the_failure_is_raised():
    tunnel, made = sharded()
    low, high = spec(4), spec(70000)
    tunnel.sync_peers({p.public_key: p for p in (low, high)})
    made[0].fail = "sync"
    with pytest.raises(TunnelError):
        tunnel.sync_peers({})     # everyone revoked: shard 0 fails half-way
    assert made[1].state == {}, "the healthy shard removed its peers"
    assert made[0].state == {}, "the failing shard still removed before failing (WireGuardInterface order)"


def test_a_peer_without_an_ipv4_address_is_refused():
    tunnel, _ = sharded()
    with pytest.raises(TunnelError):
        tunnel.upsert_peers([PeerSpec(key(), ("fd77:77::9/128",))])
