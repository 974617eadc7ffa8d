"""Where log files live and what they are called.

One JSON Lines file per stream per UTC day:
``<dir>/<stream>/<stream>-YYYY-MM-DD.jsonl`` while open, ``...jsonl.gz`` after rotation.
A file holds the records *written* on that UTC day (the writer's clock), so a record's
``@timestamp`` (e.g. a request's start) may be up to a day earlier than its file's day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

STREAMS: tuple[str, ...] = ("proxy", "conn", "dns", "auth", "mail", "audit")

PLAIN_SUFFIX = ".jsonl"
GZIP_SUFFIX = ".jsonl.gz"
# Left behind only if the process died while compressing; removed and redone on rotation.
GZIP_TEMP_SUFFIX = ".jsonl.gz.tmp"
# Written by purge(): which files retention removed and the chain head each one ended with,
# so verify() can tell a purged start of the chain from a deleted one.
PURGE_MANIFEST = "purged.jsonl"

_NAME = re.compile(r"^(?P<stream>[a-z]+)-(?P<day>\d{4}-\d{2}-\d{2})(?P<suffix>\.jsonl(?:\.gz)?)$")


@dataclass(frozen=True, order=True)
class DayFile:
    day: date
    stream: str
    path: Path

    @property
    def compressed(self) -> bool:
        return self.path.name.endswith(GZIP_SUFFIX)

    @property
    def plain_name(self) -> str:
        return day_file_name(self.stream, self.day)


def stream_dir(directory: Path, stream: str) -> Path:
    return Path(directory) / stream


def day_file_name(stream: str, day: date, *, compressed: bool = False) -> str:
    return f"{stream}-{day.isoformat()}{GZIP_SUFFIX if compressed else PLAIN_SUFFIX}"


def day_file_path(directory: Path, stream: str, day: date, *, compressed: bool = False) -> Path:
    return stream_dir(directory, stream) / day_file_name(stream, day, compressed=compressed)


def parse_day_file_name(name: str) -> tuple[str, date, bool] | None:
    """``proxy-2026-01-31.jsonl.gz`` -> ("proxy", date(2026, 1, 31), True); None if not ours."""
    m = _NAME.match(name)
    if not m or m["stream"] not in STREAMS:
        return None
    try:
        day = date.fromisoformat(m["day"])
    except ValueError:
        return None
    return m["stream"], day, m["suffix"] == GZIP_SUFFIX


def day_files(directory: Path, stream: str) -> list[DayFile]:
    """The stream's day files, oldest first. When both the plain and the gzipped file of a
    day exist (the process died between compressing and unlinking), the gzipped one is
    complete (it is renamed into place only after it was fully written) and wins."""
    folder = stream_dir(directory, stream)
    if not folder.is_dir():
        return []
    by_day: dict[date, DayFile] = {}
    for entry in folder.iterdir():
        parsed = parse_day_file_name(entry.name)
        if parsed is None or parsed[0] != stream:
            continue
        _, day, compressed = parsed
        known = by_day.get(day)
        if known is None or (compressed and not known.compressed):
            by_day[day] = DayFile(day, stream, entry)
    return [by_day[d] for d in sorted(by_day)]
