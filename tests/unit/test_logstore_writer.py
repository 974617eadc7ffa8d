"""LogStore: chaining, durability, field hygiene, write errors, rotation, crash recovery."""

from __future__ import annotations

import errno
import gzip
import json
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.logstore import (GENESIS, LogStore, LogWriteError, missing_required_fields, search,
                              verdict_fields, verify)
from gateway.logstore.chain import decode_chained
from gateway.verdict import Action, Stage, Verdict


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def lines(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return [json.loads(raw) for raw in handle]


def proxy_record(i: int, device: str = "dev-a") -> dict:
    return {"device.id": device, "source.ip": "10.8.0.2", "user.name": "tanaka",
            "url.full": f"https://example.jp/{i}", "http.request.method": "GET",
            "kanmon.verdict": "allow", "rule.id": "web-allow-1"}


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))


def test_append_writes_chained_line_visible_before_close(tmp_path, clock):
    store = LogStore(tmp_path, clock=clock)
    store.append("proxy", proxy_record(1))
    store.append("proxy", proxy_record(2))
    path = tmp_path / "proxy" / "proxy-2026-03-01.jsonl"
    written = lines(path)                     # read while the store is still open
    assert [r["event.sequence"] for r in written] == [1, 2]
    assert written[0]["kanmon.prev_hash"] == GENESIS
    assert written[1]["kanmon.prev_hash"] == written[0]["event.hash"]
    assert written[0]["@timestamp"] == "2026-03-01T12:00:00.000000Z"
    assert written[1]["url.full"] == "https://example.jp/2"
    assert store.records_written == 2
    store.close()


def test_given_timestamp_is_kept_and_datetimes_are_written_as_utc(tmp_path, clock):
    with LogStore(tmp_path, clock=clock) as store:
        store.append("dns", {"@timestamp": "2026-03-01T11:59:59.500000Z", "dns.question.name": "a.jp"})
        jst = datetime(2026, 3, 1, 21, 0, tzinfo=UTC).astimezone(
            __import__("datetime").timezone(timedelta(hours=9)))
        store.append("dns", {"@timestamp": jst, "dns.question.name": "b.jp"})
    first, second = lines(tmp_path / "dns" / "dns-2026-03-01.jsonl")
    assert first["@timestamp"] == "2026-03-01T11:59:59.500000Z"
    assert second["@timestamp"] == "2026-03-01T21:00:00.000000Z"


def test_caller_cannot_forge_chain_fields(tmp_path, clock):
    with LogStore(tmp_path, clock=clock) as store:
        store.append("proxy", {**proxy_record(1), "event.sequence": 99, "event.hash": "f" * 64,
                               "kanmon.prev_hash": "e" * 64})
    (record,) = lines(tmp_path / "proxy" / "proxy-2026-03-01.jsonl")
    assert record["event.sequence"] == 1 and record["kanmon.prev_hash"] == GENESIS
    assert record["event.hash"] != "f" * 64


def test_store_strips_passwords_cookies_authorization_and_bodies(tmp_path, clock):
    with LogStore(tmp_path, clock=clock) as store:
        store.append("proxy", {
            **proxy_record(1),
            "user.password": "hunter2",
            "http.request.headers": {"Cookie": "SID=1", "Authorization": "Bearer x", "accept": "*/*"},
            "http.request.body.content": "secret form",
            "http.request.body.bytes": 11,
            "body": "raw",
            "kanmon.audit.after": [{"name": "x", "Password": "p"}],
        })
        assert store.stripped_records == 1
    raw = (tmp_path / "proxy" / "proxy-2026-03-01.jsonl").read_text()
    for secret in ("hunter2", "SID=1", "Bearer x", "secret form", '"raw"', '"p"'):
        assert secret not in raw
    (record,) = lines(tmp_path / "proxy" / "proxy-2026-03-01.jsonl")
    assert record["http.request.body.bytes"] == 11
    assert record["http.request.headers"] == {"accept": "*/*"}
    assert record["kanmon.audit.after"] == [{"name": "x"}]
    assert record["kanmon.stripped_fields"] == sorted([
        "user.password", "http.request.headers.Cookie", "http.request.headers.Authorization",
        "http.request.body.content", "body", "kanmon.audit.after.Password"])


