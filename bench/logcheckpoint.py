"""What signed checkpoints (issue #15) cost on the log writer's hot path: LogStore.append
per record without an anchor and with one (checkpoint every 1,000 records or 10 s, signed
and written by a background thread), in alternating rounds so both see the same machine.

    python bench/logcheckpoint.py [--records 100000] [--rounds 3]

Prints a table and writes bench/results/logcheckpoint.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.logstore import LogStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "logcheckpoint.json"
RECORD = {"device.id": "dev-0042", "source.ip": "10.8.0.42", "user.name": "sato", "kanmon.verdict": "allow",
          "rule.id": "web-allow-1", "url.full": "https://www.example.jp/path?q=1", "http.request.method": "GET"}


def one_round(records: int, anchored: bool) -> tuple[float, int]:
    work = Path(tempfile.mkdtemp(prefix="kanmon-cpbench-"))
    try:
        store = LogStore(work / "logs", clock=lambda: datetime(2026, 1, 1, 12, tzinfo=UTC),
                         anchor_dir=(work / "log-anchor") if anchored else None)
        store.open_streams()
        start = time.perf_counter()
        for _ in range(records):
            store.append("proxy", dict(RECORD))
        seconds = time.perf_counter() - start
        store.close()
        return seconds / records * 1e6, store.checkpoints_written
    finally:
        shutil.rmtree(work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    plain, anchored, checkpoints = [], [], []
    for _ in range(args.rounds):
        plain.append(one_round(args.records, False)[0])
        us, written = one_round(args.records, True)
        anchored.append(us)
        checkpoints.append(written)
    result = {
        "machine": platform.platform(), "python": platform.python_version(), "records": args.records,
        "rounds": args.rounds, "append_us_median": {"no anchor": round(statistics.median(plain), 2),
                                                     "anchor": round(statistics.median(anchored), 2)},
        "append_us_all": {"no anchor": [round(x, 2) for x in plain], "anchor": [round(x, 2) for x in anchored]},
        "checkpoints_written_per_round": checkpoints,
    }
    print(f"{args.records} appends x {args.rounds} rounds (median µs per append)")
    print(f"{'writer':14} {'µs/append':>10}")
    for name, values in (("no anchor", plain), ("anchor", anchored)):
        print(f"{name:14} {statistics.median(values):10.2f}")
    print(f"checkpoints written per anchored round: {checkpoints}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
