"""bench/proxy.py in the lab, CI-sized (one round, seconds per scenario): the scenarios of issue
#22 run end to end and their JSON carries what the report is built from — every Kanmon scenario
loaded from the same devices as bare mitmdump, one per worker, a new TLS connection for every
newtls request, CPU counted for every proxy (Kanmon's parent and workers). No speed is asserted:
the figures belong to the benchmark (bench/results), not to a test on a shared machine.
The plain-HTTP suite's CPU column and worker scenarios are checked by
tests/unit/test_perf_proxy_bench.py only: one more lab run of six scenarios is ~2 minutes of CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import MAX_PROXY_WORKERS, usable_cores
from tests.e2e.conftest import ARTIFACTS, require_lab

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _bench(out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "proxy.py"), "--rounds", "1", "--duration", "1",
           "--connections", "4", "--out", str(out), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_https_suite_drives_workers_1_and_auto_from_the_same_devices():
    require_lab()
    auto = min(usable_cores(), MAX_PROXY_WORKERS)
    # four of the six scenarios (each starts its proxy: ~25 s of CI apiece): enough for both
    # kinds of ratio the report judges (auto vs 1 worker, Kanmon vs bare mitmdump)
    names = {"https kanmon+policy w1", "https kanmon+policy auto", "newtls mitmproxy", "newtls kanmon+policy w1"}
    report = _bench(ARTIFACTS / "bench-smoke" / "proxy_https.json", "--suite", "https", "--tls-names", "20",
                    *[arg for name in sorted(names) for arg in ("--only", name)])
    results = report["rounds"][0]["results"]
    assert set(results) == names and len(report["devices"]) == auto
    for name, row in results.items():
        assert row["requests"] > 0 and row["non_2xx"] == 0, (name, row)
        assert row["devices"] == auto, name                     # every scenario from the same devices
        assert row["gateway_cpu_s"] > 0 and row["cpu_s_per_1000"] > 0, name
    for name in names:
        if name.startswith("newtls"):
            assert results[name]["new_connection_share"] == 1.0, name    # a full handshake per request
            assert len(results[name]["elapsed_s_per_device"]) == auto
    auto_row = report["summary"]["https kanmon+policy auto"]
    assert auto_row["rps_vs_w1_per_round"] and auto_row["cpu_vs_w1_per_round"]
    judged = {(g["scenario"], g["goal"]) for g in report["goals"] if g["value"] is not None}
    assert ("https kanmon+policy auto", "req/s vs 1 worker") in judged
    assert ("newtls kanmon+policy w1", "CPU per request vs bare mitmproxy") in judged
