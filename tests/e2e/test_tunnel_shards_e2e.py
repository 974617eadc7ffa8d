"""Issue #22: a pool split over WireGuard interfaces. With `tunnel.peers_per_interface: 4` (a
test-only block size: the product default is 65,536, wireguard-go's peer limit) the lab's three
devices are 10.77.0.2 and .3 (shard 0, the configured interface and port) and .4 (shard 1, a
second interface on the next port). The device on shard 1 connects on the port its exported
configuration names, is judged by the proxy over IPv4 and IPv6, cannot reach the proxy's port directly nor send
with another device's address, and is cut when revoked; the
device on shard 0 is untouched throughout."""

from __future__ import annotations

import re
import time

import pytest

from gateway.lab.topology import GATEWAY_TUNNEL4, UNDERLAY_GW, WEB4, WEB6, WG_PORT, Lab, wait_until

pytestmark = pytest.mark.e2e


def http_code(result) -> str:
    return result.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()


def exported_endpoint(lab: Lab, device_id: str) -> str:
    out = lab.kanmon("device", "export-config", device_id, "--config", str(lab.config_path)).stdout
    return re.search(r"^Endpoint = (\S+)$", out, re.M).group(1)


def peers_on(lab: Lab, ifname: str) -> set[str]:
    return set(lab.gw.run("wg", "show", ifname, "peers", check=False).stdout.split())


def test_devices_on_two_interfaces_are_served_judged_and_cut(make_lab):
    lab = make_lab(n_devices=3, overrides={"tunnel": {"peers_per_interface": 4}}, start=False)
    lab.start_gateway()
    low, _, high = lab.devices
    assert (low.ipv4, high.ipv4) == ("10.77.0.2", "10.77.0.4")
    shard1 = f"{lab.wg_interface}-1"
    # Interfaces only for blocks in use: shard 1 exists, shard 2 (no device) does not.
    assert lab.gw.run("ip", "link", "show", shard1, check=False).returncode == 0
    assert lab.gw.run("ip", "link", "show", f"{lab.wg_interface}-2", check=False).returncode != 0
    wait_until(lambda: high.public_key in peers_on(lab, shard1), 15, "the shard-1 peer")
    assert high.public_key not in peers_on(lab, lab.wg_interface) and low.public_key in peers_on(lab, lab.wg_interface)
    # Another process (the console's live view) reads the peers of every interface of the pool.
    read = lab.gw.python("from gateway.config import load_config; from gateway.net.tunnelshards import ShardedTunnel; "
                         f"print(sorted(ShardedTunnel.existing(load_config({str(lab.config_path)!r}).tunnel_shards).peers()))")
    assert high.public_key in read.stdout and low.public_key in read.stdout
    # The exported configuration names each device's port; the lab's devices use it.
    assert exported_endpoint(lab, low.device_id) == f"{UNDERLAY_GW}:{WG_PORT}"
    assert exported_endpoint(lab, high.device_id) == f"{UNDERLAY_GW}:{WG_PORT + 1}"
    for dev in lab.devices:
        dev.ns.run("wg", "set", dev.wg_interface, "peer", lab.gateway_public_key, "endpoint",
                   exported_endpoint(lab, dev.device_id))

    marker = str(time.monotonic_ns())
    ok = high.curl(f"http://www.example.test/shard-{marker}")
    assert http_code(ok) == "200" and "hello from www.example.test" in ok.stdout, ok.stderr
    blocked = high.curl(f"http://blocked.test/shard-{marker}")
    assert http_code(blocked) == "403"
    v6 = high.curl(f"http://[{WEB6}]/shard6-{marker}", "-H", "Host: www.example.test")
    assert http_code(v6) == "200", v6.stderr
    records = [r for r in lab.log_records("proxy") if marker in (r.get("url.full") or "")]
    assert {(r["device.id"], r["kanmon.verdict"]) for r in records} == {(high.device_id, "allow"),
                                                                        (high.device_id, "block")}
    assert {r["source.ip"] for r in records} == {high.ipv4, high.ipv6}

    # Attacks from the shard-1 device. The proxy's own port on the gateway is not reachable
    # from the second interface either (steering drops gateway addresses there too).
    direct = high.ns.run("curl", "-sS", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}",
                         "-H", "Host: www.example.test", f"http://{GATEWAY_TUNNEL4}:8080/direct-{marker}", check=False)
    assert direct.stdout.strip() == "000", direct
    # A packet with the shard-0 device's address as its source: shard 1's wireguard-go accepts
    # from this peer only its own /32 (AllowedIPs), so it never reaches the proxy or the server.
    high.ns.run("ip", "addr", "add", f"{low.ipv4}/32", "dev", high.wg_interface)
    spoof = high.ns.run("curl", "-sS", "--max-time", "2", "--interface", low.ipv4, "-o", "/dev/null",
                        "-H", "Host: www.example.test", f"http://{WEB4}/spoof-{marker}", check=False)
    assert spoof.returncode != 0, spoof
    high.ns.run("ip", "addr", "del", f"{low.ipv4}/32", "dev", high.wg_interface)
    reached = lab.nginx_requests()
    assert [r for r in reached if f"/shard-{marker}" in str(r)], "the allowed request is in the server's log"
    assert not [r for r in reached if f"direct-{marker}" in str(r) or f"spoof-{marker}" in str(r)], reached
    assert not [r for r in lab.log_records("proxy") if f"spoof-{marker}" in (r.get("url.full") or "")]
    out = lab.kanmon("device", "revoke", high.device_id, "--reason", "lost", "--config", str(lab.config_path))
    assert "did not confirm" not in out.stderr, out.stderr
    assert high.public_key not in peers_on(lab, shard1)
    blocked_set = lab.gw.run("nft", "list", "set", "inet", "kanmon_lab", "blocked_v4").stdout
    assert high.ipv4 in blocked_set
    cut = high.curl(f"http://www.example.test/after-{marker}", timeout=3)
    assert http_code(cut) != "200"
    still = low.curl(f"http://www.example.test/low-{marker}")
    assert http_code(still) == "200", still.stderr
    assert not [r for r in lab.log_records("proxy") if f"after-{marker}" in (r.get("url.full") or "")]
