"""bench/proxy.py in the lab, CI-sized (one round, seconds per scenario): the scenarios of issue
#22 run end to end and their JSON carries what the report is built from — every Kanmon scenario
loaded from the same devices as bare mitmdump, one per worker, a new TLS connection for every
newtls request, CPU counted for every proxy (Kanmon's parent and workers). No speed is asserted:
the figures belong to the benchmark (bench/results), not to a test on a shared machine."""

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
    cmd = [sys.executable, str(ROOT / "bench" / "proxy.py"), "--rounds", "1", "--duration", "2",
           "--connections", "4", "--out", str(out), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_https_suite_drives_workers_1_and_auto_from_the_same_devices():
    require_lab()
    auto = min(usable_cores(), MAX_PROXY_WORKERS)
    report = _bench(ARTIFACTS / "bench-smoke" / "proxy_https.json", "--suite", "https", "--tls-names", "20")
    names = {f"{v} {k}" for v in ("https", "newtls") for k in ("mitmproxy", "kanmon+policy w1", "kanmon+policy auto")}
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


def test_plain_http_suite_has_cpu_for_every_proxy_and_the_worker_scenarios():
    require_lab()
    only = ["tunnel", "mitmproxy", "kanmon+policy", "mitmproxy 2dev", "kanmon+policy 2dev w1", "kanmon+policy 2dev w2"]
    report = _bench(ARTIFACTS / "bench-smoke" / "proxy.json", "--kanmon-workers", "2",
                    *[arg for name in only for arg in ("--only", name)])
    results = report["rounds"][0]["results"]
    assert set(results) == set(only)
    assert results["tunnel"]["cpu_s_per_1000"] is None          # no proxy process in that scenario
    for name in only[1:]:
        assert results[name]["requests"] > 0 and results[name]["cpu_s_per_1000"] > 0, name
    assert all(results[n]["devices"] == 2 for n in only[3:])
    ratios = report["ratios"]
    assert ratios["kanmon+policy"]["cpu_vs_mitmproxy"] is not None
    assert ratios["kanmon+policy 2dev w2"]["vs_w1"] is not None and ratios["kanmon+policy 2dev w2"]["cpu_vs_w1"] is not None
