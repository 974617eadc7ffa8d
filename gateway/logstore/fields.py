"""What a record may contain: pure functions, no I/O.

Field names follow the Elastic Common Schema (ECS) where one exists; gateway-specific
fields live under ``kanmon.``. Records are flat: each key is the full dotted ECS name
(``"source.ip"``), which Elasticsearch/OpenSearch ingest as the same field as the nested
form. Every field is described in FIELDS.md next to this module.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any

from gateway.verdict import Verdict

from .redact import RedactionRule, redact_query, redact_url

TIMESTAMP = "@timestamp"
# Chain fields, added by the writer (a caller's values for them are dropped).
SEQUENCE = "event.sequence"          # ECS: "Sequence number of the event"
HASH = "event.hash"                  # ECS: "Hash ... to be able to demonstrate log integrity"
PREV_HASH = "kanmon.prev_hash"       # no ECS equivalent
RESERVED_FIELDS = frozenset({SEQUENCE, HASH, PREV_HASH})

# Names the store never writes, whatever the caller passes (guideline: no bodies, no
# passwords, no cookies in logs). A key is refused when any dotted segment (or a nested
# key) is one of these, case-insensitively, except sizes: ``http.request.body.bytes`` is
# the ECS byte count, not content, and is kept.
FORBIDDEN_NAMES = frozenset({
    "password", "passwd", "cookie", "cookies", "set-cookie",
    "authorization", "proxy-authorization", "body",
})
_ALLOWED_LAST_SEGMENTS = frozenset({"bytes"})
STRIPPED_FIELDS = "kanmon.stripped_fields"   # names of the fields that were refused

# URL fields the store redacts itself (query-string secrets, URL passwords).
URL_FIELDS = ("url.full", "url.original")
QUERY_FIELDS = ("url.query",)

# Required in every record of a stream (FIELDS.md explains each one). The writer does not
# reject a record that lacks one -- losing a log line is worse -- but tests and the lead's
# addons check records with missing_required_fields().
_COMMON = (TIMESTAMP, "device.id", "source.ip", "user.name")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "proxy": _COMMON + ("kanmon.verdict", "rule.id", "url.full", "http.request.method"),
    "conn": _COMMON + ("kanmon.verdict", "rule.id", "destination.ip", "destination.port",
                       "network.transport"),
    "dns": _COMMON + ("kanmon.verdict", "rule.id", "dns.question.name"),
    "auth": (TIMESTAMP, "device.id", "source.ip", "user.name", "event.action",
             "event.outcome"),
    "mail": _COMMON + ("kanmon.verdict", "rule.id", "email.from.address"),
    "audit": (TIMESTAMP, "user.name", "event.action", "event.outcome"),
}


def format_timestamp(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds and ``Z``: ``2026-01-31T23:59:59.123456Z``.
    Fixed width, so timestamps also sort correctly as text."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    # isoformat is several times faster than strftime; this runs once per record.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def json_default(value: Any) -> Any:
    """How non-JSON values are written. Bytes are never written as content (they could be
    a body): only their length."""
    if isinstance(value, datetime):
        return format_timestamp(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address,
                          ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


_FORBIDDEN_SEGMENT = re.compile(
    r"(?:^|\.)(?:" + "|".join(re.escape(n) for n in sorted(FORBIDDEN_NAMES)) + r")(?:\.|$)",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=8192)     # field names repeat: one regex per distinct name
def is_forbidden_name(name: str) -> bool:
    if not _FORBIDDEN_SEGMENT.search(name):
        return False
    return name.rsplit(".", 1)[-1].lower() not in _ALLOWED_LAST_SEGMENTS


_SCALARS = frozenset({str, int, float, bool, type(None)})


def strip_forbidden(record: Mapping[str, Any], _prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """A copy of ``record`` without forbidden fields (recursing into nested objects and
    lists of objects), and the full dotted names of what was removed."""
    kept: dict[str, Any] = {}
    removed: list[str] = []
    for key, value in record.items():
        name = f"{_prefix}{key}" if _prefix else key
        if is_forbidden_name(name):
            removed.append(name)
            continue
        if type(value) in _SCALARS:       # the common case, without the slower ABC checks
            kept[key] = value
            continue
        if isinstance(value, Mapping):
            value, inner = strip_forbidden(value, name + ".")
            removed.extend(inner)
        elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            cleaned = []
            for item in value:
                if isinstance(item, Mapping):
                    item, inner = strip_forbidden(item, name + ".")
                    removed.extend(inner)
                cleaned.append(item)
            value = cleaned
        kept[key] = value
    return kept, removed


def prepare_record(record: Mapping[str, Any], now: datetime,
                   redaction: RedactionRule | None) -> dict[str, Any]:
    """The record as it will be written, minus the chain fields: forbidden fields removed
    (their names listed in ``kanmon.stripped_fields``), URLs redacted, ``@timestamp``
    added from ``now`` when missing, caller-supplied chain fields dropped."""
    out, removed = strip_forbidden(record)
    for name in RESERVED_FIELDS:
        out.pop(name, None)
    stamp = out.get(TIMESTAMP)
    if stamp is None:
        out = {TIMESTAMP: format_timestamp(now), **out}
    elif isinstance(stamp, datetime):
        out[TIMESTAMP] = format_timestamp(stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC))
    if redaction is not None:
        for name in URL_FIELDS:
            value = out.get(name)
            if isinstance(value, str):
                out[name] = redact_url(value, redaction)
        for name in QUERY_FIELDS:
            value = out.get(name)
            if isinstance(value, str):
                out[name] = redact_query(value, redaction)
    if removed:
        out[STRIPPED_FIELDS] = sorted(set(removed) | set(out.get(STRIPPED_FIELDS) or ()))
    return out


def field_value(record: Mapping[str, Any], name: str) -> Any:
    """Value of a dotted field, whether the record stores it flat (``"device.id"``) or
    nested (``{"device": {"id": ...}}``)."""
    if name in record:
        return record[name]
    node: Any = record
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def missing_required_fields(stream: str, record: Mapping[str, Any]) -> list[str]:
    """Required fields of ``stream`` that ``record`` lacks (absent; null counts as present,
    e.g. ``rule.id`` is null for a default decision)."""
    missing = []
    for name in REQUIRED_FIELDS[stream]:
        if name not in record and field_value(record, name) is None:
            missing.append(name)
    return missing


def verdict_fields(verdict: Verdict) -> dict[str, Any]:
    """Log fields for a gateway decision (gateway.verdict.Verdict)."""
    fields: dict[str, Any] = {
        "kanmon.verdict": str(verdict.action),
        "event.type": ["allowed"] if verdict.passes else ["denied"],
        "rule.id": verdict.rule_id,
        "event.reason": verdict.explain,
        "kanmon.stage": str(verdict.stage),
    }
    if verdict.category is not None:
        fields["rule.category"] = verdict.category
    return fields
