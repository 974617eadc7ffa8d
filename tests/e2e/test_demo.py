"""`kanmon demo` is how a newcomer first sees the product: it must work and clean up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import require_lab

pytestmark = pytest.mark.e2e


def test_kanmon_demo_shows_allowed_and_blocked_and_cleans_up(tmp_path):
    require_lab()
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "http://www.example.test/         -> HTTP 200" in out
    assert "https://blocked.test/            -> HTTP 403" in out
    assert "device=demo-phone src=10.77.0.2 GET https://blocked.test/ -> block rule=lab-block-blocked-test" in out
    assert "端末からアクセスします" in out and "Browsing from the device" in out
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
