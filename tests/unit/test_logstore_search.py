"""search(): streams matching records out of plain and gzipped day files."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.logstore import LogStore, search


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    """Five days; each day 40 proxy records over devices d0-d3, rules r0-r1, block every 5th."""
    directory = tmp_path_factory.mktemp("logs")
    moment = {"now": datetime(2026, 5, 1, tzinfo=UTC)}
    store = LogStore(directory, clock=lambda: moment["now"])
    for day in range(5):
        for i in range(40):
            moment["now"] = datetime(2026, 5, 1 + day, tzinfo=UTC) + timedelta(minutes=30 * i)
            store.append("proxy", {"device.id": f"d{i % 4}", "rule.id": f"r{i % 2}",
                                   "kanmon.verdict": "block" if i % 5 == 0 else "allow",
                                   "url.full": f"https://e.jp/{day}/{i}"})
        store.rotate_if_needed()
    # a request that started before midnight, written after it (in the next day's file)
    moment["now"] = datetime(2026, 5, 6, 0, 0, 1, tzinfo=UTC)
    store.append("proxy", {"@timestamp": "2026-05-05T23:59:59.000000Z", "device.id": "late",
                           "kanmon.verdict": "allow", "rule.id": "r0"})
    store.close()
    return directory


def test_files_are_mixed_plain_and_gzip(logs):
    names = sorted(p.name for p in (logs / "proxy").iterdir())
    assert names[0].endswith(".gz") and names[-1] == "proxy-2026-05-06.jsonl"


def test_no_filter_returns_every_record_without_chain_records(logs):
    records = list(search(logs, "proxy"))
    assert len(records) == 201
    assert not any(r.get("event.action") == "log-sealed" for r in records)
    assert len(list(search(logs, "proxy", include_chain_records=True))) == 206


def test_filters_combine(logs):
    d1 = list(search(logs, "proxy", device="d1"))
    assert len(d1) == 50 and {r["device.id"] for r in d1} == {"d1"}
    blocks = list(search(logs, "proxy", verdict="block"))
    assert len(blocks) == 40 and all(r["kanmon.verdict"] == "block" for r in blocks)
    both = list(search(logs, "proxy", device="d0", rule="r0", verdict="block"))
    # i % 4 == 0 and i % 5 == 0 -> i in {0, 20} per day
    assert len(both) == 10
    assert list(search(logs, "proxy", device="nope")) == []


def test_device_value_inside_another_field_does_not_match(logs):
    # "d1" also appears in no other field, but "r0" is a prefix-free value: check exactness
    assert list(search(logs, "proxy", device="d")) == []


def test_time_range_is_inclusive_exclusive(logs):
    since = datetime(2026, 5, 2, 1, 0, tzinfo=UTC)
    until = datetime(2026, 5, 2, 3, 0, tzinfo=UTC)
    got = [r["@timestamp"] for r in search(logs, "proxy", since, until)]
    assert got == ["2026-05-02T01:00:00.000000Z", "2026-05-02T01:30:00.000000Z",
                   "2026-05-02T02:00:00.000000Z", "2026-05-02T02:30:00.000000Z"]


def test_record_written_after_midnight_is_found_by_its_timestamp(logs):
    got = list(search(logs, "proxy", datetime(2026, 5, 5, 23, 0, tzinfo=UTC),
                      datetime(2026, 5, 6, tzinfo=UTC), device="late"))
    assert [r["device.id"] for r in got] == ["late"]


def test_search_is_lazy_and_skips_damaged_lines(tmp_path):
    with LogStore(tmp_path, clock=lambda: datetime(2026, 5, 1, tzinfo=UTC)) as store:
        store.append("dns", {"device.id": "a", "dns.question.name": "x.jp"})
    path = tmp_path / "dns" / "dns-2026-05-01.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"device.id":"a", torn')
    results = search(tmp_path, "dns", device="a")
    assert iter(results) is results                       # a generator, not a list
    assert [r["dns.question.name"] for r in results] == ["x.jp"]


def test_naive_bounds_are_refused(logs):
    with pytest.raises(ValueError):
        list(search(logs, "proxy", since=datetime(2026, 5, 1)))


def test_gzip_is_read_as_a_stream(logs, monkeypatch):
    """search never reads a whole compressed file at once."""
    calls = []
    real_read = gzip.GzipFile.read

    def spy(self, size=-1):
        calls.append(size)
        return real_read(self, size)
    monkeypatch.setattr(gzip.GzipFile, "read", spy)
    assert len(list(search(logs, "proxy", device="d2"))) == 50
    assert -1 not in calls and None not in calls
