"""verify(): every kind of tampering is found and named by file and line."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.logstore import LogStore, purge, verify


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


DAY1 = "proxy-2026-04-01.jsonl.gz"
DAY2 = "proxy-2026-04-02.jsonl.gz"
DAY3 = "proxy-2026-04-03.jsonl"


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Three days of proxy logs, 10 records a day: days 1-2 sealed and gzipped, day 3 open."""
    clock = Clock(datetime(2026, 4, 1, 9, 0, tzinfo=UTC))
    store = LogStore(tmp_path, clock=clock)
    for day in range(3):
        clock.now = datetime(2026, 4, 1 + day, 9, 0, tzinfo=UTC)
        for i in range(10):
            store.append("proxy", {"device.id": f"dev-{i % 3}", "source.ip": "10.8.0.5", "user.name": "sato",
                                   "url.full": f"https://example.jp/{day}/{i}", "kanmon.verdict": "allow",
                                   "rule.id": "r1"})
        store.rotate_if_needed()
    store.close()
    assert verify(tmp_path).findings == []
    return tmp_path


def read_lines(path: Path) -> list[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return handle.read().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    data = b"".join(lines)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def kinds(directory: Path) -> list[tuple[str, str, int | None]]:
    return [(f.kind, f.path.name, f.line) for f in verify(directory).findings]


def test_clean_logs_verify(logs):
    report = verify(logs)
    assert not report.tampered and report.files == 3 and report.records == 32  # 30 + 2 seals


def test_edited_record_in_open_file(logs):
    path = logs / "proxy" / DAY3
    lines = read_lines(path)
    lines[4] = lines[4].replace(b"https://example.jp/2/4", b"https://example.jp/2/X")
    write_lines(path, lines)
    assert kinds(logs) == [("edited", DAY3, 5)]
    assert verify(logs).tampered


def test_edited_record_in_compressed_file(logs):
    path = logs / "proxy" / DAY1
    lines = read_lines(path)
    lines[0] = lines[0].replace(b'"kanmon.verdict":"allow"', b'"kanmon.verdict":"block"')
    write_lines(path, lines)
    assert kinds(logs) == [("edited", DAY1, 1)]


def test_edited_record_with_its_own_hash_recomputed(logs):
    path = logs / "proxy" / DAY3
    lines = read_lines(path)
    record = json.loads(lines[2])
    record["url.full"] = "https://innocent.example/"
    del record["event.hash"]
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    digest = hashlib.sha256(body).hexdigest()
    lines[2] = body[:-1] + b',"event.hash":"' + digest.encode() + b'"}\n'
    write_lines(path, lines)
    assert kinds(logs) == [("chain-broken", DAY3, 4)]


def test_deleted_record(logs):
    path = logs / "proxy" / DAY2
    lines = read_lines(path)
    del lines[3]
    write_lines(path, lines)
    found = verify(logs).findings
    assert [(f.kind, f.path.name, f.line) for f in found] == [
        ("deleted", DAY2, 4), ("seal-mismatch", DAY2, 10)]
    assert "sequence 15-15" in found[0].detail.en


def test_inserted_duplicate_record(logs):
    path = logs / "proxy" / DAY3
    lines = read_lines(path)
    lines.insert(6, lines[1])
    write_lines(path, lines)
    assert kinds(logs) == [("inserted", DAY3, 7)]


def test_reordered_records(logs):
    path = logs / "proxy" / DAY3
    lines = read_lines(path)
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(path, lines)
    found = kinds(logs)
    assert ("deleted", DAY3, 4) not in found           # the "missing" record turned up
    assert found and all(kind == "reordered" for kind, _name, _line in found)
    assert {line for _k, _n, line in found} <= {4, 5, 6}


def test_truncated_tail_of_sealed_file(logs):
    path = logs / "proxy" / DAY1
    write_lines(path, read_lines(path)[:-3])
    found = kinds(logs)
    assert ("unsealed", DAY1, 8) in found
    assert ("deleted", DAY2, 1) in found                # the next day no longer links up


def test_truncated_compressed_bytes(logs):
    path = logs / "proxy" / DAY2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    found = kinds(logs)
    assert found[0][0] == "truncated" and found[0][1] == DAY2


def test_removed_day_file(logs):
    (logs / "proxy" / DAY2).unlink()
    found = verify(logs).findings
    assert [(f.kind, f.path.name, f.line) for f in found] == [("deleted", DAY3, 1)]
    assert "a whole day file may have been removed" in found[0].detail.en
    assert "12-22" in found[0].detail.en


def test_removed_first_file_is_tampering_but_a_purge_is_not(logs, tmp_path_factory):
    copy = tmp_path_factory.mktemp("copy")
    shutil.copytree(logs, copy, dirs_exist_ok=True)
    (copy / "proxy" / DAY1).unlink()
    assert kinds(copy) == [("chain-start-missing", DAY2, 1)]
    report = purge(logs, datetime(2026, 4, 2, tzinfo=UTC))
    assert [p.name for p in report.removed] == [DAY1]
    assert verify(logs).findings == []


def test_garbage_line_and_record_after_seal(logs):
    path = logs / "proxy" / DAY2
    lines = read_lines(path)
    lines.insert(2, b"hello\n")
    lines.append(lines[0])
    write_lines(path, lines)
    found = kinds(logs)
    assert ("unparseable", DAY2, 3) in found
    assert ("inserted", DAY2, 13) in found


def test_renamed_file_is_caught_by_its_seal(logs):
    folder = logs / "proxy"
    (folder / DAY1).rename(folder / "proxy-2026-03-31.jsonl.gz")
    found = kinds(logs)
    assert ("seal-mismatch", "proxy-2026-03-31.jsonl.gz", 11) in found


def test_every_finding_is_bilingual_and_renders_file_and_line(logs):
    path = logs / "proxy" / DAY3
    lines = read_lines(path)
    del lines[0]
    write_lines(path, lines)
    (finding,) = verify(logs).findings
    assert finding.render("en").startswith(f"{path}:1: deleted: ")
    assert "削除" in finding.render("ja")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _one_day(directory: Path, count: int) -> Path:
    store = LogStore(directory, clock=lambda: datetime(2026, 4, 1, tzinfo=UTC))
    for i in range(count):
        store.append("conn", {"device.id": f"d{i}", "destination.port": 443})
    store.close()
    return directory / "conn" / "conn-2026-04-01.jsonl"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_tampering_is_detected(tmp_path_factory, data):
    """Delete (any line but the open file's last -- see chain.py), duplicate, move, or
    change one byte: verify always reports tampering."""
    path = _one_day(tmp_path_factory.mktemp("p"), 8)
    lines = read_lines(path)
    op = data.draw(st.sampled_from(["delete", "duplicate", "move", "byte"]))
    if op == "delete":
        del lines[data.draw(st.integers(0, len(lines) - 2))]
    elif op == "duplicate":
        i = data.draw(st.integers(0, len(lines) - 1))
        lines.insert(data.draw(st.integers(0, len(lines))), lines[i])
    elif op == "move":
        i = data.draw(st.integers(0, len(lines) - 1))
        j = data.draw(st.integers(0, len(lines) - 1).filter(lambda j: j != i))
        lines.insert(j, lines.pop(i))
    else:
        raw = bytearray(b"".join(lines))
        at = data.draw(st.integers(0, len(raw) - 2))          # not the final newline
        new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]))
        raw[at] = new
        lines = [bytes(raw)]
    write_lines(path, lines)
    assert verify(path.parent.parent).tampered
