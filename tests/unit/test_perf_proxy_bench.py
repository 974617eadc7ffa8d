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


# --- the HTTPS suite (issue #22) ---------------------------------------------------------------

TLS_NAMES = ["newtls mitmproxy", "newtls kanmon+policy", "newtls kanmon+policy before"]


def _tls_row(rps: float, cpu: float) -> dict:
    return {"requests_per_s": rps, "p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 30.0, "non_2xx": 0,
            "cpu_s_per_1000": cpu, "new_connection_share": 1.0}


def test_tls_ratios_of_rate_and_cpu_are_taken_within_each_round():
    # The machine halves its speed every round; per round Kanmon is 2x mitmproxy's rate at 0.6x
    # its CPU, and 1.25x the commit before at 0.8x its CPU.
    rounds = [{"round": i + 1, "order": TLS_NAMES,
               "results": {"newtls mitmproxy": _tls_row(50 * s, 10 / s), "newtls kanmon+policy": _tls_row(100 * s, 6 / s),
                           "newtls kanmon+policy before": _tls_row(80 * s, 7.5 / s)}}
              for i, s in enumerate([1.0, 0.5, 0.25])]
    summary = proxy.summarize_tls(TLS_NAMES, rounds)
    k = summary["newtls kanmon+policy"]
    assert k["rps_vs_mitmproxy_per_round"] == pytest.approx([2.0, 2.0, 2.0])
    assert k["cpu_vs_mitmproxy"] == pytest.approx(0.6) and k["rps_vs_before"] == pytest.approx(1.25)
    assert k["cpu_vs_before"] == pytest.approx(0.8)
    assert k["requests_per_s"] == pytest.approx(50) and k["cpu_s_per_1000"] == pytest.approx(12)
    assert summary["newtls mitmproxy"]["rps_vs_before"] == pytest.approx(50 / 80)


def test_gateway_cpu_counts_the_process_and_its_children(tmp_path):
    import os
    import subprocess
    import sys
    import time
    before = proxy.process_tree_cpu(os.getpid())
    # A child that burns about 0.3 s of CPU and is then reaped: counted through cutime/cstime.
    subprocess.run([sys.executable, "-c", "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"],
                   check=True)
    after_reaped = proxy.process_tree_cpu(os.getpid())
    assert after_reaped - before >= 0.25
    # A live child: counted through its own utime/stime while it runs.
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                              "while time.process_time()-t<0.3: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while proxy.process_tree_cpu(os.getpid()) - after_reaped < 0.25 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.process_tree_cpu(os.getpid()) - after_reaped >= 0.25
    finally:
        child.kill()
        child.wait()
    assert proxy.process_tree_cpu(2 ** 22 + 12345) == 0.0   # no such process


def test_percentiles_of_curl_latencies():
    values = [float(v) for v in range(1, 101)]
    assert proxy.percentile(values, 50) == 51   # nearest rank (index round(0.5 * 99) = 50)
    assert proxy.percentile(values, 99) == pytest.approx(99)
    assert proxy.percentile([], 50) is None
