"""The monthly log review (IPA SME sample regulations 技術的対策 3.8.5 ログのレビュー:
authentication logs at least monthly — 大量の認証失敗; firewall/proxy logs — 管理外の
インターネット接続, 許可なく接続された機器, 不審な通信). Pure aggregation: records in,
ReviewReport out; no I/O (sources.py reads the logs, html.py renders)."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from gateway.i18n import Text
from gateway.metrics import auth_failure_reason

from . import recordview as rv
from .evidence import FirewallTally, Network, TunnelTally, is_firewall
from .model import (NONE_KEY, AuditAction, AuthBurst, Count, DayCount, ExpiringRule, ReviewReport,
                    ReviewThresholds, UnusualDevice)

MONTH_FORMAT = "YYYY-MM"


def parse_month(month: str, zone: tzinfo) -> tuple[datetime, datetime]:
    """``"2026-01"`` -> (first instant of the month, first instant of the next) in ``zone``.
    Raises ValueError for anything else."""
    parts = month.split("-")
    if len(parts) != 2 or len(parts[0]) != 4 or len(parts[1]) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(month)
    year, number = int(parts[0]), int(parts[1])
    if not 1 <= number <= 12 or year < 1970:
        raise ValueError(month)
    start = datetime(year, number, 1, tzinfo=zone)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=zone)
    return start, end


def _top(counter: Counter, n: int | None = None) -> tuple[Count, ...]:
    # Most common first; ties by key so the report is stable.
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(Count(k, v) for k, v in (items[:n] if n else items))


class _Bursts:
    """Sliding-window burst finder over one source's failure times (sorted)."""

    @staticmethod
    def find(times: list[datetime], threshold: int, window: timedelta) -> list[tuple[int, int]]:
        """Index ranges [first, last] of maximal episodes in which every failure belongs to
        some window of length ``window`` holding at least ``threshold`` failures."""
        episodes: list[list[int]] = []
        first = 0
        for last in range(len(times)):
            while times[last] - times[first] > window:
                first += 1
            if last - first + 1 >= threshold:
                if episodes and first <= episodes[-1][1]:
                    episodes[-1][1] = last
                else:
                    episodes.append([first, last])
        return [(a, b) for a, b in episodes]


def find_auth_bursts(failures: Iterable[dict[str, Any]], threshold: int, window: timedelta) -> list[AuthBurst]:
    """Group failures by source (device id, else source address) and find bursts."""
    by_source: dict[tuple[str | None, str | None], list[tuple[datetime, dict[str, Any]]]] = defaultdict(list)
    for record in failures:
        moment = rv.record_time(record)
        if moment is None:
            continue
        device = rv.text(record, "device.id")
        source = rv.text(record, "source.ip") or rv.text(record, "client.ip")
        by_source[(device, None if device else source)].append((moment, record))
    bursts: list[AuthBurst] = []
    for (device, source), items in by_source.items():
        items.sort(key=lambda item: item[0])
        times = [t for t, _ in items]
        for first, last in _Bursts.find(times, threshold, window):
            chunk = [r for _, r in items[first:last + 1]]
            users = sorted({u for r in chunk if (u := rv.text(r, "user.name"))})
            reasons = sorted({auth_failure_reason(r) for r in chunk})   # the codes the dashboard counts
            ips = sorted({x for r in chunk if (x := rv.text(r, "source.ip"))})
            bursts.append(AuthBurst(device, source or (", ".join(ips) or None), tuple(users),
                                    times[first], times[last], last - first + 1, tuple(reasons)))
    bursts.sort(key=lambda b: (b.start, b.device_id or "", b.source_ip or ""))
    return bursts


