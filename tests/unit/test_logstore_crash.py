"""kill -9 under load: every append that returned has its record on disk, and the store
(and verify) carry on afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.logstore import LogStore, search, verify

CHILD = r"""
import sys
from pathlib import Path
from gateway.logstore import LogStore
store = LogStore(Path(sys.argv[1]))
i = 0
while True:
    i += 1
    store.append("proxy", {"device.id": "load", "n": i, "url.full": "https://e.jp/?token=s&n=%d" % i})
    # acknowledge only after append returned: this is the "completed request"
    sys.stdout.write("%d\n" % i)
    sys.stdout.flush()
"""


def test_kill_9_under_load_loses_no_acknowledged_record(tmp_path: Path):
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    acknowledged = 0
    deadline = time.monotonic() + 60
    assert child.stdout is not None
    while acknowledged < 3000 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        acknowledged = int(line)
    os.kill(child.pid, signal.SIGKILL)
    rest = child.stdout.read()       # acknowledgements already in the pipe when it died
    child.wait()
    for line in rest.splitlines():
        acknowledged = int(line)
    assert acknowledged >= 3000, "child did not get going"

    on_disk = [r["n"] for r in search(tmp_path, "proxy")]
    assert on_disk[:acknowledged] == list(range(1, acknowledged + 1))
    assert len(on_disk) in (acknowledged, acknowledged + 1)   # + the one in flight
    report = verify(tmp_path)
    assert not report.tampered, [f.render("en") for f in report.findings]

    # a restarted gateway continues the same chain
    today = datetime.now(UTC)
    with LogStore(tmp_path, clock=lambda: today) as store:
        store.append("proxy", {"device.id": "after-restart"})
    assert verify(tmp_path).findings == []
    last = json.loads(sorted((tmp_path / "proxy").glob("*.jsonl"))[-1].read_text().splitlines()[-1])
    assert last["device.id"] == "after-restart" and last["event.sequence"] == len(on_disk) + 1
