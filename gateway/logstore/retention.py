"""Retention: remove day files entirely older than a cutoff (I/O).

Default retention is three years: IPA「中小企業の情報セキュリティ対策ガイドライン」付録5
情報セキュリティ関連規程（サンプル）技術的対策 3.8.3「ログの取得と保存」 keeps firewall,
proxy and authentication logs 3年間 (3 years). 1096 days covers three years including a
leap day.

A day file holds records written during [day 00:00, day+1 00:00) UTC, so it is "entirely
older" than a cutoff when day+1 00:00 <= cutoff. Nothing but day files is touched.
Each removed file is first recorded in ``purged.jsonl`` with the chain head it ended with,
so ``verify`` can tell that the oldest remaining file continues a chain retention cut,
rather than one whose start was deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

from .fields import format_timestamp
from .layout import PURGE_MANIFEST, STREAMS, DayFile, day_files
from .reading import last_chained_record

DEFAULT_RETENTION_DAYS = 1096


@dataclass
class PurgeReport:
    cutoff: datetime
    removed: list[Path] = field(default_factory=list)
    removed_bytes: int = 0
    kept: int = 0
    dry_run: bool = False


def retention_cutoff(now: datetime, retention_days: int = DEFAULT_RETENTION_DAYS) -> datetime:
    if retention_days < 1:
        raise ValueError("retention must be at least 1 day")
    return now.astimezone(UTC) - timedelta(days=retention_days)


def _as_cutoff(older_than: datetime | date) -> datetime:
    if isinstance(older_than, datetime):
        if older_than.tzinfo is None:
            raise ValueError("cutoff must be timezone-aware (UTC)")
        return older_than.astimezone(UTC)
    return datetime.combine(older_than, time(0), tzinfo=UTC)


def is_expired(day_file: DayFile, cutoff: datetime) -> bool:
    end = datetime.combine(day_file.day + timedelta(days=1), time(0), tzinfo=UTC)
    return end <= cutoff


def purge(directory: Path, older_than: datetime | date, *, dry_run: bool = False,
          clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> PurgeReport:
    """Remove every day file (all streams) entirely older than ``older_than``."""
    directory = Path(directory)
    cutoff = _as_cutoff(older_than)
    report = PurgeReport(cutoff=cutoff, dry_run=dry_run)
    expired: list[DayFile] = []
    for stream in STREAMS:
        for day_file in day_files(directory, stream):
            if is_expired(day_file, cutoff):
                expired.append(day_file)
            else:
                report.kept += 1
    for day_file in expired:
        report.removed.append(day_file.path)
        report.removed_bytes += day_file.path.stat().st_size
    if dry_run or not expired:
        return report
    entries = []
    for day_file in expired:
        last = last_chained_record(day_file.path)
        entries.append({
            "@timestamp": format_timestamp(clock()),
            "event.action": "log-purged",
            "kanmon.purge.file": str(day_file.path.relative_to(directory)),
            "kanmon.purge.stream": day_file.stream,
            "kanmon.purge.day": day_file.day.isoformat(),
            "kanmon.purge.cutoff": format_timestamp(cutoff),
            "kanmon.purge.last_sequence": last.seq if last else None,
            "kanmon.purge.last_hash": last.hash if last else None,
        })
    # Record first, then remove: a crash in between leaves a harmless extra entry.
    with open(directory / PURGE_MANIFEST, "a", encoding="utf-8") as manifest:
        for entry in entries:
            manifest.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
        manifest.flush()
        os.fsync(manifest.fileno())
    for day_file in expired:
        day_file.path.unlink()
        # the plain twin of a gzipped day (crash between compress and unlink) goes too
        twin = day_file.path.with_name(day_file.plain_name)
        if day_file.compressed and twin.exists():
            twin.unlink()
    return report


def _manifest_entries(path: Path):
    """The manifest's JSON objects; damaged lines (not UTF-8, not JSON, nested too deeply,
    not an object) are skipped -- verify then reports the chain start they would explain."""
    with open(path, "rb") as manifest:
        for raw in manifest:
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):
                continue
            if isinstance(entry, dict):
                yield entry


def purged_heads(directory: Path) -> dict[str, tuple[int, str]]:
    """Per stream, the (sequence, hash) of the newest record retention removed."""
    heads: dict[str, tuple[int, str]] = {}
    path = Path(directory) / PURGE_MANIFEST
    if not path.exists():
        return heads
    for entry in _manifest_entries(path):
        stream = entry.get("kanmon.purge.stream")
        seq, digest = entry.get("kanmon.purge.last_sequence"), entry.get("kanmon.purge.last_hash")
        if isinstance(seq, int) and isinstance(digest, str) and stream in STREAMS:
            if stream not in heads or seq > heads[stream][0]:
                heads[stream] = (seq, digest)
    return heads


def purged_hashes(directory: Path) -> dict[str, set[str]]:
    """Per stream, every chain head that retention recorded (for verify)."""
    found: dict[str, set[str]] = {}
    path = Path(directory) / PURGE_MANIFEST
    if not path.exists():
        return found
    for entry in _manifest_entries(path):
        digest = entry.get("kanmon.purge.last_hash")
        if isinstance(digest, str):
            found.setdefault(entry.get("kanmon.purge.stream"), set()).add(digest)
    return found
