"""systemd/kanmon.service must pass `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.availability import unavailable

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "kanmon.service"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze not installed")
    # verify also checks that ExecStart exists: point it at this checkout's installed entry point.
    kanmon = Path(sys.executable).parent / "kanmon"
    assert kanmon.exists(), "the kanmon console script must be installed in the test venv"
    text = UNIT.read_text()
    assert "ExecStart=/opt/kanmon/.venv/bin/kanmon run --config /etc/kanmon/kanmon.yaml" in text
    unit = tmp_path / "kanmon.service"
    unit.write_text(text.replace("/opt/kanmon/.venv/bin/kanmon", str(kanmon)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "kanmon.service" not in result.stderr, result.stderr  # no warnings about our unit


def test_unit_restarts_on_failure_and_limits_capabilities():
    text = UNIT.read_text()
    assert "Restart=on-failure" in text
    assert "Type=notify" in text
    caps = next(l for l in text.splitlines() if l.startswith("CapabilityBoundingSet="))
    assert set(caps.split("=", 1)[1].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
