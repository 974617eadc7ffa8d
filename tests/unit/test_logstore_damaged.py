"""Damaged day files and hostile lines (issue #15): `logs verify` and `logs search` name the
file and line of a damaged .gz day, a line nested 100k deep or garbage, in both languages,
and carry on with the rest -- no traceback, no silently skipped file."""

from __future__ import annotations

import argparse
import gzip
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.logstore import LogStore, search, verify
from gateway.cli.logs import register


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


DAY1 = "proxy-2026-04-01.jsonl.gz"
DAY3 = "proxy-2026-04-03.jsonl"
# Ends like a chained record, so it is parsed, and is nested far deeper than the recursion limit.
DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b',"event.hash":"' + b"0" * 64 + b'"}\n'


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    clock = Clock(datetime(2026, 4, 1, 9, 0, tzinfo=UTC))
    store = LogStore(tmp_path, clock=clock)
    for day in range(3):
        clock.now = datetime(2026, 4, 1 + day, 9, 0, tzinfo=UTC)
        for i in range(10):
            store.append("proxy", {"device.id": f"dev-{i % 3}", "url.full": f"https://example.jp/{day}/{i}"})
        store.rotate_if_needed()
    store.close()
    return tmp_path


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def damage_gzip(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "zeroed":
        data[20:len(data) - 8] = b"\x00" * (len(data) - 28)
    elif how == "cut":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"this was never gzip\n" * 5)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeroed", "cut", "not-gzip"])
def test_a_damaged_gz_day_is_named_and_the_other_days_still_searched(logs, capsys, how):
    damage_gzip(logs / "proxy" / DAY1, how)
    problems = []
    found = list(search(logs, "proxy", on_problem=lambda p, n, t: problems.append((p.name, n, t))))
    for day in ("1", "2"):                             # days 2 and 3 complete (day 1: what precedes the damage)
        assert len([r for r in found if r["url.full"].split("/")[3] == day]) == 10
    assert [(name, type(n)) for name, n, _ in problems] == [(DAY1, int)]
    assert "damaged" in problems[0][2].en and "壊れている" in problems[0][2].ja

    assert run("logs", "search", "--dir", str(logs), "--stream", "proxy") == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) >= 20
    assert f"{DAY1}:" in captured.err and "Traceback" not in captured.err

    report = verify(logs)
    damaged = [f for f in report.findings if f.path.name == DAY1]
    assert damaged and damaged[0].kind == "truncated" and damaged[0].line is not None
    assert report.records >= 20                         # the other days were verified too


def test_a_line_nested_100k_deep_is_reported_not_a_traceback(logs, capsys):
    day3 = logs / "proxy" / DAY3
    with open(day3, "ab") as handle:
        handle.write(DEEP)
    line = len(day3.read_bytes().splitlines())
    findings = verify(logs).findings
    assert [(f.kind, f.path.name, f.line) for f in findings] == [("unparseable", DAY3, line)]
    problems = []
    found = list(search(logs, "proxy", on_problem=lambda p, n, t: problems.append((p.name, n))))
    assert len(found) == 30 and problems == [(DAY3, line)]
    assert run("logs", "verify", "--dir", str(logs)) == 1
    assert f"{DAY3}:{line}: unparseable" in capsys.readouterr().out


def test_garbage_lines_are_reported_by_search_with_file_and_line(logs, capsys):
    day3 = logs / "proxy" / DAY3
    lines = day3.read_bytes().splitlines(keepends=True)
    lines.insert(3, b"\xff\xfe\x00garbage\n")
    lines.insert(6, b"[1, 2, 3]\n")
    day3.write_bytes(b"".join(lines))
    assert run("logs", "search", "--dir", str(logs), "--stream", "proxy") == 1
    err = capsys.readouterr().err
    assert f"{DAY3}:4:" in err and f"{DAY3}:7:" in err
    assert "読めない行" in err and "not readable JSON" in err


def test_a_damaged_purge_manifest_does_not_stop_verify(logs):
    (logs / "purged.jsonl").write_bytes(b"\xff\xfe not utf-8\n" + DEEP + b"[1]\n")
    assert verify(logs).findings == []


def test_the_writer_resumes_after_a_deep_line_at_the_end(logs):
    day3 = logs / "proxy" / DAY3
    with gzip.open(logs / "proxy" / "proxy-2026-04-02.jsonl.gz", "rb") as handle:
        assert handle.read()                            # untouched
    with open(day3, "ab") as handle:
        handle.write(DEEP)
    store = LogStore(logs, clock=Clock(datetime(2026, 4, 3, 12, 0, tzinfo=UTC)))
    store.append("proxy", {"device.id": "dev-9", "url.full": "https://example.jp/after"})
    store.close()
    kinds = [f.kind for f in verify(logs).findings]
    assert kinds == ["unparseable"]                     # the chain continues past it