def test_urls_are_redacted_unless_disabled(tmp_path, clock):
    record = {**proxy_record(1), "url.full": "https://idp.example/cb?code=abc123&state=s1",
              "url.query": "access_token=zzz&x=1"}
    with LogStore(tmp_path / "on", clock=clock) as store:
        store.append("proxy", record)
    with LogStore(tmp_path / "off", clock=clock, redaction=None) as store:
        store.append("proxy", record)
    (on,) = lines(tmp_path / "on" / "proxy" / "proxy-2026-03-01.jsonl")
    (off,) = lines(tmp_path / "off" / "proxy" / "proxy-2026-03-01.jsonl")
    assert on["url.full"] == "https://idp.example/cb?code=REDACTED&state=s1"
    assert on["url.query"] == "access_token=REDACTED&x=1"
    assert off["url.full"] == record["url.full"]


def test_unknown_stream_and_bad_fsync_mode_are_refused(tmp_path, clock):
    with pytest.raises(ValueError, match="unknown log stream"):
        LogStore(tmp_path, clock=clock).append("web", {})
    with pytest.raises(ValueError, match="fsync"):
        LogStore(tmp_path, clock=clock, fsync="sometimes")


class FailingFile:
    """Wraps a real append file; fails writes with ``error`` while ``failing`` is set,
    optionally after writing ``partial`` bytes of the line."""

    def __init__(self, path: Path, control: dict):
        self.real = open(path, "ab", buffering=0)
        self.control = control

    def write(self, data) -> int:
        if self.control["failing"]:
            partial = self.control.get("partial", 0)
            if partial:
                self.real.write(bytes(data[:partial]))
            raise OSError(self.control.get("errno", errno.ENOSPC), os.strerror(self.control.get("errno", errno.ENOSPC)))
        return self.real.write(data)

    def fileno(self) -> int:
        return self.real.fileno()

    def close(self) -> None:
        self.real.close()


@pytest.mark.parametrize("partial", [0, 37])
def test_write_error_is_reported_raised_rolled_back_and_recovers(tmp_path, clock, partial):
    control = {"failing": False, "partial": partial}
    seen: list[tuple[str, Exception]] = []
    store = LogStore(tmp_path, clock=clock, opener=lambda p: FailingFile(p, control),
                     on_write_error=lambda stream, exc: seen.append((stream, exc)))
    store.append("conn", {"device.id": "d1"})
    control["failing"] = True
    with pytest.raises(LogWriteError) as caught:
        store.append("conn", {"device.id": "d2"})
    assert caught.value.stream == "conn"
    assert isinstance(caught.value.cause, OSError) and caught.value.cause.errno == errno.ENOSPC
    assert "ログ" in caught.value.text.ja and "cannot write" in caught.value.text.en
    assert [(s, e.errno) for s, e in seen] == [("conn", errno.ENOSPC)]
    assert store.write_errors == 1
    path = tmp_path / "conn" / "conn-2026-03-01.jsonl"
    assert path.read_bytes().endswith(b"}\n") and len(lines(path)) == 1   # partial line cut off
    control["failing"] = False
    store.append("conn", {"device.id": "d3"})
    store.close()
    records = lines(path)
    assert [r.get("device.id") for r in records] == ["d1", "d3"]
    assert [r["event.sequence"] for r in records] == [1, 2]
    assert not verify(tmp_path).findings


def test_real_enospc_from_dev_full(tmp_path, clock):
    store = LogStore(tmp_path, clock=clock, opener=lambda p: open("/dev/full", "wb", buffering=0))
    with pytest.raises(LogWriteError) as caught:
        store.append("auth", {"device.id": "d1"})
    assert caught.value.cause.errno == errno.ENOSPC
    assert store.write_errors == 1


def test_day_change_seals_gzips_and_continues_the_chain(tmp_path):
    clock = Clock(datetime(2026, 3, 1, 23, 59, 58, tzinfo=UTC))
    store = LogStore(tmp_path, clock=clock)
    store.append("proxy", proxy_record(1))
    store.append("proxy", proxy_record(2))
    clock.advance(seconds=3)                          # 2026-03-02 00:00:01
    assert store.rotate_if_needed() == [tmp_path / "proxy" / "proxy-2026-03-01.jsonl.gz"]
    assert not (tmp_path / "proxy" / "proxy-2026-03-01.jsonl").exists()
    store.append("proxy", proxy_record(3))
    store.close()
    day1 = lines(tmp_path / "proxy" / "proxy-2026-03-01.jsonl.gz")
    day2 = lines(tmp_path / "proxy" / "proxy-2026-03-02.jsonl")
    seal = day1[-1]
    assert seal["event.action"] == "log-sealed"
    assert seal["kanmon.seal.file"] == "proxy-2026-03-01.jsonl"
    assert (seal["kanmon.seal.first_sequence"], seal["kanmon.seal.last_sequence"], seal["kanmon.seal.records"]) == (1, 2, 2)
    assert day2[0]["event.sequence"] == seal["event.sequence"] + 1 == 4
    assert day2[0]["kanmon.prev_hash"] == seal["event.hash"]
    report = verify(tmp_path)
    assert report.findings == [] and report.records == 4 and report.files == 2


