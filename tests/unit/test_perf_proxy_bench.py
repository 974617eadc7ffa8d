"""bench/proxy.py's rounds: rotated order and ratios taken within one round (the lab itself
needs root and is run by hand; these are its pure parts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_proxy", ROOT / "bench" / "proxy.py")
proxy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proxy)

NAMES = ["tunnel", "mitmproxy", "mitmproxy x2", "e2guardian", "kanmon", "kanmon+policy"]


def _row(rps: float) -> dict:
    return {"requests_per_s": rps, "p50_ms": 1000 / rps, "p90_ms": None, "p99_ms": 3.0, "non_2xx": 1,
            "socket_errors": ""}


def test_every_round_runs_every_scenario_and_no_scenario_is_always_last():
    orders = [proxy.round_order(NAMES, r, 3) for r in range(3)]
    assert all(sorted(o) == sorted(NAMES) for o in orders)
    assert orders[0] == NAMES
    assert len({o[-1] for o in orders}) == 3 and len({o[0] for o in orders}) == 3
    positions = [o.index("kanmon+policy") for o in orders]
    assert min(positions) < len(NAMES) // 2 <= max(positions)  # early in one round, late in another
    assert proxy.round_order(NAMES, 0, 1) == NAMES


def test_ratios_are_taken_within_each_round_and_medians_reported():
    # The machine slows down from round to round; kanmon+policy is 0.9x mitmproxy in every
    # round. Medians of the raw figures would say otherwise if the rounds were mixed.
    speeds = [1.0, 0.5, 0.25]
    base = {"tunnel": 10000, "mitmproxy": 500, "mitmproxy x2": 600, "e2guardian": 1000, "kanmon": 480,
            "kanmon+policy": 450}
    rounds = [{"round": i + 1, "order": NAMES, "results": {n: _row(v * s) for n, v in base.items()}}
              for i, s in enumerate(speeds)]
    summary = proxy.summarize(NAMES, rounds)
    kp = summary["kanmon+policy"]
    assert kp["vs_mitmproxy_per_round"] == pytest.approx([0.9, 0.9, 0.9])
    assert kp["vs_mitmproxy"] == pytest.approx(0.9)
    assert kp["vs_e2guardian"] == pytest.approx(0.45)
    assert kp["requests_per_s"] == pytest.approx(225)  # median of 450, 225, 112.5
    assert kp["requests_per_s_per_round"] == pytest.approx([450, 225, 112.5])
    assert kp["p90_ms"] is None and kp["p99_ms"] == 3.0 and kp["non_2xx"] == 3
    assert summary["mitmproxy"]["vs_mitmproxy"] == pytest.approx(1.0)


def test_a_scenario_missing_from_a_round_is_left_out_of_that_rounds_ratio():
    rounds = [{"round": 1, "order": NAMES, "results": {"mitmproxy": _row(500), "kanmon": _row(400)}},
              {"round": 2, "order": NAMES, "results": {"mitmproxy": _row(400), "kanmon": _row(400),
                                                        "e2guardian": _row(800)}}]
    summary = proxy.summarize(["mitmproxy", "kanmon", "e2guardian"], rounds)
    assert summary["kanmon"]["vs_mitmproxy_per_round"] == pytest.approx([0.8, 1.0])
    assert summary["kanmon"]["vs_e2guardian_per_round"] == pytest.approx([0.5])
    assert summary["e2guardian"]["requests_per_s_per_round"] == [800]
