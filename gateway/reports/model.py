"""What a report says, independent of how it is shown: plain frozen dataclasses built by
review.py / incident.py (pure aggregation) and turned into HTML by html.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from gateway.i18n import Text

from .domains import DomainGroup

# Key used when a record has no value for what is being counted (no category, no group…).
NONE_KEY = ""


@dataclass(frozen=True)
class Count:
    key: str
    count: int


@dataclass(frozen=True)
class DayCount:
    day: date
    count: int


@dataclass(frozen=True)
class AuthBurst:
    """At least ``threshold`` authentication failures of one source within the window."""

    device_id: str | None
    source_ip: str | None
    users: tuple[str, ...]
    start: datetime
    end: datetime
    failures: int
    reasons: tuple[str, ...]     # stable codes (gateway.metrics.auth_failure_reason), shown as words


@dataclass(frozen=True)
class UnusualDevice:
    device_id: str
    users: tuple[str, ...]
    records: int
    destinations: int
    reasons: tuple[Text, ...]
    only_this_device: tuple[str, ...]   # sample of destinations no other device reached


@dataclass(frozen=True)
class AuditAction:
    time: datetime | None
    action: str
    device_id: str | None
    operator: str | None
    reason: str | None
    outcome: str | None


@dataclass(frozen=True)
class ExpiringRule:
    rule_id: str
    expires: date
    owner: str | None
    location: str          # file:line
    expired: bool


@dataclass(frozen=True)
class ReviewThresholds:
    """What counts as a burst and as unusual (documented in the report itself).

    * burst: ``burst_failures`` or more authentication failures from one source (device,
      or tunnel/public address when the device is unknown) within ``burst_minutes``.
    * unusual device: its number of records (proxy + conn + dns) or of distinct
      destinations is at least ``unusual_factor`` times the median over all devices seen
      that month, and at least ``unusual_min_records`` / ``unusual_min_destinations``
      (so that a quiet fleet does not flag a device for 12 requests against a median of 3).
    """

    burst_failures: int = 5
    burst_minutes: int = 10
    unusual_factor: float = 3.0
    unusual_min_records: int = 100
    unusual_min_destinations: int = 20
    top: int = 15


@dataclass(frozen=True)
class FirewallSummary:
    """The firewall log's month (issue #18): aggregated drop records, counted in packets."""

    records: int
    packets: int
    by_reason: tuple[Count, ...]
    by_source: tuple[Count, ...]         # device id, or "(tunnel address)" of no device
    top_destinations: tuple[Count, ...]  # "ip:port/transport"
    blocked_devices: tuple[Count, ...]   # revoked/suspended devices whose packets still arrived


@dataclass(frozen=True)
class OffLineSession:
    """A device's tunnel seen from an outer address outside its group's approved lines."""

    device_id: str
    user: str | None
    groups: tuple[str, ...]
    outer_ip: str
    first: datetime
    last: datetime
    events: int


@dataclass(frozen=True)
class TunnelSummary:
    events: tuple[Count, ...]              # session-start, resumed, roamed, peer-added, peer-removed
    devices: int                           # devices with a session event
    many_outer_addresses: tuple[Count, ...]  # devices seen from more than one outer address
    off_line: tuple[OffLineSession, ...] | None   # None: no approved lines given
    approved: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (group, networks) the check used


