"""Traffic steering: one nftables table, replaced atomically with `nft -f`.

What the table guarantees for traffic entering from the tunnel interface:
- source must be inside the tunnel prefixes (cryptokey routing already ensures that a
  peer can only send from its own /32 and /128; this is the second line);
- revoked / suspended / quarantined-by-drop device addresses are dropped by set;
- no device-to-device traffic, no access to the gateway's other services (no address of
  the gateway host is a destination: `fib daddr type local` is dropped before the redirect);
- every TCP connection is redirected to mitmproxy's transparent listener;
- DNS (UDP and TCP 53, to any resolver address) is redirected to mitmproxy's DNS listener;
- QUIC (UDP 443) is rejected so clients fall back to TCP; all other UDP and non-TCP/UDP
  traffic is dropped;
- IPv6 gets the same treatment, or is dropped when no IPv6 prefix is configured;
- nothing is forwarded around the proxy, and the gateway opens no connection to a device.
If the proxy dies, redirected connections find no listener and are refused: they are never
routed around it.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.i18n import Text


class SteeringError(Exception):
    """nftables refused or is missing: the gateway does not start (fail closed). ``text``: the reason in Japanese and English."""

    def __init__(self, message: "str | Text") -> None:
        self.text = message if isinstance(message, Text) else Text(message, message)
        super().__init__(self.text.en)


@dataclass(frozen=True)
class SteeringPlan:
    table: str
    tunnel_interface: str
    uplink_interface: str
    ipv4_prefix: ipaddress.IPv4Network
    gateway_ipv4: ipaddress.IPv4Address
    ipv6_prefix: ipaddress.IPv6Network | None
    gateway_ipv6: ipaddress.IPv6Address | None
    transparent_port: int
    dns_port: int
    blocked: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    # Firewall log (gateway/net/firewalllog.py): NFLOG group of the drop/reject log statements;
    # None renders the table without them.
    log_group: int | None = None
    # issue #22: inspection workers. Worker i listens on transparent_port + i and dns_port + i;
    # a device's traffic goes to the worker its tunnel source address hashes to (below).
    workers: int = 1
    # issue #22: the other WireGuard interfaces of a pool split over several (gateway/devices/
    # shards.py): every name the pool may use, so a shard made later is matched already.
    shard_interfaces: tuple[str, ...] = ()


def interface_match(names: Iterable[str]) -> str:
    """The nft operand matching these interface names: "wg0", or an anonymous set of them."""
    names = list(dict.fromkeys(names))
    return f'"{names[0]}"' if len(names) == 1 else "{ " + ", ".join(f'"{n}"' for n in names) + " }"


def tunnel_match(plan: SteeringPlan) -> str:
    return interface_match((plan.tunnel_interface, *plan.shard_interfaces))


# Kernel-side bound on logged packets, per drop rule (a flood is logged at this rate at most;
# the reader aggregates what arrives into one record per key and interval).
LOG_RATE_PER_SECOND = 200
LOG_BURST_PACKETS = 400


def _logged(match: str, reason: str, group: int | None, rate: int = LOG_RATE_PER_SECOND) -> list[str]:
    """The log statement in front of a drop: a rule of its own with the drop's match, so a
    packet over the log rate limit is still dropped by the next rule (a `limit` in the drop
    rule itself would let it fall through). `counter` counts what was handed to the log."""
    if group is None:
        return []
    match = f"{match} " if match else ""
    return [f'    {match}limit rate {rate}/second burst {LOG_BURST_PACKETS} packets counter '
            f'log prefix "kanmon-fw:{reason} " group {group}']


def _elements(addrs: Iterable[ipaddress._BaseAddress], version: int) -> str:
    items = sorted(str(a) for a in addrs if a.version == version)
    return f"elements = {{ {', '.join(items)} }}" if items else ""


# The hash that spreads devices over workers (issue #22). The same expression steers a device's
# TCP and its DNS, so its flows, DNS bindings and limits stay in one worker. The seed is fixed:
# a device keeps its worker across table replacements and gateway restarts.
HASH_SEED = "0x4b4d"
# What is hashed: the device's *host number*, the bits of its source address under the IPv4
# prefix, taken from the last 32 bits of the address (IPv4: the whole source address at bit 96
# of the network header; IPv6: its last 32 bits at bit 160). The registry gives a device the
# IPv6 address with the same host number as its IPv4 one (gateway/registry: "the IPv6 address
# mirrors the IPv4 host number"), so both families of one device hash the same 4 bytes and land
# in the same worker.
_SADDR_LOW32 = {"ipv4": "@nh,96,32", "ipv6": "@nh,160,32"}


def _worker_port(base: int, plan: SteeringPlan, family: str) -> str:
    """The redirect target: the one port, or the port of the worker the source hashes to.
    A worker that is down leaves its port unbound: its devices' connections are refused,
    never steered to another worker or around the proxy."""
    if plan.workers == 1:
        return str(base)
    host_mask = (1 << (32 - plan.ipv4_prefix.prefixlen)) - 1
    ports = ", ".join(f"{i} : {base + i}" for i in range(plan.workers))
    return (f"jhash {_SADDR_LOW32[family]} & {host_mask:#x} mod {plan.workers} seed {HASH_SEED} "
            f"map {{ {ports} }}")


def _redirects(plan: SteeringPlan) -> list[str]:
    wg, tp, dp = tunnel_match(plan), plan.transparent_port, plan.dns_port
    if plan.workers == 1:   # exactly the table of a single-process gateway
        return [f'    iifname {wg} udp dport 53 redirect to :{dp}',
                f'    iifname {wg} tcp dport 53 redirect to :{dp}',
                f'    iifname {wg} meta l4proto tcp redirect to :{tp}']
    out = []
    for family in ("ipv4", "ipv6"):
        match = f'meta nfproto {family} iifname {wg}'
        out += [f"    {match} udp dport 53 redirect to :{_worker_port(dp, plan, family)}",
                f"    {match} tcp dport 53 redirect to :{_worker_port(dp, plan, family)}",
                f"    {match} meta l4proto tcp redirect to :{_worker_port(tp, plan, family)}"]
    return out


def _listener_ports(plan: SteeringPlan) -> tuple[str, str]:
    """(TCP ports, UDP ports) of the proxy listeners, as nft expressions."""
    tp, dp, n = plan.transparent_port, plan.dns_port, plan.workers
    if n == 1:
        return f"{{ {tp}, {dp} }}", f"{dp}"
    return f"{{ {tp}-{tp + n - 1}, {dp}-{dp + n - 1} }}", f"{{ {dp}-{dp + n - 1} }}"


def render_ruleset(plan: SteeringPlan) -> str:
    """The whole table as `nft -f` input. Creating the table first makes the delete valid
    whether or not a previous table exists, so the replacement is one atomic transaction."""
    wg, up, t = tunnel_match(plan), plan.uplink_interface, plan.table
    tcp_ports, udp_ports = _listener_ports(plan)
    v6 = plan.ipv6_prefix is not None
    lg = plan.log_group
    lines = [
        f"table inet {t} {{}}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        f"  set blocked_v4 {{ type ipv4_addr; {_elements(plan.blocked, 4)} }}",
        f"  set blocked_v6 {{ type ipv6_addr; {_elements(plan.blocked, 6)} }}",
        "",
        "  chain tunnel_ingress {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f'    iifname {wg} jump from_device',
        "  }",
        "",
        "  chain from_device {",
        *_logged("ip saddr @blocked_v4", "blocked-device", lg),
        "    ip saddr @blocked_v4 drop",
        *_logged("ip6 saddr @blocked_v6", "blocked-device", lg),
        "    ip6 saddr @blocked_v6 drop",
        *_logged(f"meta nfproto ipv4 ip saddr != {plan.ipv4_prefix}", "spoofed-source", lg),
        f"    meta nfproto ipv4 ip saddr != {plan.ipv4_prefix} drop",
    ]
    if v6:
        lines += _logged(f"meta nfproto ipv6 ip6 saddr != {plan.ipv6_prefix}", "spoofed-source", lg)
        lines.append(f"    meta nfproto ipv6 ip6 saddr != {plan.ipv6_prefix} drop")
    else:
        lines += _logged("meta nfproto ipv6", "ipv6-disabled", lg)
        lines.append("    meta nfproto ipv6 drop")
    lines += [
        # device -> device (or any tunnel address but the gateway's own) never passes
        *_logged(f"ip daddr {plan.ipv4_prefix} ip daddr != {plan.gateway_ipv4}", "device-to-device", lg),
        f"    ip daddr {plan.ipv4_prefix} ip daddr != {plan.gateway_ipv4} drop",
    ]
    if v6:
        lines += _logged(f"ip6 daddr {plan.ipv6_prefix} ip6 daddr != {plan.gateway_ipv6}", "device-to-device", lg)
        lines.append(f"    ip6 daddr {plan.ipv6_prefix} ip6 daddr != {plan.gateway_ipv6} drop")
    lines += [
        "    udp dport 53 accept",
        "    tcp dport 53 accept",
        f"    meta nfproto ipv4 icmp type echo-request ip daddr {plan.gateway_ipv4} accept",
    ]
    if v6:
        lines.append(f"    meta nfproto ipv6 icmpv6 type echo-request ip6 daddr {plan.gateway_ipv6} accept")
    lines += [
        # The gateway host itself, through any of its addresses (uplink, loopback-routed,
        # another interface): never a destination for a device (issue #14). DNS above is
        # redirected to the gateway's resolver whatever address it was sent to.
        *_logged("fib daddr type local", "gateway-address", lg),
        "    fib daddr type local counter drop",
        "    meta l4proto tcp accept",
        *_logged("udp dport 443", "quic", lg),
        "    udp dport 443 reject with icmpx type port-unreachable",
        *_logged("", "not-tcp", lg),
        "    counter drop",
        "  }",
        "",
        "  chain steer {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        *_redirects(plan),
        "  }",
        "",
        "  chain local_in {",
        "    type filter hook input priority filter; policy accept;",
        # From devices only the proxy listeners (after redirect) and ping answer.
        f'    iifname {wg} tcp dport {tcp_ports} accept',
        f'    iifname {wg} udp dport {udp_ports} accept',
        f'    iifname {wg} meta l4proto {{ icmp, ipv6-icmp }} accept',
        *_logged(f'iifname {wg}', "local-service", lg),
        f'    iifname {wg} counter drop',
        # The proxy listeners are for redirected tunnel traffic only.
        *_logged(f'iifname != {wg} tcp dport {tcp_ports}', "listener-from-outside", lg),
        f'    iifname != {wg} tcp dport {tcp_ports} drop',
        *_logged(f'iifname != {wg} udp dport {udp_ports}', "listener-from-outside", lg),
        f'    iifname != {wg} udp dport {udp_ports} drop',
        "  }",
        "",
        "  chain route_through {",
        "    type filter hook forward priority filter; policy accept;",
        *_logged(f'iifname {wg}', "forward-from-tunnel", lg),
        f'    iifname {wg} counter drop',
        *_logged(f'oifname {wg}', "forward-to-tunnel", lg),
        f'    oifname {wg} counter drop',
        "  }",
        "",
        "  chain local_out {",
        "    type filter hook output priority filter; policy accept;",
        f'    oifname {wg} ip daddr @blocked_v4 drop',
        f'    oifname {wg} ip6 daddr @blocked_v6 drop',
        # Only replies go to devices: the proxy never opens a connection to one.
        f'    oifname {wg} ct state new counter drop',
        "  }",
        "",
        "  chain uplink_nat {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{up}" masquerade',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


T_NO_NFT = Text("nft がありません (apt-get install nftables)", "nft not found (apt-get install nftables)")


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("nft")
    if binary is None:
        raise SteeringError(T_NO_NFT)
    proc = subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, timeout=30)
    return proc


def apply_ruleset(plan: SteeringPlan) -> None:
    proc = _nft(["-f", "-"], render_ruleset(plan))
    if proc.returncode != 0:
        raise SteeringError(Text(f"nft がルールセットを受け付けません: {proc.stderr.strip()}",
                                 f"nft refused the ruleset: {proc.stderr.strip()}"))


def remove_table(table: str) -> bool:
    """Delete the table; False if there was none."""
    proc = _nft(["delete", "table", "inet", table])
    return proc.returncode == 0


def table_exists(table: str) -> bool:
    return _nft(["list", "table", "inet", table]).returncode == 0


def set_blocked(table: str, add: Iterable[ipaddress._BaseAddress] = (), remove: Iterable[ipaddress._BaseAddress] = ()) -> None:
    """Add/remove device addresses in the drop sets, in one nft transaction."""
    cmds = []
    for verb, addrs in (("add", list(add)), ("delete", list(remove))):
        for version in (4, 6):
            items = sorted(str(a) for a in addrs if a.version == version)
            if items:
                cmds.append(f"{verb} element inet {table} blocked_v{version} {{ {', '.join(items)} }}")
    if not cmds:
        return
    proc = _nft(["-f", "-"], "\n".join(cmds) + "\n")
    if proc.returncode != 0:
        raise SteeringError(Text(f"nft のセットを更新できません: {proc.stderr.strip()}", f"nft set update failed: {proc.stderr.strip()}"))