def find_unusual_devices(records_per_device: Mapping[str, int], destinations_per_device: Mapping[str, set[str]],
                         users_per_device: Mapping[str, set[str]], thresholds: ReviewThresholds) -> list[UnusualDevice]:
    """Devices whose volume or number of distinct destinations stands out from the fleet
    (see ReviewThresholds for the definition)."""
    if not records_per_device:
        return []
    median_records = statistics.median(records_per_device.values())
    median_destinations = statistics.median(len(destinations_per_device.get(d, ())) for d in records_per_device)
    record_bar = max(thresholds.unusual_min_records, thresholds.unusual_factor * median_records)
    destination_bar = max(thresholds.unusual_min_destinations, thresholds.unusual_factor * median_destinations)
    reached_by: Counter = Counter()
    for names in destinations_per_device.values():
        reached_by.update(names)
    unusual: list[UnusualDevice] = []
    for device, count in records_per_device.items():
        names = destinations_per_device.get(device, set())
        reasons: list[Text] = []
        if count >= record_bar:
            reasons.append(Text("通信量が多い: {n} 件（全端末の中央値 {m:g} 件）",
                                "high volume: {n} records (fleet median {m:g})").format(n=count, m=median_records))
        if len(names) >= destination_bar:
            reasons.append(Text("接続先が多い: {n} か所（全端末の中央値 {m:g} か所）",
                                "many destinations: {n} distinct (fleet median {m:g})").format(
                                    n=len(names), m=median_destinations))
        if reasons:
            only = sorted(n for n in names if reached_by[n] == 1)
            unusual.append(UnusualDevice(device, tuple(sorted(users_per_device.get(device, ()))), count, len(names),
                                         tuple(reasons), tuple(only[:10])))
    unusual.sort(key=lambda u: (-u.records, u.device_id))
    return unusual


def audit_action(record: dict[str, Any]) -> AuditAction:
    return AuditAction(rv.record_time(record), rv.text(record, "event.action") or "?", rv.text(record, "device.id"),
                       rv.text(record, "user.name"), rv.text(record, "event.reason"),
                       rv.text(record, "event.outcome"))


