"""The gateway's "applied" confirmation, which operator commands wait for after changing the
registry (gateway/runtime/gatewayprocess.py)."""

from __future__ import annotations

import json

from gateway.runtime.gatewayprocess import applied_revision, wait_applied, write_applied


class FakeTime:
    """A clock whose sleep advances it, and runs a scheduled action (the gateway writing)."""

    def __init__(self, actions=()):
        self.now = 0.0
        self.actions = sorted(actions)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        while self.actions and self.actions[0][0] <= self.now:
            self.actions.pop(0)[1]()


def test_written_revision_reads_back_with_the_writers_pid(tmp_path):
    path = tmp_path / "applied.json"
    write_applied(path, 41)
    assert applied_revision(path) == 41
    assert json.loads(path.read_text())["pid"] > 0
    write_applied(path, 42)
    assert applied_revision(path) == 42 and not list(tmp_path.glob("*.tmp"))


def test_wait_returns_when_the_gateway_reaches_the_revision_or_a_later_one(tmp_path):
    path = tmp_path / "applied.json"
    write_applied(path, 9)
    t = FakeTime([(0.040, lambda: write_applied(path, 10)), (0.080, lambda: write_applied(path, 12))])
    waited = wait_applied(path, 11, timeout=3, clock=t.clock, sleep=t.sleep)
    assert waited is not None and 0.080 <= waited < 0.090      # 10 is not enough; 12 is
    assert wait_applied(path, 12, timeout=3, clock=t.clock, sleep=t.sleep) == 0.0


def test_wait_times_out_when_the_gateway_never_confirms(tmp_path):
    path = tmp_path / "applied.json"
    write_applied(path, 3)
    t = FakeTime()
    assert wait_applied(path, 4, timeout=2.0, clock=t.clock, sleep=t.sleep) is None
    assert 2.0 <= t.now < 2.01


def test_a_missing_or_damaged_file_is_no_confirmation(tmp_path):
    path = tmp_path / "applied.json"
    assert applied_revision(path) is None
    for text in ("", "{", "[]", '{"revision": "7"}', '{"rev": 7}', "\x00\xff"):
        path.write_text(text, errors="surrogateescape") if "\xff" not in text else path.write_bytes(b"\x00\xff")
        assert applied_revision(path) is None, text
        t = FakeTime()
        assert wait_applied(path, 1, timeout=0.05, clock=t.clock, sleep=t.sleep) is None
