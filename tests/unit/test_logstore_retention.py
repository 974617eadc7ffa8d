"""purge(): removes exactly the day files entirely older than the cutoff, nothing else."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from gateway.logstore import DEFAULT_RETENTION_DAYS, LogStore, purge, retention_cutoff, verify


def build(directory: Path, days: list[date], streams=("proxy", "auth")) -> None:
    moment = {"now": datetime.combine(days[0], datetime.min.time(), tzinfo=UTC)}
    store = LogStore(directory, clock=lambda: moment["now"])
    for day in days:
        moment["now"] = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
        for stream in streams:
            store.append(stream, {"device.id": "d1", "day": day.isoformat()})
        store.rotate_if_needed()
    moment["now"] += timedelta(days=1)       # seal and compress the last day too
    store.rotate_if_needed()
    store.close()


def names(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_default_retention_is_three_years():
    assert DEFAULT_RETENTION_DAYS >= 3 * 366 - 2
    now = datetime(2029, 6, 1, 3, 0, tzinfo=UTC)
    assert retention_cutoff(now) == now - timedelta(days=1096)
    with pytest.raises(ValueError):
        retention_cutoff(now, 0)


def test_purge_removes_exactly_the_expired_files(tmp_path):
    days = [date(2026, 1, 1) + timedelta(days=i) for i in range(6)]     # Jan 1..6
    build(tmp_path, days)
    (tmp_path / "README.txt").write_text("operator notes")
    (tmp_path / "proxy" / "notes.jsonl").write_text("{}\n")
    (tmp_path / "proxy" / "proxy-2025-12-31.jsonl.gz.tmp").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "other-2020-01-01.jsonl").write_text("{}\n")
    before = names(tmp_path)

    # Cutoff 2026-01-03 12:00: Jan 1 and Jan 2 end before it; Jan 3 does not (ends Jan 4 00:00).
    report = purge(tmp_path, datetime(2026, 1, 3, 12, 0, tzinfo=UTC))
    expected = {f"{s}/{s}-2026-01-0{d}.jsonl.gz" for s in ("proxy", "auth") for d in (1, 2)}
    assert {str(p.relative_to(tmp_path)) for p in report.removed} == expected
    assert report.kept == 8 and report.removed_bytes > 0
    assert names(tmp_path) == (before - expected) | {"purged.jsonl"}
    assert not verify(tmp_path).tampered


def test_cutoff_boundary_is_exact(tmp_path):
    build(tmp_path, [date(2026, 1, 1), date(2026, 1, 2)], streams=("dns",))
    assert purge(tmp_path, datetime(2026, 1, 1, 23, 59, 59, 999999, tzinfo=UTC)).removed == []
    removed = purge(tmp_path, datetime(2026, 1, 2, 0, 0, tzinfo=UTC)).removed
    assert [p.name for p in removed] == ["dns-2026-01-01.jsonl.gz"]
    assert purge(tmp_path, date(2026, 1, 2)).removed == []               # date = midnight UTC


def test_dry_run_removes_nothing(tmp_path):
    build(tmp_path, [date(2026, 1, 1), date(2026, 1, 2)])
    before = names(tmp_path)
    report = purge(tmp_path, date(2026, 1, 3), dry_run=True)
    assert len(report.removed) == 4 and report.dry_run
    assert names(tmp_path) == before


def test_manifest_records_chain_heads_and_writer_continues_after_purging_everything(tmp_path):
    build(tmp_path, [date(2026, 1, 1)], streams=("audit",))
    purge(tmp_path, date(2026, 1, 5))
    (entry,) = [json.loads(line) for line in (tmp_path / "purged.jsonl").read_text().splitlines()]
    assert entry["kanmon.purge.file"] == "audit/audit-2026-01-01.jsonl.gz"
    assert entry["kanmon.purge.last_sequence"] == 2                    # record + seal
    with LogStore(tmp_path, clock=lambda: datetime(2026, 1, 6, tzinfo=UTC)) as store:
        store.append("audit", {"user.name": "admin"})
    (line,) = (tmp_path / "audit" / "audit-2026-01-06.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["event.sequence"] == 3 and record["kanmon.prev_hash"] == entry["kanmon.purge.last_hash"]
    assert verify(tmp_path).findings == []


def test_naive_cutoff_is_refused(tmp_path):
    with pytest.raises(ValueError, match="timezone"):
        purge(tmp_path, datetime(2026, 1, 1))
