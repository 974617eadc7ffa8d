"""Run the fuzz harnesses of tests/fuzz/ for longer than CI does and count the inputs tried.

    python bench/fuzz.py [--minutes N] [--only NAME ...]

Each harness gets an equal share of ``--minutes`` (default 1), in fresh random batches of
200 inputs (hypothesis, no example database), under the same per-input hang watchdog as in
CI. Prints a table (harness, inputs tried, inputs/s, result) and writes
bench/results/fuzz.json. Exit status 1 when a harness found a failure; the failing input
and the ``@reproduce_failure`` line are printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODULES = ["tests.fuzz.test_policy_yaml", "tests.fuzz.test_normalizer", "tests.fuzz.test_mail_parser",
           "tests.fuzz.test_dns_path", "tests.fuzz.test_enroll_api"]


def harnesses():
    for name in MODULES:
        yield from importlib.import_module(name).HARNESSES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="total time, shared equally (default 1)")
    parser.add_argument("--only", nargs="*", default=None, help="harness names to run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fuzz.json"))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # refused-device warnings etc. would flood the table

    selected = [h for h in harnesses() if not args.only or h.name in args.only]
    if not selected:
        parser.error(f"no harness named {args.only}")
    share = args.minutes * 60 / len(selected)
    rows, failed = [], False
    started = time.time()
    for harness in selected:
        result = "ok"
        try:
            tried, seconds = harness.run_for(share)
        except Exception as exc:  # a harness failure: report it, go on with the others
            tried, seconds, result, failed = harness.tried, share, f"FAILED: {type(exc).__name__}", True
            traceback.print_exc()
        rows.append({"harness": harness.name, "inputs": tried, "seconds": round(seconds, 1),
                     "inputs_per_second": round(tried / seconds, 1) if seconds else 0.0, "result": result})
        print(f"{harness.name:<18} {tried:>9} inputs {rows[-1]['inputs_per_second']:>9.1f}/s  {result}", flush=True)

    total = sum(r["inputs"] for r in rows)
    print()
    print(f"{'harness':<18} {'inputs':>9} {'per s':>9}  result")
    for r in rows:
        print(f"{r['harness']:<18} {r['inputs']:>9} {r['inputs_per_second']:>9.1f}  {r['result']}")
    print(f"{'total':<18} {total:>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "fuzz", "minutes": args.minutes, "started": started, "python": platform.python_version(),
        "machine": platform.machine(), "total_inputs": total, "harnesses": rows,
    }, indent=2) + "\n")
    print(f"written {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
