"""Issue #7 load and soak, CI-sized: 50 devices, mixed web/DNS/mail traffic for 60 s
(`bench/soak.py`; on demand it runs 10 minutes). Its invariants are the assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.lab.mailservers import mail_prerequisites
from tests.e2e.conftest import ARTIFACTS, require_lab

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_soak_50_devices_mixed_traffic():
    require_lab()
    mail = not mail_prerequisites()
    if not mail and os.environ.get("CI", "").lower() == "true":
        pytest.fail("mail servers missing for the soak: " + ", ".join(mail_prerequisites()))
    out = ARTIFACTS / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--devices", "50", "--seconds", "60", "--out", str(out),
           "--reports-dir", str(ARTIFACTS / "soak-memory")]
    result = subprocess.run(cmd + (["--mail"] if mail else []), capture_output=True, text=True, timeout=900)
    print(result.stdout[-3000:])
    report = json.loads(out.read_text())
    assert result.returncode == 0, (report.get("failures"), result.stderr[-3000:])
    assert report["web_ok"] > 50 * 20 and report["blocked_requests"] > 50 * 20   # every device kept going
    assert report["wrong_verdicts"] == 0 and report["lost_log_records"] == 0
    assert report["fds_end"] <= report["fds_start"] + 20
    assert report["allocator_after"].get("python_blocks", 0) > 0      # the memory reports were read
    if mail:
        assert report["mail_sessions_ok"] > 0 and report["mail_sessions_bad"] == 0
