"""What a report says, independent of how it is shown: plain frozen dataclasses built by
review.py / incident.py (pure aggregation) and turned into HTML by html.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from gateway.i18n import Text

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
    reasons: tuple[str, ...]


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


@dataclass(frozen=True)
class EventRow:
    time: datetime | None
    stream: str
    verdict: str | None
    rule: str | None
    target: str
    detail: str


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
