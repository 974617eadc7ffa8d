"""Streaming search over day files, plain or gzipped (reads files, holds one line at a
time). Files are chosen by day; records are filtered on ``@timestamp``. A file holds the
records written on its UTC day, and a record's timestamp may be earlier than its write
(a request's start), so the day before ``since`` is opened too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .chain import is_recovery, is_seal
from .fields import field_value, parse_timestamp
from .layout import day_files
from .reading import open_day_file

DEVICE_FIELD = "device.id"
RULE_FIELD = "rule.id"
VERDICT_FIELD = "kanmon.verdict"


def _needle(value: str) -> bytes:
    # The value as it appears inside the JSON line: a cheap test before parsing.
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def search(directory: Path, stream: str, since: datetime | None = None, until: datetime | None = None,
           device: str | None = None, rule: str | None = None, verdict: str | None = None,
           *, include_chain_records: bool = False) -> Iterator[dict[str, Any]]:
    """Records of ``stream`` with since <= @timestamp < until (either bound may be None)
    matching every filter given, oldest file first. Seal and recovery records are left
    out unless ``include_chain_records``."""
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise ValueError("since/until must be timezone-aware")
    since = since.astimezone(UTC) if since else None
    until = until.astimezone(UTC) if until else None
    first_day = (since - timedelta(days=1)).date() if since else None
    last_day = until.date() if until else None
    wanted = [(name, value) for name, value in
              ((DEVICE_FIELD, device), (RULE_FIELD, rule), (VERDICT_FIELD, verdict)) if value is not None]
    needles = [_needle(value) for _name, value in wanted]
    for day_file in day_files(Path(directory), stream):
        if first_day is not None and day_file.day < first_day:
            continue
        if last_day is not None and day_file.day > last_day:
            break
        with open_day_file(day_file.path) as handle:
            for raw in handle:
                if needles and not all(n in raw for n in needles):
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue      # torn/damaged lines are verify's business
                if not isinstance(record, dict):
                    continue
                if any(field_value(record, name) != value for name, value in wanted):
                    continue
                if not include_chain_records and (is_seal(record) or is_recovery(record)):
                    continue
                if since is not None or until is not None:
                    stamp = record.get("@timestamp")
                    try:
                        moment = parse_timestamp(stamp) if isinstance(stamp, str) else None
                    except ValueError:
                        moment = None
                    if moment is None:
                        continue
                    if (since is not None and moment < since) or (until is not None and moment >= until):
                        continue
                yield record