def test_append_after_midnight_seals_without_waiting_for_rotate(tmp_path):
    clock = Clock(datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC))
    store = LogStore(tmp_path, clock=clock)
    store.append("dns", {"dns.question.name": "a.jp"})
    clock.advance(seconds=2)
    store.append("dns", {"dns.question.name": "b.jp"})
    old = tmp_path / "dns" / "dns-2026-03-01.jsonl"
    assert lines(old)[-1]["event.action"] == "log-sealed"     # sealed, still plain
    assert store.rotate_if_needed() == [old.with_name(old.name + ".gz")]
    store.close()
    assert verify(tmp_path).findings == []


def test_idle_stream_is_sealed_by_rotate(tmp_path):
    clock = Clock(datetime(2026, 3, 1, 10, 0, tzinfo=UTC))
    store = LogStore(tmp_path, clock=clock)
    store.append("audit", {"user.name": "admin", "event.action": "device-revoke", "event.outcome": "success"})
    clock.advance(days=1)
    store.rotate_if_needed()
    assert lines(tmp_path / "audit" / "audit-2026-03-01.jsonl.gz")[-1]["event.action"] == "log-sealed"
    store.close()


def test_restart_same_day_continues_the_file(tmp_path, clock):
    with LogStore(tmp_path, clock=clock) as store:
        store.append("proxy", proxy_record(1))
    with LogStore(tmp_path, clock=clock) as store:
        store.append("proxy", proxy_record(2))
    records = lines(tmp_path / "proxy" / "proxy-2026-03-01.jsonl")
    assert [r["event.sequence"] for r in records] == [1, 2]
    assert records[1]["kanmon.prev_hash"] == records[0]["event.hash"]
    assert verify(tmp_path).findings == []


def test_restart_next_day_seals_the_file_a_crash_left_open(tmp_path, clock):
    store = LogStore(tmp_path, clock=clock)
    store.append("proxy", proxy_record(1))
    store._open["proxy"].handle.close()          # "crash": no seal, no close()
    clock.advance(days=2)
    with LogStore(tmp_path, clock=clock) as fresh:
        fresh.append("proxy", proxy_record(2))
        fresh.rotate_if_needed()
    old = lines(tmp_path / "proxy" / "proxy-2026-03-01.jsonl.gz")
    assert old[-1]["event.action"] == "log-sealed" and old[-1]["kanmon.seal.records"] == 1
    new = lines(tmp_path / "proxy" / "proxy-2026-03-03.jsonl")
    assert new[0]["kanmon.prev_hash"] == old[-1]["event.hash"]
    assert verify(tmp_path).findings == []


def test_torn_final_line_is_marked_on_open_and_explained_by_verify(tmp_path, clock):
    with LogStore(tmp_path, clock=clock) as store:
        for i in range(3):
            store.append("proxy", proxy_record(i))
    path = tmp_path / "proxy" / "proxy-2026-03-01.jsonl"
    size = path.stat().st_size
    fragment = b'{"@timestamp":"2026-03-01T12:00:00.000000Z","device.id":"dev-'
    with open(path, "ab") as handle:           # what a crash mid-write leaves
        handle.write(fragment)

    before = verify(tmp_path)
    assert not before.tampered
    assert [(f.kind, f.line) for f in before.findings] == [("torn-open", 4)]

    with LogStore(tmp_path, clock=clock) as store:
        store.append("proxy", proxy_record(9))
        assert store.recovered_tails == 1
    raw = path.read_bytes().splitlines()
    assert raw[3] == fragment                   # kept, not silently dropped
    marker = json.loads(raw[4])
    assert marker["event.action"] == "log-recovered"
    assert marker["kanmon.recovery.offset"] == size
    assert marker["kanmon.recovery.length"] == len(fragment)
    assert marker["event.sequence"] == 4 and json.loads(raw[5])["event.sequence"] == 5
    after = verify(tmp_path)
    assert not after.tampered
    assert [(f.kind, f.line, f.tamper) for f in after.findings] == [("torn-recovered", 4, False)]
    assert [r["url.full"] for r in search(tmp_path, "proxy")][-1] == "https://example.jp/9"


