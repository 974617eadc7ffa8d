"""Monthly review, issue #18 sections (pure): what the firewall dropped (the aggregated
`kanmon.firewall` records of the conn stream) and the WireGuard sessions (`kanmon.tunnel`
records of the auth stream), including devices seen from outer networks not approved for
their group (IPA 技術的対策 3.8.5 管理外のインターネット接続・不審な通信; NISC telework
lines). Records in, summaries out; build_review feeds them."""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from . import recordview as rv
from .model import NONE_KEY, Count, FirewallSummary, OffLineSession, TunnelSummary

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FIREWALL_DATASET = "kanmon.firewall"
TUNNEL_DATASET = "kanmon.tunnel"


def is_firewall(record: dict[str, Any]) -> bool:
    return record.get("event.dataset") == FIREWALL_DATASET


def _top(counter: Counter, n: int | None = None) -> tuple[Count, ...]:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(Count(k, v) for k, v in (items[:n] if n else items))


def _packets(record: dict[str, Any]) -> int:
    value = record.get("kanmon.firewall.packets")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def parse_approved_lines(data: Any) -> dict[str, tuple[Network, ...]]:
    """``{group: [CIDR, ...]}`` (the `--approved-lines` YAML) -> networks per group.
    Raises ValueError naming the group and the bad value."""
    if not isinstance(data, Mapping):
        raise ValueError("expected a mapping of group -> list of networks")
    lines: dict[str, tuple[Network, ...]] = {}
    for group, nets in data.items():
        if not isinstance(group, str) or not group:
            raise ValueError(f"group name {group!r} is not a text")
        if isinstance(nets, str):
            nets = [nets]
        if not isinstance(nets, list) or not nets:
            raise ValueError(f"group {group}: expected a list of networks")
        parsed = []
        for net in nets:
            try:
                parsed.append(ipaddress.ip_network(str(net), strict=False))
            except ValueError:
                raise ValueError(f"group {group}: {net!r} is not a network (e.g. 203.0.113.0/24)") from None
        lines[group] = tuple(parsed)
    return lines


class FirewallTally:
    def __init__(self, top: int):
        self.top = top
        self.records = 0
        self.packets = 0
        self.by_reason: Counter = Counter()
        self.by_source: Counter = Counter()
        self.by_destination: Counter = Counter()
        self.blocked_devices: Counter = Counter()

    def add(self, record: dict[str, Any]) -> None:
        n = _packets(record)
        self.records += 1
        self.packets += n
        reason = rv.text(record, "kanmon.firewall.reason") or NONE_KEY
        self.by_reason[reason] += n
        device = rv.text(record, "device.id")
        self.by_source[device or f"({rv.text(record, 'source.ip') or '?'})"] += n
        if ip := rv.text(record, "destination.ip"):
            port, transport = record.get("destination.port"), rv.text(record, "network.transport")
            self.by_destination[f"{ip}:{port}/{transport}" if port is not None else f"{ip}/{transport}"] += n
        if reason == "blocked-device":
            self.blocked_devices[device or f"({rv.text(record, 'source.ip') or '?'})"] += n

    def result(self) -> FirewallSummary:
        return FirewallSummary(self.records, self.packets, _top(self.by_reason), _top(self.by_source, self.top),
                               _top(self.by_destination, self.top), _top(self.blocked_devices))


class TunnelTally:
    """``approved``: networks per group, or None (not checked). A session (start, resumption,
    roaming) is off-line when the device is in a group that has approved lines and its outer
    address is in none of the approved networks of any of its groups that have them."""

    def __init__(self, approved: Mapping[str, tuple[Network, ...]] | None):
        self.approved = approved
        self.actions: Counter = Counter()
        self.devices: set[str] = set()
        self.outer: dict[str, set[str]] = defaultdict(set)
        self.off: dict[tuple[str, str], list] = {}

    def add(self, record: dict[str, Any], moment: datetime) -> None:
        action = rv.text(record, "event.action") or NONE_KEY
        event = rv.text(record, "kanmon.tunnel.event")
        self.actions[event or action] += 1
        device = rv.text(record, "device.id")
        outer = rv.text(record, "client.ip")
        if device is None or outer is None:
            return
        self.devices.add(device)
        self.outer[device].add(outer)
        if self.approved is None:
            return
        groups = [g for g in rv.groups(record) if g in self.approved]
        if not groups:
            return
        try:
            address = ipaddress.ip_address(outer)
        except ValueError:
            return
        if any(address in net for g in groups for net in self.approved[g]):
            return
        row = self.off.get((device, outer))
        if row is None:
            self.off[(device, outer)] = [rv.text(record, "user.name"), tuple(groups), moment, moment, 1]
        else:
            row[2], row[3], row[4] = min(row[2], moment), max(row[3], moment), row[4] + 1

    def result(self) -> TunnelSummary:
        off = None
        if self.approved is not None:
            off = tuple(sorted((OffLineSession(device, user, groups, outer, first, last, count)
                                for (device, outer), (user, groups, first, last, count) in self.off.items()),
                               key=lambda s: (s.first, s.device_id, s.outer_ip)))
        multi = Counter({d: len(ips) for d, ips in self.outer.items() if len(ips) > 1})
        approved = tuple((g, tuple(str(n) for n in nets)) for g, nets in sorted((self.approved or {}).items()))
        return TunnelSummary(_top(self.actions), len(self.devices), _top(multi), off, approved)
