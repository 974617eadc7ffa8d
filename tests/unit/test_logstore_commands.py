"""`kanmon logs verify|search|purge` handlers, called with parsed arguments."""

from __future__ import annotations

import argparse
import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.logstore import LogStore
from gateway.cli.logs import register


NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="kanmon")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    if getattr(args, "now", "absent") is None:
        args.now = lambda: NOW
    return args.func(args)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    moment = {"now": datetime(2026, 6, 1, 8, 0, tzinfo=UTC)}
    store = LogStore(tmp_path, clock=lambda: moment["now"])
    for day in range(2):
        moment["now"] = datetime(2026, 6, 1 + day, 8, 0, tzinfo=UTC)
        for i in range(4):
            store.append("proxy", {"device.id": f"d{i % 2}", "rule.id": "r-webmail",
                                   "kanmon.verdict": "block" if i == 3 else "allow",
                                   "url.full": f"https://m.jp/{day}/{i}", "user.name": "鈴木"})
        moment["now"] += timedelta(days=1)
        store.rotate_if_needed()
    store.close()
    return tmp_path


def test_verify_ok_then_tampered(logs, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "both")
    assert run("logs", "verify", "--dir", str(logs)) == 0
    out = capsys.readouterr().out
    assert "改ざんは検出されませんでした" in out and "no tampering found (2 files, 10 records)" in out
    path = logs / "proxy" / "proxy-2026-06-02.jsonl.gz"
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    del lines[1]
    path.write_bytes(gzip.compress(b"".join(lines)))
    assert run("logs", "verify", "--dir", str(logs)) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: deleted:" in out and "tampering or loss detected" in out
    assert run("logs", "verify", "--dir", str(logs), "--json") == 1
    findings = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert findings[0]["kind"] == "deleted" and findings[0]["line"] == 2 and findings[0]["tamper"]


def test_missing_directory_is_a_usage_error(tmp_path, capsys):
    for sub in ("verify", "purge"):
        assert run("logs", sub, "--dir", str(tmp_path / "nope")) == 2
    assert run("logs", "search", "--dir", str(tmp_path / "nope"), "--stream", "proxy") == 2
    err = capsys.readouterr().err
    assert "ログディレクトリがありません" in err and "log directory does not exist" in err


def test_search_json_with_filters(logs, capsys):
    code = run("logs", "search", "--dir", str(logs), "--stream", "proxy", "--device", "d1",
               "--since", "2026-06-02", "--until", "2026-06-03T00:00:00+09:00", "--json")
    assert code == 0
    captured = capsys.readouterr()
    records = [json.loads(l) for l in captured.out.splitlines()]
    # until 2026-06-03T00:00+09:00 = 2026-06-02T15:00Z: day 2 only
    assert [r["url.full"] for r in records] == ["https://m.jp/1/1", "https://m.jp/1/3"]
    assert records[0]["user.name"] == "鈴木"
    assert "2 件" in captured.err
    assert run("logs", "search", "--dir", str(logs), "--stream", "proxy", "--verdict", "block") == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 and all("\tblock\tr-webmail\t" in row for row in table)


def test_search_rejects_bad_times(logs, capsys):
    assert run("logs", "search", "--dir", str(logs), "--stream", "proxy", "--since", "yesterday") == 2
    err = capsys.readouterr().err
    assert "日時を解釈できません" in err and "cannot parse time: --since 'yesterday'" in err
    assert run("logs", "search", "--dir", str(logs), "--stream", "proxy",
               "--since", "2026-06-02", "--until", "2026-06-01") == 2


def test_purge_dry_run_then_real(logs, capsys):
    files = sorted(p.name for p in (logs / "proxy").iterdir())
    # NOW = June 10: 8 days' retention keeps June 2 (ends June 3 00:00 > June 2 12:00) only
    assert run("logs", "purge", "--dir", str(logs), "--retention-days", "1", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would remove (--dry-run)" in out and "削除予定" in out
    assert sorted(p.name for p in (logs / "proxy").iterdir()) == files
    assert run("logs", "purge", "--dir", str(logs), "--retention-days", "100000") == 0
    assert "removed 0 file(s)" in capsys.readouterr().out
    assert run("logs", "purge", "--dir", str(logs), "--retention-days", "8") == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (logs / "proxy").iterdir()) == ["proxy-2026-06-02.jsonl.gz"]
    assert run("logs", "purge", "--dir", str(logs), "--retention-days", "1") == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert list((logs / "proxy").iterdir()) == []
    assert run("logs", "purge", "--dir", str(logs), "--retention-days", "0") == 2
