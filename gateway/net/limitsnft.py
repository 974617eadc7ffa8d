"""Kernel backstop of the per-device limits (issue #14): one small nftables table of its own
(``inet <steering table>_limits``) that refuses, with a TCP reset, a tunnel address's new TCP
connections beyond twice its configured rate or twice its connection cap, drops its DNS
datagrams beyond twice its DNS rate, and drops a WireGuard endpoint's encrypted packets beyond
`tunnel_packets_per_second` before they reach the tunnel's socket.

Why in the kernel too: refusing a connection in `client_connected` (addons/limits.py) still
costs the proxy an accept, a connection handler and a hook round (about 0.5 ms on the 2-core
lab), so a device opening 2,000+ connections a second kept the one accept queue of the
transparent listener full: every other device's connection waited seconds behind it
(bench/noisy_neighbour.py, `--floods connections`). The kernel drops the flood before it
reaches that queue; likewise a DNS flood before it costs the proxy a datagram read each (a
full socket buffer would drop every device's queries). Its thresholds are twice the proxy's, so normal excess is still refused --
and counted and logged per device -- by the proxy; the kernel only takes the flood. The sets
are per address (IPv4 and IPv6 apart): the exact per-device accounting is the proxy's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence

from gateway.limits import LimitSettings
from gateway.i18n import Text
from gateway.net.steering import T_NO_NFT, SteeringError, interface_match, remove_table

KERNEL_FACTOR = 2   # the kernel's thresholds, as a multiple of the proxy's
# Elements per set: every address the pool can ever hold (gateway/devices/shards.py: at most
# MAX_SHARDS blocks of 65,536). A full dynamic set makes `add @set` fail, and the rule does not
# match: past 65,535 busy devices the kernel backstop stopped applying (issue #22, 100k devices).
# The kernel allocates elements as they are added; the size is only the bound.
SET_SIZE = 1 << 24
# The table's named counters -> the `limit` label they are counted under in
# kanmon_device_limited_total (the kernel's bites, all devices together: nft keeps no per-device count).
KERNEL_LIMITS = {"refused_rate": "kernel-connection-rate", "refused_held": "kernel-connections",
                 "dropped_dns": "kernel-dns-rate", "dropped_tunnel": "kernel-tunnel-packets"}


def table_name(steering_table: str) -> str:
    return f"{steering_table}_limits"


def render_limits_table(table: str, tunnel_interface: "str | Sequence[str]", settings: LimitSettings,
                        tunnel_port: int = 51820, tunnel_ports: int = 1) -> str:
    """The whole table as `nft -f` input (replaced atomically, like the steering table).
    issue #22: a pool split over several WireGuard interfaces (gateway/devices/shards.py) passes
    all their names and `tunnel_ports` consecutive ports from `tunnel_port`."""
    names = [tunnel_interface] if isinstance(tunnel_interface, str) else list(tunnel_interface)
    tunnel_if = interface_match(names)
    port = str(tunnel_port) if tunnel_ports == 1 else f"{tunnel_port}-{tunnel_port + tunnel_ports - 1}"
    packets = settings.tunnel_packets_per_second
    rate = max(1, int(settings.new_connections_per_second * KERNEL_FACTOR))
    burst = settings.new_connections_burst * KERNEL_FACTOR
    held = settings.connections_per_device * KERNEL_FACTOR
    dns_rate = max(1, int(settings.dns_queries_per_second * KERNEL_FACTOR))
    dns_burst = settings.dns_burst * KERNEL_FACTOR
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    for v in ("4", "6"):
        lines += [
            f"  set rate_v{v} {{ type ipv{v}_addr; size {SET_SIZE}; flags dynamic,timeout; timeout 5m; }}",
            f"  set held_v{v} {{ type ipv{v}_addr; size {SET_SIZE}; flags dynamic; }}",
            f"  set dns_v{v} {{ type ipv{v}_addr; size {SET_SIZE}; flags dynamic,timeout; timeout 5m; }}",
            f"  set tunnel_v{v} {{ type ipv{v}_addr . inet_service; size {SET_SIZE}; flags dynamic,timeout; timeout 5m; }}",
        ]
    lines += [
        "  counter refused_rate {}",
        "  counter refused_held {}",
        "  counter dropped_dns {}",
        "  counter dropped_tunnel {}",
        "",
        "  chain new_connections {",
        # before the steering table's local_in (priority filter): the proxy's listeners
        "    type filter hook input priority filter - 1; policy accept;",
        # Encrypted packets per WireGuard endpoint, before the tunnel's one socket queues them.
        f"    udp dport {port} meta nfproto ipv4 add @tunnel_v4 {{ ip saddr . udp sport limit rate over"
        f" {packets}/second burst {packets} packets }} counter name dropped_tunnel drop",
        f"    udp dport {port} meta nfproto ipv6 add @tunnel_v6 {{ ip6 saddr . udp sport limit rate over"
        f" {packets}/second burst {packets} packets }} counter name dropped_tunnel drop",
        f'    iifname != {tunnel_if} return',
        # Only DNS reaches the gateway over UDP from the tunnel (the steering table drops the rest).
        f"    meta l4proto udp meta nfproto ipv4 add @dns_v4 {{ ip saddr limit rate over {dns_rate}/second"
        f" burst {dns_burst} packets }} counter name dropped_dns drop",
        f"    meta l4proto udp meta nfproto ipv6 add @dns_v6 {{ ip6 saddr limit rate over {dns_rate}/second"
        f" burst {dns_burst} packets }} counter name dropped_dns drop",
        "    meta l4proto != tcp return",
        "    ct state != new return",
        f"    meta nfproto ipv4 add @rate_v4 {{ ip saddr limit rate over {rate}/second burst {burst} packets }}"
        " counter name refused_rate reject with tcp reset",
        f"    meta nfproto ipv6 add @rate_v6 {{ ip6 saddr limit rate over {rate}/second burst {burst} packets }}"
        " counter name refused_rate reject with tcp reset",
        f"    meta nfproto ipv4 add @held_v4 {{ ip saddr ct count over {held} }} counter name refused_held"
        " reject with tcp reset",
        f"    meta nfproto ipv6 add @held_v6 {{ ip6 saddr ct count over {held} }} counter name refused_held"
        " reject with tcp reset",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def apply(steering_table: str, tunnel_interface: "str | Sequence[str]", settings: LimitSettings,
          tunnel_port: int = 51820, tunnel_ports: int = 1) -> None:
    binary = shutil.which("nft")
    if binary is None:
        raise SteeringError(T_NO_NFT)
    proc = subprocess.run([binary, "-f", "-"], input=render_limits_table(table_name(steering_table),
                                                                          tunnel_interface, settings, tunnel_port,
                                                                          tunnel_ports),
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise SteeringError(Text(f"nft が上限のテーブルを受け付けません: {proc.stderr.strip()}",
                                 f"nft refused the limits table: {proc.stderr.strip()}"))


def remove(steering_table: str) -> bool:
    return remove_table(table_name(steering_table))


def parse_counters(nft_json: str) -> dict[str, int]:
    """Packets per named counter from `nft -j list counters table inet ...` output."""
    out = {}
    for item in json.loads(nft_json).get("nftables", []):
        counter = item.get("counter")
        if counter is not None and counter.get("name") in KERNEL_LIMITS:
            out[counter["name"]] = int(counter.get("packets", 0))
    return out


def read_counters(table: str) -> dict[str, int]:
    """The backstop's counters now (blocking: run it off the event loop); {} if unreadable."""
    binary = shutil.which("nft")
    if binary is None:
        return {}
    proc = subprocess.run([binary, "-j", "list", "counters", "table", "inet", table],
                          capture_output=True, text=True, timeout=10)
    return parse_counters(proc.stdout) if proc.returncode == 0 else {}
