"""Review and incident aggregation over synthetic records written with the real LogStore
and read back with gateway.logstore.search (through reports.sources)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.logstore import LogStore
from gateway.reports.incident import build_incident
from gateway.reports.model import NONE_KEY, Count, ReviewThresholds
from gateway.reports.review import build_review, find_auth_bursts, parse_month
from gateway.reports.sources import stream_records

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_month(directory: Path) -> None:
    """January 2026 plus a few records either side of it.

    * d1..d5 (group sales / dev), 20 proxy requests each on Jan 3 (allowed, 4 domains each);
    * d6 (group dev): 400 proxy requests to 40 domains on Jan 10 -> unusual on both counts;
    * blocks: 6 webmail blocks by d1 (group sales) on Jan 5, 3 storage blocks by d2 on Jan 20
      at 23:30 UTC (= Jan 21 in Tokyo), 2 DNS blocks of no category by d3 (no group) on Jan 31,
      1 conn block from an unknown device (no device id);
    * auth: 7 failures from d4 within 6 minutes (a burst), 3 failures from 203.0.113.9 an
      hour apart (no burst), 5 successes;
    * audit: d4 quarantined, d6 revoked, a policy reload;
    * outside the month: blocks on Dec 31 and Feb 1 (must not count).
    """
    clock = Clock()
    store = LogStore(directory, clock=clock)

    def put(stream: str, when: datetime, **fields) -> None:
        clock.now = when
        store.append(stream, {"@timestamp": _ts(when), **{k.replace("__", "."): v for k, v in fields.items()}})

    for n in range(1, 6):
        for i in range(20):
            put("proxy", datetime(2026, 1, 3, 8, tzinfo=UTC) + timedelta(minutes=i), **{
                "device.id": f"d{n}", "source.ip": f"10.8.0.{n}", "user.name": f"user{n}",
                "device.groups": ["sales"] if n <= 2 else ["dev"], "kanmon.verdict": "allow", "rule.id": "default",
                "url.full": f"https://site{i % 4}.example.jp/", "url.domain": f"site{i % 4}.example.jp",
                "http.request.method": "GET"})
    for i in range(400):
        put("proxy", datetime(2026, 1, 10, 9, tzinfo=UTC) + timedelta(seconds=i), **{
            "device.id": "d6", "source.ip": "10.8.0.6", "user.name": "user6", "device.groups": ["dev"],
            "kanmon.verdict": "allow", "rule.id": "default", "url.full": f"https://rare{i % 40}.example.net/",
            "url.domain": f"rare{i % 40}.example.net", "http.request.method": "GET"})
    for i in range(6):
        put("proxy", datetime(2026, 1, 5, 12, tzinfo=UTC) + timedelta(minutes=i), **{
            "device.id": "d1", "source.ip": "10.8.0.1", "user.name": "user1", "device.groups": ["sales"],
            "kanmon.verdict": "block", "rule.id": "no-webmail", "rule.category": "webmail",
            "url.full": "https://mail.example.com/", "url.domain": "mail.example.com", "http.request.method": "GET"})
    for i in range(3):
        put("conn", datetime(2026, 1, 20, 23, 30, tzinfo=UTC) + timedelta(seconds=i), **{
            "device.id": "d2", "source.ip": "10.8.0.2", "user.name": "user2", "kanmon.device.group": "sales",
            "kanmon.verdict": "block", "rule.id": "no-storage", "rule.category": "storage",
            "destination.ip": "198.51.100.7", "destination.port": 443, "network.transport": "tcp",
            "tls.client.server_name": "Files.Example.org"})
    for i in range(2):
        put("dns", datetime(2026, 1, 31, 22, tzinfo=UTC) + timedelta(seconds=i), **{
            "device.id": "d3", "source.ip": "10.8.0.3", "user.name": "user3",
            "kanmon.verdict": "block", "rule.id": "dns-deny", "dns.question.name": "bad.example."})
    put("conn", datetime(2026, 1, 7, tzinfo=UTC), **{
        "device.id": None, "source.ip": "10.8.0.99", "kanmon.verdict": "block", "rule.id": "kanmon:unknown-device",
        "network.transport": "tcp"})
    for i in range(7):
        put("auth", datetime(2026, 1, 15, 3, tzinfo=UTC) + timedelta(minutes=i), **{
            "device.id": "d4", "source.ip": "192.0.2.4", "user.name": "user4", "event.action": "enrollment",
            "event.outcome": "failure", "kanmon.auth.reason": "expired",
            "event.reason": "certificate expired at 2026-01-01T00:00:00+00:00"})
    for i in range(3):
        put("auth", datetime(2026, 1, 16, tzinfo=UTC) + timedelta(hours=i), **{
            "device.id": None, "source.ip": "203.0.113.9", "user.name": None, "event.action": "wireguard-handshake",
            "event.outcome": "failure", "event.reason": "unknown-peer"})
    for i in range(5):
        put("auth", datetime(2026, 1, 2, tzinfo=UTC) + timedelta(hours=i), **{
            "device.id": "d1", "source.ip": "192.0.2.1", "user.name": "user1", "event.action": "wireguard-handshake",
            "event.outcome": "success"})
    put("audit", datetime(2026, 1, 15, 4, tzinfo=UTC), **{
        "user.name": "admin", "event.action": "device-quarantined", "event.outcome": "success",
        "device.id": "d4", "event.reason": "enrollment token guessing"})
    put("audit", datetime(2026, 1, 25, tzinfo=UTC), **{
        "user.name": "admin", "event.action": "device-revoked", "event.outcome": "success", "device.id": "d6",
        "event.reason": "lost"})
    put("audit", datetime(2026, 1, 26, tzinfo=UTC), **{
        "user.name": "admin", "event.action": "policy-reloaded", "event.outcome": "success"})
    for when in (datetime(2026, 2, 1, 0, 0, 1, tzinfo=UTC),):
        put("proxy", when, **{"device.id": "d1", "source.ip": "10.8.0.1", "user.name": "user1",
                              "kanmon.verdict": "block", "rule.id": "no-webmail", "rule.category": "webmail",
                              "url.full": "https://mail.example.com/", "http.request.method": "GET"})
    store.rotate_if_needed()
    store.close()


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("logs")
    # A December record first (different day file), so the month bounds are exercised.
    clock = Clock()
    clock.now = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    with LogStore(directory, clock=clock) as store:
        store.append("proxy", {"device.id": "d1", "kanmon.verdict": "block", "rule.id": "no-webmail",
                               "rule.category": "webmail", "url.full": "https://mail.example.com/"})
    write_month(directory)
    return directory


def review(directory: Path, zone=UTC, **kw):
    start, end = parse_month("2026-01", zone)
    return build_review("2026-01", start, end, str(zone), stream_records(directory, start, end),
                        generated_at=datetime(2026, 2, 2, tzinfo=UTC), **kw)


def as_dict(counts) -> dict[str, int]:
    return {c.key: c.count for c in counts}


def test_month_parsing():
    assert parse_month("2026-12", UTC) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    tokyo = ZoneInfo("Asia/Tokyo")
    start, _ = parse_month("2026-01", tokyo)
    assert start.astimezone(UTC) == datetime(2025, 12, 31, 15, tzinfo=UTC)
    for bad in ("2026-13", "2026-1", "26-01", "2026/01", "januar", "", "2026-00", "2026-01-01"):
        with pytest.raises(ValueError):
            parse_month(bad, UTC)


def test_blocked_counts_by_category_group_stream_and_day(logs):
    report = review(logs)
    assert report.blocked_total == 6 + 3 + 2 + 1        # Dec 31 and Feb 1 left out
    assert as_dict(report.blocked_by_category) == {"webmail": 6, "storage": 3, NONE_KEY: 3}
    assert as_dict(report.blocked_by_group) == {"sales": 9, NONE_KEY: 3}
    assert as_dict(report.blocked_by_stream) == {"proxy": 6, "conn": 4, "dns": 2}
    days = {d.day: d.count for d in report.blocked_by_day}
    assert len(days) == 31 and sum(days.values()) == 12
    assert days[date(2026, 1, 5)] == 6 and days[date(2026, 1, 20)] == 3 and days[date(2026, 1, 31)] == 2
    assert as_dict(report.top_blocking_rules)["no-webmail"] == 6
    assert report.top_blocked_domains[0] == Count("mail.example.com", 6)
    # SNI is lower-cased, the DNS name loses its trailing dot
    assert as_dict(report.top_blocked_domains)["files.example.org"] == 3
    assert as_dict(report.top_blocked_domains)["bad.example"] == 2


def test_days_follow_the_report_time_zone(logs):
    report = review(logs, zone=ZoneInfo("Asia/Tokyo"))
    days = {d.day: d.count for d in report.blocked_by_day}
    # 23:30 UTC on the 20th is the 21st in Tokyo; 22:00 UTC on Jan 31 is Feb 1 there (left out)
    assert days[date(2026, 1, 21)] == 3 and days[date(2026, 1, 20)] == 0
    assert days[date(2026, 1, 31)] == 0
    # ...while the Dec 31 23:59 UTC block is Jan 1 08:59 in Tokyo (counted)
    assert days[date(2026, 1, 1)] == 1
    assert report.blocked_total == 12 - 2 + 1


def test_auth_failures_and_bursts(logs):
    report = review(logs)
    assert (report.auth_total, report.auth_failures) == (15, 10)
    # grouped by the stable code the dashboard counts (kanmon.auth.reason, else event.action),
    # never by the free text of event.reason
    assert as_dict(report.auth_failures_by_reason) == {"expired": 7, "wireguard-handshake": 3}
    assert as_dict(report.auth_failures_by_source) == {"d4": 7, "203.0.113.9": 3}
    assert len(report.auth_bursts) == 1
    burst = report.auth_bursts[0]
    assert (burst.device_id, burst.failures, burst.users, burst.reasons) == ("d4", 7, ("user4",), ("expired",))
    assert burst.end - burst.start == timedelta(minutes=6)


def test_burst_window_is_a_sliding_window():
    def fail(minute: float, source: str = "198.51.100.1") -> dict:
        return {"@timestamp": _ts(T0 + timedelta(minutes=minute)), "source.ip": source, "device.id": None,
                "event.outcome": "failure"}
    window = timedelta(minutes=10)
    # 4 failures in 10 minutes: below a threshold of 5
    assert find_auth_bursts([fail(m) for m in (0, 3, 6, 9)], 5, window) == []
    # 5 spread over 12 minutes never fit one 10-minute window
    assert find_auth_bursts([fail(m) for m in (0, 3, 6, 9, 12)], 5, window) == []
    # two separate episodes, and another source's failures are not mixed in
    records = [fail(m) for m in (0, 1, 2, 3, 4, 60, 61, 62, 63, 64, 65)] + [fail(m, "198.51.100.2") for m in (0, 1, 2, 3)]
    bursts = find_auth_bursts(records, 5, window)
    assert [(b.source_ip, b.failures) for b in bursts] == [("198.51.100.1", 5), ("198.51.100.1", 6)]


def test_unusual_devices(logs):
    report = review(logs)
    assert report.devices_seen == 6
    unusual = {u.device_id: u for u in report.unusual_devices}
    assert set(unusual) == {"d6"}
    d6 = unusual["d6"]
    assert (d6.records, d6.destinations, d6.users) == (400, 40, ("user6",))
    assert len(d6.reasons) == 2
    assert all(name.startswith("rare") for name in d6.only_this_device) and len(d6.only_this_device) == 10
    # with a floor above its volume and destinations, nothing is unusual
    quiet = review(logs, thresholds=ReviewThresholds(unusual_min_records=1000, unusual_min_destinations=100))
    assert quiet.unusual_devices == ()


def test_unknown_devices_and_audit_actions(logs):
    report = review(logs)
    assert as_dict(report.unknown_device_sources) == {"10.8.0.99": 1}
    assert [(a.action, a.device_id, a.operator) for a in report.device_actions] == [
        ("device-quarantined", "d4", "admin"), ("device-revoked", "d6", "admin")]
    assert as_dict(report.device_actions_by_kind) == {"device-quarantined": 1, "device-revoked": 1}
    assert as_dict(report.other_audit_by_action) == {"policy-reloaded": 1}
    assert report.expiring_rules is None


def test_incident_for_one_device(logs):
    since, until = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    report = build_incident("d4", since, until, stream_records(logs, since, until, device="d4"),
                            generated_at=until, limit=5)
    counts = as_dict(report.records_by_stream)
    assert counts == {"proxy": 20, "conn": 0, "dns": 0, "mail": 0, "auth": 7, "audit": 1}
    assert report.users == ("user4",) and report.groups == ("dev",)
    assert report.source_ips == ("10.8.0.4",)          # the tunnel IP, not the handshake's public address
    assert [(a.action, a.reason) for a in report.actions] == [("device-quarantined", "enrollment token guessing")]
    assert report.status_now == "quarantined"
    # tables keep the newest `limit` rows, in time order, and say they were cut
    assert len(report.connections) == 5 and len(report.auth) == 5
    assert report.connections[-1].time == datetime(2026, 1, 3, 8, 19, tzinfo=UTC)
    assert [r.time for r in report.auth] == sorted(r.time for r in report.auth)
    assert set(report.truncated) == {"connections", "auth"}
    assert report.blocks == () and report.blocked_total == 0


def test_incident_blocks_and_revocation(logs):
    since, until = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 2, tzinfo=UTC)
    report = build_incident("d1", since, until, stream_records(logs, since, until, device="d1"), generated_at=until)
    assert report.blocked_total == 7                      # 6 in January + 1 on Feb 1
    assert {r.rule for r in report.blocks} == {"no-webmail"}
    assert report.top_destinations[0].key.startswith("site") or report.top_destinations[0].key == "mail.example.com"
    revoked = build_incident("d6", since, until, stream_records(logs, since, until, device="d6"), generated_at=until)
    assert revoked.status_now == "revoked"
    assert revoked.top_destinations[0].count == 10        # 400 requests over 40 names
    # another device's records passed in by mistake are ignored
    mixed = build_incident("d6", since, until, stream_records(logs, since, until), generated_at=until)
    assert as_dict(mixed.records_by_stream) == as_dict(revoked.records_by_stream)