def test_garbage_line_is_not_explained_away_as_a_crash(tmp_path, clock):
    with LogStore(tmp_path, clock=clock) as store:
        store.append("proxy", proxy_record(1))
    path = tmp_path / "proxy" / "proxy-2026-03-01.jsonl"
    with open(path, "ab") as handle:
        handle.write(b"not a record\n")
    with LogStore(tmp_path, clock=clock) as store:
        store.append("proxy", proxy_record(2))
        assert store.recovered_tails == 0
    report = verify(tmp_path)
    assert report.tampered and [(f.kind, f.line) for f in report.findings] == [("unparseable", 2)]


def test_fsync_always_syncs_each_record(tmp_path, clock, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    with LogStore(tmp_path, clock=clock, fsync="always") as store:
        store.append("proxy", proxy_record(1))     # also fsyncs the new file's directory entry
        calls.clear()
        store.append("proxy", proxy_record(2))
        store.append("proxy", proxy_record(3))
        assert len(calls) == 2
    with LogStore(tmp_path / "r", clock=clock, fsync="rotate") as store:
        store.append("proxy", proxy_record(1))
        calls.clear()
        store.append("proxy", proxy_record(2))
        assert calls == []


def test_on_record_gets_each_line_and_its_failures_never_raise(tmp_path, clock):
    got: list[tuple[str, str]] = []
    with LogStore(tmp_path, clock=clock, on_record=lambda s, line: got.append((s, line))) as store:
        store.append("mail", {"email.from.address": "a@example.jp"})
    assert got[0][0] == "mail" and json.loads(got[0][1])["email.from.address"] == "a@example.jp"

    def broken(stream: str, line: str) -> None:
        raise ConnectionError("collector down")
    with LogStore(tmp_path / "b", clock=clock, on_record=broken) as store:
        store.append("mail", {})
        assert store.forward_errors == 1 and store.records_written == 1


def test_concurrent_appends_keep_one_chain(tmp_path, clock):
    store = LogStore(tmp_path, clock=clock)

    def work(n: int) -> None:
        for i in range(300):
            store.append("conn", {"device.id": f"d{n}", "n": i})
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    records = lines(tmp_path / "conn" / "conn-2026-03-01.jsonl")
    assert [r["event.sequence"] for r in records] == list(range(1, 1201))
    assert verify(tmp_path).findings == []


def test_clock_stepping_back_keeps_writing_forward(tmp_path):
    clock = Clock(datetime(2026, 3, 2, 0, 0, 5, tzinfo=UTC))
    with LogStore(tmp_path, clock=clock) as store:
        store.append("dns", {"n": 1})
    clock.advance(seconds=-10)                 # NTP step back over midnight, then restart
    with LogStore(tmp_path, clock=clock) as store:
        store.append("dns", {"n": 2})
    assert [r["n"] for r in lines(tmp_path / "dns" / "dns-2026-03-02.jsonl")] == [1, 2]
    assert not (tmp_path / "dns" / "dns-2026-03-01.jsonl").exists()
    assert verify(tmp_path).findings == []


def test_unencodable_value_is_a_write_error_not_a_crash(tmp_path, clock):
    errors = []
    store = LogStore(tmp_path, clock=clock, on_write_error=lambda s, e: errors.append(e))
    with pytest.raises(LogWriteError):
        store.append("proxy", {"x": float("nan")})
    store.append("proxy", {"payload": b"\x00binary"})     # bytes: only their size is written
    store.close()
    (record,) = lines(tmp_path / "proxy" / "proxy-2026-03-01.jsonl")
    assert record["payload"] == "<7 bytes>" and len(errors) == 1


def test_required_fields_and_verdict_mapping():
    verdict = Verdict(Action.BLOCK, "web-deny-3", "webmail is banned", Stage.REQUEST, category="webmail")
    record = {"@timestamp": "x", "device.id": "d", "source.ip": "10.8.0.2", "user.name": "u",
              **verdict_fields(verdict), "url.full": "https://m.example/", "http.request.method": "GET"}
    assert missing_required_fields("proxy", record) == []
    assert record["kanmon.verdict"] == "block" and record["event.type"] == ["denied"]
    assert record["rule.category"] == "webmail" and record["event.reason"] == "webmail is banned"
    del record["rule.id"]
    assert missing_required_fields("proxy", record) == ["rule.id"]
    assert missing_required_fields("conn", {"device": {"id": "d"}})[:2] == ["@timestamp", "source.ip"]


def test_decode_rejects_lines_that_are_not_chained_records():
    assert decode_chained(b"") is None
    assert decode_chained(b'{"a":1}\n') is None
    assert decode_chained(b"[1,2]") is None


def test_fsync_interval_bounds_syncs(tmp_path, clock, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    with LogStore(tmp_path / "every", clock=clock, fsync="interval", fsync_interval=0) as store:
        store.append("proxy", proxy_record(1))
        calls.clear()
        for i in range(3):
            store.append("proxy", proxy_record(i))
        assert len(calls) == 3
    with LogStore(tmp_path / "hourly", clock=clock, fsync="interval", fsync_interval=3600) as store:
        store.append("proxy", proxy_record(1))
        calls.clear()
        for i in range(3):
            store.append("proxy", proxy_record(i))
        assert calls == []


def test_failed_compression_keeps_the_sealed_file_and_retries(tmp_path, monkeypatch):
    from gateway.logstore import rotation
    clock = Clock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    errors = []
    store = LogStore(tmp_path, clock=clock, on_write_error=lambda s, e: errors.append((s, e.errno)))
    store.append("proxy", proxy_record(1))
    clock.advance(days=1)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rotation.shutil, "copyfileobj", full)
    assert store.rotate_if_needed() == []
    folder = tmp_path / "proxy"
    assert sorted(p.name for p in folder.iterdir()) == ["proxy-2026-03-01.jsonl"]
    assert store.compress_errors == 1 and errors == [("proxy", errno.ENOSPC)]
    monkeypatch.undo()
    assert [p.name for p in store.rotate_if_needed()] == ["proxy-2026-03-01.jsonl.gz"]
    store.close()
    assert verify(tmp_path).findings == []


def test_write_error_handler_may_log_to_another_stream(tmp_path, clock):
    control = {"failing": False}
    opener = lambda p: FailingFile(p, control) if p.parent.name == "proxy" else open(p, "ab", buffering=0)
    store: LogStore

    def report(stream: str, exc: Exception) -> None:
        store.append("audit", {"user.name": "kanmon", "event.action": "log-write-failed",
                               "event.outcome": "failure", "event.reason": f"{stream}: {exc}"})
    store = LogStore(tmp_path, clock=clock, opener=opener, on_write_error=report)
    control["failing"] = True
    with pytest.raises(LogWriteError):
        store.append("proxy", proxy_record(1))
    store.close()
    (audit,) = lines(tmp_path / "audit" / "audit-2026-03-01.jsonl")
    assert audit["event.action"] == "log-write-failed" and "proxy" in audit["event.reason"]


def test_restart_finds_the_chain_head_behind_a_record_larger_than_one_read(tmp_path, clock):
    big = {"user.name": "admin", "event.action": "policy-reloaded",
           "kanmon.audit.after": {"rules": ["x" * 100] * 2000}}       # ~200 KB line
    with LogStore(tmp_path, clock=clock) as store:
        store.append("audit", {"user.name": "admin"})
        store.append("audit", big)
    with LogStore(tmp_path, clock=clock) as store:
        store.append("audit", {"user.name": "admin"})
    records = lines(tmp_path / "audit" / "audit-2026-03-01.jsonl")
    assert [r["event.sequence"] for r in records] == [1, 2, 3]
    assert verify(tmp_path).findings == []


def test_open_streams_up_front_then_empty_days_seal_cleanly(tmp_path):
    clock = Clock(datetime(2026, 3, 1, 8, 0, tzinfo=UTC))
    store = LogStore(tmp_path, clock=clock)
    store.open_streams()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["proxy", "conn", "dns", "auth", "mail", "audit"])
    store.append("dns", {"dns.question.name": "a.jp"})
    clock.advance(days=1)
    store.rotate_if_needed()
    store.close()
    seal = lines(tmp_path / "mail" / "mail-2026-03-01.jsonl.gz")[-1]
    assert seal["kanmon.seal.records"] == 0 and seal["event.sequence"] == 1
    assert verify(tmp_path).findings == []
