"""The inputs of a log search as people type them (ISO 8601 times, an IANA zone) and a
bounded, newest-first view of its results: shared by ``kanmon logs search``
(gateway/cli/logs.py) and the console's Logs and Audit trail pages (issue #21), so both read
the same records with the same rules. The search itself is ``search.search``."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.i18n import Text

from .fields import field_value, json_default
from .search import ProblemHandler, search

BAD_TIME = Text("日時を解釈できません: {option} {value!r}（ISO 8601 形式、例 2026-01-31T09:00:00Z）",
                "cannot parse time: {option} {value!r} (use ISO 8601, e.g. 2026-01-31T09:00:00Z)")
BAD_ZONE = Text("--tz のタイムゾーンがありません: {zone!r}（IANA の名前、例 Asia/Tokyo）",
                "--tz: no such time zone: {zone!r} (an IANA name, e.g. Asia/Tokyo)")
BAD_RANGE = Text("--since は --until より前にしてください", "--since must be before --until")


def parse_time(option: str, value: str | None, zone: tzinfo = UTC) -> datetime | None:
    """ISO 8601 date or date-time; without an offset it is taken in ``zone`` (UTC by default).
    Raises ValueError whose first argument is the bilingual ``Text``."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(BAD_TIME.format(option=option, value=value)) from None
    return moment.replace(tzinfo=zone).astimezone(UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def zone_of(name: str | None) -> tzinfo | None:
    """The IANA zone ``name`` names (``Asia/Tokyo``); None when it names none. UTC without a name."""
    if not name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # ValueError: "../x", a path; OSError: "Asia" (a directory)
        return None


def local_time(stamp: object, zone: tzinfo) -> str:
    """A record's @timestamp (UTC, ``...Z``) as ISO 8601 with the offset of ``zone``."""
    if zone is UTC or not isinstance(stamp, str):
        return "-" if stamp is None else str(stamp)
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    return moment.astimezone(zone).isoformat(timespec="microseconds")


def target_of(record: Mapping[str, Any]) -> str:
    """What a record is about, as the CLI's summary line shows it (URL, DNS name, domain,
    address:port, or the action)."""
    def get(name: str) -> str:
        value = record.get(name)
        return "-" if value is None else str(value)
    return str(record.get("url.full") or record.get("dns.question.name") or record.get("destination.domain")
               or (f"{get('destination.ip')}:{get('destination.port')}" if "destination.ip" in record else None)
               or record.get("event.action") or "-")


@dataclass(frozen=True)
class Newest:
    records: list[dict[str, Any]]     # newest first, at most ``limit``
    matched: int                      # how many matched in all (more than len(records) when cut)
    problems: int                     # unreadable lines or files skipped

    @property
    def truncated(self) -> bool:
        return self.matched > len(self.records)


def newest(directory: Path, stream: str, since: datetime | None = None, until: datetime | None = None, *,
           device: str | None = None, rule: str | None = None, verdict: str | None = None,
           fields: Mapping[str, str] | None = None, text: str | None = None, limit: int = 500,
           on_problem: ProblemHandler | None = None) -> Newest:
    """The last ``limit`` records of ``search`` (same filters), newest first. ``fields``: more
    exact field filters; ``text``: a case-insensitive substring of the record as JSON. Memory
    stays bounded by ``limit`` (a ring of the newest matches while the files stream by)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    ring: deque[dict[str, Any]] = deque(maxlen=limit)
    extra = [(k, v) for k, v in (fields or {}).items() if v is not None]
    needle = text.casefold() if text else None
    matched = problems = 0

    def problem(path: Path, line: int | None, why: Text) -> None:
        nonlocal problems
        problems += 1
        if on_problem is not None:
            on_problem(path, line, why)

    for record in search(directory, stream, since, until, device=device, rule=rule, verdict=verdict,
                         on_problem=problem):
        if any(field_value(record, k) != v for k, v in extra):
            continue
        if needle is not None and needle not in json.dumps(record, ensure_ascii=False,
                                                           default=json_default).casefold():
            continue
        matched += 1
        ring.append(record)
    return Newest(list(reversed(ring)), matched, problems)
