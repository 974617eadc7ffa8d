"""Benchmark of the log store: appends/s on the hot path, and records/s of `logs search`
(and `logs verify`) over a generated month of proxy logs.

    /tmp/venv/bin/python bench/logsearch.py [--days 30] [--per-day 20000]

Prints a table and writes bench/results/logsearch.json. "records/s" for search is records
*scanned* per second (the month's records divided by the wall time of the search).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.logstore import LogStore, search, verify  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "logsearch.json"


def proxy_record(rng: random.Random, i: int) -> dict:
    device = f"dev-{rng.randrange(500):04d}"
    blocked = rng.random() < 0.08
    return {
        "device.id": device,
        "source.ip": f"10.8.{rng.randrange(2)}.{rng.randrange(2, 250)}",
        "user.name": f"user{rng.randrange(500):03d}",
        "kanmon.device.group": rng.choice(["soumu", "zaimu", "kikaku", "jinji"]),
        "url.full": f"https://{rng.choice(['www.example.jp', 'mail.example.com', 'cdn.example.net'])}"
                    f"/path/{i}?q={rng.randrange(10**6)}&token=secret{i}",
        "url.domain": "www.example.jp",
        "http.request.method": rng.choice(["GET", "GET", "GET", "POST"]),
        "http.response.status_code": 403 if blocked else 200,
        "http.response.body.bytes": rng.randrange(100, 200000),
        "kanmon.verdict": "block" if blocked else "allow",
        "rule.id": f"web-{'deny' if blocked else 'allow'}-{rng.randrange(40)}",
        "rule.category": rng.choice(["webmail", "storage", "news", "search"]),
        "event.reason": "matched category rule",
        "kanmon.stage": "http-request",
        "user_agent.original": "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X)",
    }


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=20000)
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed)")
    args = parser.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="kanmon-logbench-"))
    rng = random.Random(6)
    moment = {"now": datetime(2026, 1, 1, tzinfo=UTC)}
    store = LogStore(work, clock=lambda: moment["now"])
    step = timedelta(seconds=86400 / args.per_day)
    append_seconds = rotate_seconds = 0.0
    total = args.days * args.per_day
    records = [proxy_record(rng, i) for i in range(2000)]        # build dicts outside the timing
    for day in range(args.days):
        moment["now"] = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=day)
        start = time.perf_counter()
        for i in range(args.per_day):
            store.append("proxy", records[i % len(records)])
            moment["now"] += step
        append_seconds += time.perf_counter() - start
        moment["now"] = datetime(2026, 1, 2, tzinfo=UTC) + timedelta(days=day)
        rotate_seconds += timed(store.rotate_if_needed)[0]
    store.close()
    size_gz = sum(p.stat().st_size for p in (work / "proxy").iterdir())

    a_device = records[7]["device.id"]
    a_rule = next(r["rule.id"] for r in records if r["kanmon.verdict"] == "block")
    cases = [
        ("all records", {}),
        ("--device", {"device": a_device}),
        ("--rule --verdict block", {"rule": a_rule, "verdict": "block"}),
        ("--device, one day", {"device": a_device, "since": datetime(2026, 1, 10, tzinfo=UTC),
                               "until": datetime(2026, 1, 11, tzinfo=UTC)}),
    ]
    rows = []
    for name, kw in cases:
        seconds, matched = timed(lambda: sum(1 for _ in search(work, "proxy", **kw)))
        one_day = "since" in kw
        scanned = 2 * args.per_day if one_day else total       # one day + the day before
        rows.append({"case": name, "matched": matched, "seconds": round(seconds, 3),
                     "records_scanned_per_s": round(scanned / seconds)})
    verify_seconds, report = timed(lambda: verify(work))
    result = {
        "machine": platform.platform(), "python": platform.python_version(),
        "days": args.days, "records": total, "gzipped_bytes": size_gz,
        "append_per_s": round(total / append_seconds),
        "append_us": round(append_seconds / total * 1e6, 2),
        "rotate_gzip_seconds_per_day": round(rotate_seconds / args.days, 3),
        "search": rows,
        "verify": {"seconds": round(verify_seconds, 3), "records_per_s": round(report.records / verify_seconds),
                   "findings": len(report.findings)},
    }
    print(f"{total} proxy records over {args.days} days, {size_gz / 1e6:.1f} MB gzipped")
    print(f"{'operation':34} {'matched':>9} {'seconds':>9} {'records/s':>11}")
    print(f"{'append (fsync=rotate)':34} {'':>9} {append_seconds:9.2f} {result['append_per_s']:>11}")
    print(f"{'rotate+seal+gzip (per day)':34} {'':>9} {result['rotate_gzip_seconds_per_day']:9.3f} {'':>11}")
    for row in rows:
        print(f"{'search ' + row['case']:34} {row['matched']:>9} {row['seconds']:9.2f} {row['records_scanned_per_s']:>11}")
    print(f"{'verify':34} {'':>9} {verify_seconds:9.2f} {result['verify']['records_per_s']:>11}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.dir is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
