"""Signed checkpoints anchor each chain's end outside the log directory (issue #15): verify
finds a deleted, emptied, cut (at a record boundary), extended or rewritten newest file, which
the hash chain alone cannot see; the writer notices the same at start-up and says so in the
chain; checkpoints are forwarded."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.logstore import LogStore, verify
from gateway.logstore.anchor import AnchorStore, parse_signed
from gateway.logstore.chain import decode_chained, encode_chained
from gateway.cli.logs import register


class Clock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


DAY3 = "proxy-2026-04-03.jsonl"


def record(i: int) -> dict:
    return {"device.id": f"dev-{i % 3}", "source.ip": "10.8.0.5", "user.name": "sato",
            "url.full": f"https://example.jp/{i}", "kanmon.verdict": "allow", "rule.id": "r1"}


def store(tmp_path: Path, clock: Clock, **kw) -> LogStore:
    return LogStore(tmp_path / "logs", clock=clock, anchor_dir=tmp_path / "log-anchor", **kw)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """Three days of proxy logs (days 1-2 sealed and gzipped, day 3 open), closed cleanly."""
    clock = Clock(datetime(2026, 4, 1, 9, 0, tzinfo=UTC))
    logs = store(tmp_path, clock)
    for day in range(3):
        clock.now = datetime(2026, 4, 1 + day, 9, 0, tzinfo=UTC)
        for i in range(10):
            logs.append("proxy", record(i))
        logs.rotate_if_needed()
    logs.close()
    assert check(tmp_path) == []
    return tmp_path


def check(state: Path) -> list[tuple[str, bool]]:
    return [(f.kind, f.tamper) for f in verify(state / "logs", anchor_dir=state / "log-anchor").findings]


def day3(state: Path) -> Path:
    return state / "logs" / "proxy" / DAY3


def test_deleted_newest_file_is_found(state):
    day3(state).unlink()
    assert verify(state / "logs").findings == []              # the chain alone cannot tell
    findings = verify(state / "logs", anchor_dir=state / "log-anchor").findings
    assert [(f.kind, f.tamper) for f in findings] == [("anchor-file-deleted", True)]
    assert DAY3 in findings[0].detail.en and "deleted" in findings[0].detail.en and "削除" in findings[0].detail.ja


def test_emptied_newest_file_is_found(state):
    day3(state).write_bytes(b"")
    assert verify(state / "logs").findings == []
    findings = verify(state / "logs", anchor_dir=state / "log-anchor").findings
    assert [(f.kind, f.tamper) for f in findings] == [("anchor-truncated", True)]
    assert "emptied" in findings[0].detail.en and "10 record(s) were removed" in findings[0].detail.en


def test_newest_file_cut_at_a_record_boundary_is_found(state):
    lines = day3(state).read_bytes().splitlines(keepends=True)
    day3(state).write_bytes(b"".join(lines[:-3]))
    assert verify(state / "logs").findings == []
    findings = verify(state / "logs", anchor_dir=state / "log-anchor").findings
    assert [(f.kind, f.tamper) for f in findings] == [("anchor-truncated", True)]
    assert "the last 3 record(s) were removed" in findings[0].detail.en


def append_forged(path: Path) -> None:
    last = decode_chained(path.read_bytes().splitlines(keepends=True)[-1])
    line, _ = encode_chained({"@timestamp": "2026-04-03T10:00:00.000000Z", **record(99)}, last.seq + 1, last.hash)
    with open(path, "ab") as handle:
        handle.write(line)


def test_newest_file_extended_with_a_valid_record_is_found(state):
    append_forged(day3(state))
    assert verify(state / "logs").findings == []
    findings = verify(state / "logs", anchor_dir=state / "log-anchor").findings
    assert [(f.kind, f.tamper) for f in findings] == [("anchor-extended", True)]
    assert "1 record(s) follow it" in findings[0].detail.en


def test_rewritten_last_record_is_found(state):
    lines = day3(state).read_bytes().splitlines(keepends=True)
    prev = decode_chained(lines[-2])
    forged = {"@timestamp": "2026-04-03T09:00:00.000000Z", **record(7), "url.full": "https://innocent.example/"}
    line, _ = encode_chained(forged, prev.seq + 1, prev.hash)
    day3(state).write_bytes(b"".join(lines[:-1]) + line)
    assert verify(state / "logs").findings == []
    assert check(state) == [("anchor-mismatch", True)]


def test_forged_or_removed_checkpoint_is_found(state):
    path = state / "log-anchor" / "proxy.checkpoint"
    fields = json.loads(path.read_text())
    fields["kanmon.checkpoint.sequence"] -= 3        # pretend the end was earlier
    path.write_text(json.dumps(fields) + "\n")
    assert check(state) == [("checkpoint-invalid", True)]
    path.unlink()
    assert check(state) == [("checkpoint-missing", True)]


def test_the_writer_records_a_mismatch_found_at_start_up(state):
    append_forged(day3(state))
    clock = Clock(datetime(2026, 4, 3, 12, 0, tzinfo=UTC))
    forwarded: list[tuple[str, str]] = []
    logs = store(state, clock, on_record=lambda stream, line: forwarded.append((stream, line)))
    logs.open_streams()
    logs.append("proxy", record(1))
    logs.close()
    assert logs.anchor_mismatches == 1
    assert json.loads(forwarded[0][1])["event.action"] == "log-anchor-mismatch"
    # The restart's checkpoints anchor the extended chain, but the chain itself now says so.
    findings = verify(state / "logs", anchor_dir=state / "log-anchor").findings
    assert [(f.kind, f.tamper) for f in findings] == [("anchor-mismatch-at-start", True)]
    assert "appended while the gateway was stopped" in findings[0].detail.en


def test_truncation_while_stopped_is_recorded_at_start_up(state):
    lines = day3(state).read_bytes().splitlines(keepends=True)
    day3(state).write_bytes(b"".join(lines[:-2]))
    logs = store(state, Clock(datetime(2026, 4, 3, 12, 0, tzinfo=UTC)))
    logs.open_streams()
    logs.close()
    kinds = [k for k, _ in check(state)]
    assert "anchor-mismatch-at-start" in kinds


def test_clean_restart_and_crash_restart_are_not_tampering(tmp_path):
    clock = Clock(datetime(2026, 4, 1, 9, 0, tzinfo=UTC))
    logs = store(tmp_path, clock)
    logs.open_streams()
    for i in range(5):
        logs.append("proxy", record(i))
    logs.close()
    logs = store(tmp_path, clock)           # clean restart
    logs.open_streams()
    for i in range(5):
        logs.append("proxy", record(i))
    logs.checkpoint()
    logs.append("proxy", record(9))         # after the last checkpoint: the process "crashes"
    logs._stop_checkpointer()
    assert check(tmp_path) == []
    notes = verify(tmp_path / "logs", anchor_dir=tmp_path / "log-anchor").notes
    assert [n.kind for n in notes] == ["unanchored-tail"] and "newest 1 record(s)" in notes[0].detail.en
    again = store(tmp_path, clock)          # restart after the crash
    again.open_streams()
    again.close()
    assert logs.anchor_mismatches == 0 and again.anchor_mismatches == 0
    assert check(tmp_path) == []


def test_checkpoints_every_n_records_off_the_hot_path_and_forwarded(tmp_path):
    forwarded: list[tuple[str, str]] = []
    clock = Clock(datetime(2026, 4, 1, 9, 0, tzinfo=UTC))
    logs = store(tmp_path, clock, checkpoint_records=5, checkpoint_seconds=3600,
                 on_checkpoint=lambda stream, line: forwarded.append((stream, line)))
    logs.open_streams()
    opened = logs.checkpoints_written
    for i in range(5):
        logs.append("dns", record(i))
    deadline = time.monotonic() + 10
    while logs.checkpoints_written == opened and time.monotonic() < deadline:
        time.sleep(0.01)
    logs.close()
    public = AnchorStore(tmp_path / "log-anchor").public_key()
    dns = [parse_signed(line, public) for stream, line in forwarded if stream == "dns"]
    assert [c.reason for c in dns] == ["open", "interval", "close"]
    assert dns[1].sequence == 5 and dns[1].records == 5 and dns[1].file == "dns-2026-04-01.jsonl"
    assert oct((tmp_path / "log-anchor" / "checkpoint-key.pem").stat().st_mode & 0o777) == "0o600"


def run_cli(*argv: str) -> int:
    import argparse
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_uses_the_anchor_beside_the_log_directory(state, capsys, tmp_path):
    assert run_cli("logs", "verify", "--dir", str(state / "logs")) == 0
    day3(state).unlink()
    assert run_cli("logs", "verify", "--dir", str(state / "logs")) == 1
    out = capsys.readouterr().out
    assert "anchor-file-deleted" in out and "削除されています" in out
    bare = tmp_path / "elsewhere" / "logs"
    LogStore(bare).append("proxy", record(1))
    assert run_cli("logs", "verify", "--dir", str(bare)) == 0
    assert "cannot be detected" in capsys.readouterr().out    # says the end is not anchored


def test_checkpoints_reach_the_syslog_collector(tmp_path):
    import socket

    from gateway.logstore import SyslogForwarder

    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    forwarder = SyslogForwarder("127.0.0.1", collector.getsockname()[1])
    try:
        logs = store(tmp_path, Clock(datetime(2026, 4, 1, 9, 0, tzinfo=UTC)), on_checkpoint=forwarder)
        logs.append("auth", record(1))
        logs.close()
        messages = []
        while len(messages) < 2:      # the open and the close checkpoint of "auth"
            messages.append(collector.recv(65535).decode("utf-8"))
    finally:
        forwarder.close()
        collector.close()
    public = AnchorStore(tmp_path / "log-anchor").public_key()
    assert all(m.startswith("<133>1 ") and " auth - " in m for m in messages)   # local0.notice, MSGID auth
    closing = parse_signed(messages[-1].split("\ufeff", 1)[1], public)
    assert (closing.reason, closing.sequence, closing.stream) == ("close", 1, "auth")


def test_a_damaged_signing_key_is_refused_not_replaced(tmp_path):
    from gateway.logstore.anchor import AnchorError

    key = tmp_path / "log-anchor" / "checkpoint-key.pem"
    key.parent.mkdir()
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(AnchorError) as refused:
        store(tmp_path, Clock(datetime(2026, 4, 1, 9, 0, tzinfo=UTC)))
    assert "署名鍵" in refused.value.text.ja and "signing key" in refused.value.text.en
    assert b"not a key" in key.read_bytes()


def test_restart_on_a_later_day_seals_the_old_file_without_a_false_mismatch(state):
    logs = store(state, Clock(datetime(2026, 4, 5, 8, 0, tzinfo=UTC)))   # stopped on the 3rd, started on the 5th
    logs.open_streams()
    logs.append("proxy", record(1))
    logs.close()
    assert logs.anchor_mismatches == 0
    assert check(state) == []


def test_a_checkpoint_swapped_in_from_another_stream_is_refused(state):
    anchor = state / "log-anchor"
    logs = store(state, Clock(datetime(2026, 4, 3, 10, 0, tzinfo=UTC)))
    logs.append("dns", record(1))
    logs.close()
    (anchor / "proxy.checkpoint").write_bytes((anchor / "dns.checkpoint").read_bytes())
    findings = verify(state / "logs", anchor_dir=anchor).findings
    assert [(f.kind, f.tamper) for f in findings] == [("checkpoint-invalid", True)]
    assert "another stream (dns)" in findings[0].detail.en