def build_review(month: str, start: datetime, end: datetime, zone_name: str,
                 streams: Mapping[str, Iterable[dict[str, Any]]], *, generated_at: datetime,
                 expiring_rules: list[ExpiringRule] | None = None, expiring_days: int = 30,
                 thresholds: ReviewThresholds = ReviewThresholds(),
                 approved_lines: Mapping[str, tuple[Network, ...]] | None = None) -> ReviewReport:
    """Aggregate one month. ``streams`` maps stream name -> its records with
    start <= @timestamp < end (records outside are ignored anyway). Each iterable is
    consumed once, so the caller may stream from disk. Firewall drop records (aggregated,
    counted in packets) get their own section instead of counting as decisions;
    ``approved_lines`` (group -> networks) marks tunnel sessions from other outer networks."""
    zone = start.tzinfo
    records_by_stream: Counter = Counter()
    blocked_by_stream: Counter = Counter()
    by_category: Counter = Counter()
    by_group: Counter = Counter()
    by_day: Counter = Counter()
    domains: Counter = Counter()
    rules: Counter = Counter()
    per_device_records: Counter = Counter()
    per_device_destinations: dict[str, set[str]] = defaultdict(set)
    per_device_users: dict[str, set[str]] = defaultdict(set)
    unknown_sources: Counter = Counter()
    firewall = FirewallTally(thresholds.top)
    tunnel = TunnelTally(approved_lines)

    def in_month(record: dict[str, Any]) -> datetime | None:
        moment = rv.record_time(record)
        if moment is None or not start <= moment < end:
            return None
        return moment

    for stream in rv.DECISION_STREAMS:
        for record in streams.get(stream, ()):
            moment = in_month(record)
            if moment is None:
                continue
            records_by_stream[stream] += 1
            if stream == "conn" and is_firewall(record):
                firewall.add(record)
                continue
            device = rv.text(record, "device.id")
            target = rv.destination(record)
            if stream in rv.TRAFFIC_STREAMS:
                if device is None:
                    unknown_sources[rv.text(record, "source.ip") or NONE_KEY] += 1
                else:
                    per_device_records[device] += 1
                    if target:
                        per_device_destinations[device].add(target)
                    if user := rv.text(record, "user.name"):
                        per_device_users[device].add(user)
            if not rv.is_block(record):
                continue
            blocked_by_stream[stream] += 1
            by_category[rv.text(record, "rule.category") or NONE_KEY] += 1
            for group in rv.groups(record):
                by_group[group] += 1
            by_day[moment.astimezone(zone).date()] += 1
            rules[rv.text(record, "rule.id") or NONE_KEY] += 1
            if target and stream != "mail":
                domains[target] += 1

    failures: list[dict[str, Any]] = []
    auth_total = 0
    failure_reasons: Counter = Counter()
    failure_sources: Counter = Counter()
    for record in streams.get("auth", ()):
        if (moment := in_month(record)) is None:
            continue
        auth_total += 1
        if record.get("event.dataset") == "kanmon.tunnel":
            tunnel.add(record, moment)
        if record.get("event.outcome") != "failure":
            continue
        failures.append(record)
        failure_reasons[auth_failure_reason(record)] += 1    # as kanmon_auth_failures_total{reason}
        who = rv.text(record, "device.id") or rv.text(record, "source.ip") or NONE_KEY
        failure_sources[who] += 1
    records_by_stream["auth"] = auth_total

    device_actions: list[AuditAction] = []
    other_audit: Counter = Counter()
    audit_count = 0
    for record in streams.get("audit", ()):
        if in_month(record) is None:
            continue
        audit_count += 1
        action = rv.text(record, "event.action") or NONE_KEY
        if action in rv.STATUS_ACTIONS:
            device_actions.append(audit_action(record))
        else:
            other_audit[action] += 1
    records_by_stream["audit"] = audit_count
    device_actions.sort(key=lambda a: (a.time is None, a.time or start))

    days = []
    day: date = start.astimezone(zone).date()
    last_day = (end - timedelta(microseconds=1)).astimezone(zone).date()
    while day <= last_day:
        days.append(DayCount(day, by_day.get(day, 0)))
        day += timedelta(days=1)

    window = timedelta(minutes=thresholds.burst_minutes)
    return ReviewReport(
        month=month, timezone=zone_name, start=start, end=end, generated_at=generated_at, thresholds=thresholds,
        records_by_stream=tuple(Count(s, records_by_stream.get(s, 0)) for s in ("proxy", "conn", "dns", "mail", "auth", "audit")),
        blocked_total=sum(blocked_by_stream.values()),
        blocked_by_stream=_top(blocked_by_stream),
        blocked_by_category=_top(by_category),
        blocked_by_group=_top(by_group),
        blocked_by_day=tuple(days),
        top_blocked_domains=_top(domains, thresholds.top),
        top_blocking_rules=_top(rules, thresholds.top),
        auth_total=auth_total,
        auth_failures=len(failures),
        auth_failures_by_reason=_top(failure_reasons),
        auth_failures_by_source=_top(failure_sources, thresholds.top),
        auth_bursts=tuple(find_auth_bursts(failures, thresholds.burst_failures, window)),
        devices_seen=len(per_device_records),
        unusual_devices=tuple(find_unusual_devices(per_device_records, per_device_destinations, per_device_users,
                                                   thresholds)),
        unknown_device_sources=_top(unknown_sources, thresholds.top),
        device_actions=tuple(device_actions),
        device_actions_by_kind=_top(Counter(a.action for a in device_actions)),
        other_audit_by_action=_top(other_audit),
        expiring_rules=tuple(expiring_rules) if expiring_rules is not None else None,
        expiring_days=expiring_days,
        firewall=firewall.result(),
        tunnel=tunnel.result(),
    )


def expiring_rules_from(infos: Iterable[Any], today: date) -> list[ExpiringRule]:
    """RuleInfo objects (gateway.policy.snapshot) -> ExpiringRule rows, soonest first."""
    rows = [ExpiringRule(i.id, i.expires, i.owner, f"{i.filename}:{i.line}", i.expires < today)
            for i in infos if i.expires is not None]
    rows.sort(key=lambda r: (r.expires, r.rule_id))
    return rows