@dataclass(frozen=True)
class ReviewReport:
    month: str                       # YYYY-MM
    timezone: str
    start: datetime
    end: datetime
    generated_at: datetime
    thresholds: ReviewThresholds
    records_by_stream: tuple[Count, ...]
    blocked_total: int
    blocked_by_stream: tuple[Count, ...]
    blocked_by_category: tuple[Count, ...]
    blocked_by_group: tuple[Count, ...]
    blocked_by_day: tuple[DayCount, ...]     # every day of the month, zeros included
    top_blocked_domains: tuple[Count, ...]
    top_blocking_rules: tuple[Count, ...]
    auth_total: int
    auth_failures: int
    auth_failures_by_reason: tuple[Count, ...]
    auth_failures_by_source: tuple[Count, ...]
    auth_bursts: tuple[AuthBurst, ...]
    devices_seen: int
    unusual_devices: tuple[UnusualDevice, ...]
    unknown_device_sources: tuple[Count, ...]   # records with no device id, by source address
    device_actions: tuple[AuditAction, ...]     # quarantines, revocations, suspensions, …
    device_actions_by_kind: tuple[Count, ...]
    other_audit_by_action: tuple[Count, ...]
    expiring_rules: tuple[ExpiringRule, ...] | None   # None: no policy file given
    expiring_days: int
    firewall: FirewallSummary | None = None   # issue #18 sections (gateway/reports/evidence.py)
    tunnel: TunnelSummary | None = None
    previous: "ReviewReport | None" = None    # last month, shown beside this one (compare.py)


# ---- incident flash report: IPA 組織的対策 9.5 (gateway/reports/flash.py) ----

@dataclass(frozen=True)
class IncidentFacts:
    """What a person states about the incident (None: left blank for the paper form)."""

    category: str | None = None        # INCIDENT_CATEGORIES key
    level: str | None = None           # "0".."3"
    phase: str | None = None           # INCIDENT_PHASES key
    cause: str | None = None           # 想定される原因
    background: str | None = None      # 原因発生の背景
    prevention: str | None = None      # 再発防止策
    reporter: str | None = None        # 報告者
    responsible: str | None = None     # 責任者・担当者
    detected_at: datetime | None = None   # 発覚日時, when the operator knows better than the logs


@dataclass(frozen=True)
class Suggestion:
    category: str
    evidence: tuple[str, ...]     # what in the logs points to it (a few examples)


@dataclass(frozen=True)
class TimelineEntry:
    time: datetime
    kind: str            # "first-record", "block", "tunnel", "mail", "action", "firewall"
    what: Text
    detail: str


@dataclass(frozen=True)
class EventRow:
    time: datetime | None
    stream: str
    verdict: str | None
    rule: str | None
    target: str
    detail: str
    indicators: tuple[str, ...] = ()       # mail indicator names (shown as words)
    mail_verdict: str | None = None        # kanmon.mail.verdict
    action: str | None = None              # event.action (shown as words)
    outcome: str | None = None             # event.outcome
    reason: str | None = None              # a failed authentication's stable code (shown as words)


@dataclass(frozen=True)
class IncidentReport:
    device_id: str
    since: datetime
    until: datetime
    generated_at: datetime
    users: tuple[str, ...]
    source_ips: tuple[str, ...]
    groups: tuple[str, ...]
    records_by_stream: tuple[Count, ...]
    blocked_total: int
    top_destinations: tuple[Count, ...]
    connections: tuple[EventRow, ...]      # proxy + conn, newest last
    blocks: tuple[EventRow, ...]
    dns: tuple[EventRow, ...]
    mail: tuple[EventRow, ...]
    auth: tuple[EventRow, ...]
    actions: tuple[AuditAction, ...]
    status_now: str | None                 # last device status change seen, if any
    limit: int
    truncated: tuple[str, ...] = field(default=())   # sections that hit ``limit``
    # IPA 組織的対策 9.5 (gateway/reports/flash.py) and destinations by registered domain
    # (gateway/reports/domains.py), issue #18
    facts: IncidentFacts = field(default_factory=lambda: IncidentFacts())
    suggestion: Suggestion | None = None
    first_suspicious: datetime | None = None   # 発生日時 from the logs
    first_response: datetime | None = None     # 発覚日時 from the logs (first block or quarantine)
    timeline: tuple[TimelineEntry, ...] = ()
    timeline_left_out: int = 0
    domains: tuple[DomainGroup, ...] = ()
