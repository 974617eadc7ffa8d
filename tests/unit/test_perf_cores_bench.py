"""bench/cores.py (issue #22): the machine's own cost of N busy processes, the reference the
workers' "CPU per request vs 1 worker" is read against. No speed is asserted: the bench runs
its real work in real forked processes and reports each process's own CPU time."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_cores", ROOT / "bench" / "cores.py")
cores = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cores)


def test_each_process_reports_its_own_cpu_time_for_the_same_work():
    alone, together = cores.run(1, 2), cores.run(2, 2)
    assert alone["processes"] == 1 and together["processes"] == 2
    # CPU time is the processes' own (not the parent's, which only waits): a unit costs
    # milliseconds of interpreter time, alone or beside another process
    assert alone["cpu_ms_per_unit"] > 1 and together["cpu_ms_per_unit"] > 1
    assert together["units_per_s"] > 0


def test_main_writes_the_rounds_and_the_medians(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cores.json"
    monkeypatch.setattr("sys.argv", ["cores.py", "--processes", "2", "--units", "1", "--rounds", "2", "--out", str(out)])
    assert cores.main() == 0
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 2 and report["summary"]["processes"] == 2
    ratios = [r["cpu_ratio"] for r in report["rounds"]]
    assert report["summary"]["cpu_ratio_median"] == pytest.approx(sum(ratios) / 2)
    assert "CPU per unit vs alone" in capsys.readouterr().out
