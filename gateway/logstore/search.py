"""Streaming search over day files, plain or gzipped (reads files, holds one line at a
time). Files are chosen by day; records are filtered on ``@timestamp``. A file holds the
records written on its UTC day, and a record's timestamp may be earlier than its write
(a request's start), so the day before ``since`` is opened too."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.i18n import Text

from .chain import is_recovery, is_seal
from .fields import field_value, parse_timestamp
from .layout import day_files
from .reading import open_day_file

DEVICE_FIELD = "device.id"
RULE_FIELD = "rule.id"
VERDICT_FIELD = "kanmon.verdict"

# on_problem(path, line or None, text): a line or file search could not read (it carries on).
ProblemHandler = Callable[[Path, "int | None", Text], None]
UNREADABLE_LINE = Text("JSON として読めない行を読み飛ばしました（破損、または入れ子が深すぎる）",
                       "skipped a line that is not readable JSON (damaged, or nested too deeply)")


def _needle(value: str) -> bytes:
    # The value as it appears inside the JSON line: a cheap test before parsing.
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def search(directory: Path, stream: str, since: datetime | None = None, until: datetime | None = None,
           device: str | None = None, rule: str | None = None, verdict: str | None = None,
           *, include_chain_records: bool = False,
           on_problem: ProblemHandler | None = None) -> Iterator[dict[str, Any]]:
    """Records of ``stream`` with since <= @timestamp < until (either bound may be None)
    matching every filter given, oldest file first. Seal and recovery records are left
    out unless ``include_chain_records``. A line that does not parse, or a compressed file
    that is damaged, is passed to ``on_problem`` (file, line) and the search carries on
    with the next line or file (``logs verify`` says whether it was tampering)."""
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
        number = 0
        try:
            with open_day_file(day_file.path) as handle:
                for number, raw in enumerate(handle, start=1):
                    record = _match(raw, needles, wanted, include_chain_records, since, until)
                    if record is _UNREADABLE:
                        if on_problem is not None:
                            on_problem(day_file.path, number, UNREADABLE_LINE)
                    elif record is not None:
                        yield record
        except (EOFError, OSError, zlib.error) as exc:
            if on_problem is None:
                raise
            on_problem(day_file.path, number + 1, Text(
                f"圧縮ファイルが {number} 行目の後で壊れているため、このファイルの残りを読み飛ばしました（{exc}）",
                f"the compressed file is damaged after line {number}; skipped the rest of it ({exc})"))


_UNREADABLE: dict[str, Any] = {}


def _match(raw: bytes, needles: list[bytes], wanted: list[tuple[str, str]], include_chain_records: bool,
           since: datetime | None, until: datetime | None) -> dict[str, Any] | None:
    """The record of a line if it matches, None if not, _UNREADABLE if it does not parse."""
    if needles and not all(n in raw for n in needles):
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):     # RecursionError: nested too deeply (hostile line)
        return _UNREADABLE
    if not isinstance(record, dict):
        return _UNREADABLE
    if any(field_value(record, name) != value for name, value in wanted):
        return None
    if not include_chain_records and (is_seal(record) or is_recovery(record)):
        return None
    if since is not None or until is not None:
        stamp = record.get("@timestamp")
        try:
            moment = parse_timestamp(stamp) if isinstance(stamp, str) else None
        except ValueError:
            moment = None
        if moment is None:
            return None
        if (since is not None and moment < since) or (until is not None and moment >= until):
            return None
    return record
