"""Incident flash report for one device (IPA SME sample regulations 技術的対策 3.3
「インシデントの速報レポートが作成され、通知されること」, 3.8.6 ログの保存・分析;
NISC smartphone guide 5.5(5)). Pure aggregation: records in, IncidentReport out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from gateway.metrics import auth_failure_reason

from . import recordview as rv
from .domains import DomainTally, Transfer
from .flash import cap_timeline, suggest_category, timeline_entry, virus_evidence
from .model import AuditAction, Count, EventRow, IncidentFacts, IncidentReport, TimelineEntry
from .review import audit_action

STATUS_AFTER = {"device-quarantined": "quarantined", "device-revoked": "revoked",
                "device-suspended": "suspended", "device-resumed": "active",
                "device-released": "active"}


def _row(stream: str, record: dict[str, Any]) -> EventRow:
    if stream == "mail":
        target = rv.text(record, "email.from.address") or "-"
    elif stream == "auth":
        target = rv.text(record, "source.ip") or rv.text(record, "client.ip") or "-"
    else:
        target = rv.text(record, "url.full") or rv.destination(record) or "-"
    return EventRow(rv.record_time(record), stream, rv.text(record, "kanmon.verdict"), rv.text(record, "rule.id"),
                    target, rv.summary(record, codes=False), rv.mail_indicators(record) if stream == "mail" else (),
                    rv.text(record, "kanmon.mail.verdict") if stream == "mail" else None,
                    rv.text(record, "event.action"), rv.text(record, "event.outcome"),
                    auth_failure_reason(record) if stream == "auth" and record.get("event.outcome") == "failure" else None)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def transfer(stream: str, record: dict[str, Any]) -> Transfer | None:
    """What a proxy request or a conn flow sent and received, for the registered-domain
    table: request/response body bytes (proxy), client/server bytes of a raw TCP flow (conn
    ``connection-closed``). Firewall drops and DNS are not transfers."""
    if stream not in ("proxy", "conn") or record.get("event.dataset") == "kanmon.firewall":
        return None
    host = rv.destination(record)
    if host is None:
        return None
    if ":" in host and stream == "conn" and record.get("destination.ip"):
        host = str(record["destination.ip"])      # an address: group by the address, not ip:port
    if stream == "proxy":
        up, down = _int(record.get("http.request.body.bytes")), _int(record.get("http.response.body.bytes"))
    else:
        up, down = _int(record.get("source.bytes")), _int(record.get("destination.bytes"))
    return Transfer(host, up, down, rv.is_block(record))


def _by_time(rows: Iterable[EventRow]) -> tuple[EventRow, ...]:
    return tuple(sorted(rows, key=lambda r: (r.time is None, r.time or datetime.min, r.stream)))


def build_incident(device_id: str, since: datetime, until: datetime,
                   streams: Mapping[str, Iterable[dict[str, Any]]], *, generated_at: datetime,
                   limit: int = 200, facts: IncidentFacts = IncidentFacts()) -> IncidentReport:
    """``streams`` maps stream name -> that device's records (already filtered on
    ``device.id``; others are skipped anyway). Each table keeps its newest ``limit`` rows
    (counts, top destinations and registered domains cover every record). ``facts``: what
    the operator states for IPA 9.5 (flash.check_facts has validated them)."""
    tables: dict[str, list[EventRow]] = {name: [] for name in ("connections", "blocks", "dns", "mail", "auth")}
    counts: Counter = Counter()
    destinations: Counter = Counter()
    users: set[str] = set()
    source_ips: set[str] = set()
    groups: set[str] = set()
    actions: list[AuditAction] = []
    blocked = 0
    timeline: list[TimelineEntry] = []
    domains = DomainTally()
    viruses: list[str] = []
    first_suspicious: datetime | None = None
    first_action: datetime | None = None

    for stream in ("proxy", "conn", "dns", "mail", "auth", "audit"):
        for record in streams.get(stream, ()):
            if record.get("device.id") != device_id:
                continue
            moment = rv.record_time(record)
            if moment is None or not since <= moment < until:
                continue
            counts[stream] += 1
            if (entry := timeline_entry(stream, record)) is not None:
                timeline.append(entry)
                if entry.kind in ("block", "firewall", "mail"):
                    first_suspicious = moment if first_suspicious is None else min(first_suspicious, moment)
                if entry.kind == "action" and record.get("event.action") in rv.STATUS_ACTIONS:
                    first_action = moment if first_action is None else min(first_action, moment)
            if (found := virus_evidence(stream, record)) is not None:
                viruses.append(found)
                first_suspicious = moment if first_suspicious is None else min(first_suspicious, moment)
            if (moved := transfer(stream, record)) is not None:
                domains.add(moved)
            if stream == "audit":
                actions.append(audit_action(record))
                continue
            if user := rv.text(record, "user.name"):
                users.add(user)
            if stream != "auth" and (ip := rv.text(record, "source.ip")):
                source_ips.add(ip)      # tunnel address (auth records may carry the public one)
            groups.update(g for g in rv.groups(record) if g)
            row = _row(stream, record)
            table = {"proxy": "connections", "conn": "connections"}.get(stream, stream)
            tables[table].append(row)
            if stream in rv.TRAFFIC_STREAMS and (target := rv.destination(record)):
                destinations[target] += 1
            if rv.is_block(record):
                blocked += 1
                tables["blocks"].append(row)

    actions.sort(key=lambda a: (a.time is None, a.time or since))
    status_now = None
    for action in actions:
        status_now = STATUS_AFTER.get(action.action, status_now)
    kept, left_out = cap_timeline(timeline, limit)
    truncated = tuple(name for name, table in tables.items() if len(table) > limit)
    newest = {name: _by_time(table)[-limit:] if limit else () for name, table in tables.items()}
    return IncidentReport(
        device_id=device_id, since=since, until=until, generated_at=generated_at,
        users=tuple(sorted(users)), source_ips=tuple(sorted(source_ips)), groups=tuple(sorted(groups)),
        records_by_stream=tuple(Count(s, counts.get(s, 0)) for s in ("proxy", "conn", "dns", "mail", "auth", "audit")),
        blocked_total=blocked,
        top_destinations=tuple(Count(k, v) for k, v in sorted(destinations.items(), key=lambda kv: (-kv[1], kv[0]))[:15]),
        connections=newest["connections"], blocks=newest["blocks"], dns=newest["dns"],
        mail=newest["mail"], auth=newest["auth"], actions=tuple(actions),
        status_now=status_now, limit=limit, truncated=truncated,
        facts=facts, suggestion=suggest_category(viruses) if facts.category is None else None,
        first_suspicious=first_suspicious, first_response=facts.detected_at or first_action or first_suspicious,
        timeline=kept, timeline_left_out=left_out, domains=domains.result())
