"""Issue #7 'clock jump': the reconciler notices a stepped wall clock, tells the operator
(warning + kanmon_clock_jumps_total) and re-evaluates every device at once.

The wall clock and the monotonic clock are both injected, so a step is a step of one and not
the other, as NTP or `date -s` does it on a real host (CLOCK_MONOTONIC is never stepped)."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

from gateway.metrics import GatewayMetrics
from gateway.runtime.reconcile import CLOCK_JUMP_TOLERANCE_SECONDS, Reconciler, clock_jump
from gateway.registry.model import DeviceStatus
from gateway.registry.sqlite import SqliteRegistry
from tests.unit.test_registry import NOW, FakeTunnel, add


class Clocks:
    """A wall clock and a monotonic clock that move together unless stepped."""

    def __init__(self):
        self.wall, self.mono = NOW, 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)


def reconciler(tmp_path, clocks: Clocks, jumps: list[float]):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    tunnel = FakeTunnel()
    rec = Reconciler(reg, tunnel, "t", clock=lambda: clocks.wall, set_blocked=lambda *a, **k: None,
                     monotonic=lambda: clocks.mono, on_clock_jump=jumps.append)
    return reg, tunnel, rec


def test_clock_jump_is_the_wall_step_beyond_the_monotonic_time_and_ignores_small_drift():
    t0 = (NOW, 50.0)
    assert clock_jump(t0, (NOW + timedelta(hours=2, seconds=10), 60.0)) == 7200.0
    assert clock_jump(t0, (NOW - timedelta(hours=2), 51.0)) == -7201.0
    assert clock_jump(t0, (NOW + timedelta(hours=5), 50.0 + 5 * 3600)) == 0.0   # both moved: no step
    small = CLOCK_JUMP_TOLERANCE_SECONDS - 0.5
    assert clock_jump(t0, (NOW + timedelta(seconds=small), 50.0)) == 0.0
    assert clock_jump(t0, (NOW - timedelta(seconds=small), 50.0)) == 0.0
    assert clock_jump(t0, (NOW + timedelta(seconds=CLOCK_JUMP_TOLERANCE_SECONDS + 1), 50.0)) > 0


def test_forward_step_warns_counts_and_cuts_the_expired_device_in_a_full_pass(tmp_path, caplog):
    clocks, jumps = Clocks(), []
    reg, tunnel, rec = reconciler(tmp_path, clocks, jumps)
    timed = add(reg, "timed", valid_until=NOW + timedelta(hours=1))
    steady = add(reg, "steady")
    rec.run_once(full=True)
    clocks.advance(0.05)
    assert not rec.due()
    assert timed.wg_public_key in tunnel.peers
    clocks.step(2 * 3600)
    with caplog.at_level(logging.WARNING, logger="kanmon.reconcile"):
        assert rec.due()
    assert jumps == [7200.0]
    assert any("stepped forward by 7200 s" in r.getMessage() for r in caplog.records)
    report = rec.run_once()
    assert report.full, "a stepped clock re-evaluates every device, not only the timers it knew of"
    assert timed.wg_public_key not in tunnel.peers and timed.ipv4 in rec.applied_blocked
    assert steady.wg_public_key in tunnel.peers and report.admitted_ids == {"steady"}
    clocks.advance(0.05)
    assert not rec.due() and jumps == [7200.0], "one step is reported once"
    assert not rec.run_once().full


def test_backward_step_readmits_the_period_expired_device_at_once_but_never_the_revoked_one(tmp_path, caplog):
    clocks, jumps = Clocks(), []
    reg, tunnel, rec = reconciler(tmp_path, clocks, jumps)
    timed = add(reg, "timed", valid_until=NOW + timedelta(hours=1))
    # Revoked, and with the same usage period: the period is valid again after the step
    # back, the revocation is not undone by any clock.
    revoked = add(reg, "revoked", valid_until=NOW + timedelta(hours=1))
    reg.update(replace(revoked, status=DeviceStatus.REVOKED, status_reason="lost"))
    rec.run_once(full=True)
    clocks.step(2 * 3600)
    rec.run_once()
    assert timed.wg_public_key not in tunnel.peers and rec.next_change is None
    clocks.advance(0.05)
    assert not rec.due(), "nothing is pending: without detecting the step back, only a safety pass would see it"
    clocks.step(-2 * 3600)
    with caplog.at_level(logging.WARNING, logger="kanmon.reconcile"):
        assert rec.due()
    assert jumps == [7200.0, -7200.0]
    assert any("stepped backward by 7200 s" in r.getMessage() for r in caplog.records)
    report = rec.run_once()
    assert report.full and report.admitted_ids == {"timed"}
    assert timed.wg_public_key in tunnel.peers and timed.ipv4 not in rec.applied_blocked
    assert revoked.wg_public_key not in tunnel.peers and revoked.ipv4 in rec.applied_blocked
    assert rec.next_change == NOW + timedelta(hours=1), "the period's end is planned again by the new clock"


def test_clocks_moving_together_for_hours_are_no_jump_and_the_timer_cuts_incrementally(tmp_path):
    clocks, jumps = Clocks(), []
    reg, tunnel, rec = reconciler(tmp_path, clocks, jumps)
    timed = add(reg, "timed", valid_until=NOW + timedelta(hours=1))
    rec.run_once(full=True)
    for _ in range(61):
        clocks.advance(60)
        rec.due()
    report = rec.run_once()
    assert jumps == [] and not report.full
    assert timed.wg_public_key not in tunnel.peers


def test_a_step_within_tolerance_is_not_reported(tmp_path, caplog):
    clocks, jumps = Clocks(), []
    reg, tunnel, rec = reconciler(tmp_path, clocks, jumps)
    add(reg, "a")
    rec.run_once(full=True)
    clocks.step(CLOCK_JUMP_TOLERANCE_SECONDS / 2)
    with caplog.at_level(logging.WARNING, logger="kanmon.reconcile"):
        assert not rec.due()
    assert jumps == [] and not caplog.records


def test_metrics_count_clock_jumps_by_direction():
    metrics = GatewayMetrics()
    metrics.observe_clock_jump(7200.0)
    metrics.observe_clock_jump(-7200.0)
    metrics.observe_clock_jump(30.0)
    value = metrics.registry.get_sample_value
    assert value("kanmon_clock_jumps_total", {"direction": "forward"}) == 2
    assert value("kanmon_clock_jumps_total", {"direction": "backward"}) == 1
