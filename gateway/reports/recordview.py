"""Reading the facts a report needs out of one log record (pure; field names per
gateway/logstore/FIELDS.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gateway.logstore.fields import parse_timestamp

from .model import NONE_KEY

BLOCK = "block"
# Streams whose records are traffic decisions (a device reaching a destination).
TRAFFIC_STREAMS = ("proxy", "conn", "dns")
DECISION_STREAMS = ("proxy", "conn", "dns", "mail")
# Device status changes an operator (or the gateway) made, from the audit stream
# (gateway.cli.device.AUDIT_ACTIONS).
STATUS_ACTIONS = ("device-quarantined", "device-released", "device-revoked", "device-suspended", "device-resumed")


def record_time(record: dict[str, Any]) -> datetime | None:
    stamp = record.get("@timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return parse_timestamp(stamp)
    except ValueError:
        return None


def text(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None or value == "":
        return None
    return str(value)


def destination(record: dict[str, Any]) -> str | None:
    """The name (or address) a traffic record went to: URL host, DNS question, SNI, or IP."""
    for name in ("url.domain", "dns.question.name", "destination.domain", "tls.client.server_name"):
        value = record.get(name)
        if isinstance(value, str) and value:
            return value.rstrip(".").lower()
    ip = record.get("destination.ip")
    if ip:
        port = record.get("destination.port")
        return f"{ip}:{port}" if port is not None else str(ip)
    return None


def groups(record: dict[str, Any]) -> tuple[str, ...]:
    """The device's groups: ``kanmon.device.group`` (FIELDS.md) or the ``device.groups``
    list the access log writes. A device in several groups counts in each of them."""
    found: list[str] = []
    single = record.get("kanmon.device.group")
    if isinstance(single, str) and single:
        found.append(single)
    many = record.get("device.groups")
    if isinstance(many, list):
        found.extend(g for g in many if isinstance(g, str) and g and g not in found)
    elif isinstance(many, str) and many and many not in found:
        found.append(many)
    return tuple(found) or (NONE_KEY,)


def is_block(record: dict[str, Any]) -> bool:
    return record.get("kanmon.verdict") == BLOCK


def summary(record: dict[str, Any], codes: bool = True) -> str:
    """A short human-readable detail for a table row. ``codes`` False leaves out
    ``event.action`` and ``event.outcome`` (the report shows them as words, labels.py)."""
    parts = []
    for name in ("http.request.method", "http.response.status_code", "dns.question.type", "dns.response_code",
                 "network.transport", "event.action", "event.outcome", "email.subject", "event.reason"):
        if not codes and name in ("event.action", "event.outcome"):
            continue
        value = record.get(name)
        if value not in (None, ""):
            parts.append(str(value))
    # Mail indicators are not text: the report shows them as words (mail_indicators, labels.py).
    return " · ".join(parts)


def mail_indicators(record: dict[str, Any]) -> tuple[str, ...]:
    """The indicator names of a mail record (``kanmon.mail.indicators`` holds objects
    ``{name, weight, evidence}``; older records may hold bare names)."""
    found: list[str] = []
    for item in record.get("kanmon.mail.indicators") or ():
        name = item.get("name") if isinstance(item, dict) else item
        if isinstance(name, str) and name and name not in found:
            found.append(name)
    return tuple(found)
