"""Enrollment throughput over real mutual TLS (no namespaces needed).

For N devices: register them, issue each a device certificate bound to its WireGuard key,
then enroll each through the real endpoint (`gateway.enroll.server.EnrollmentServer` on
127.0.0.1: TLS with client certificate, certificate check, registry write, audit entry,
WireGuard config answer), one after the other as phones would arrive. Prints a table and
writes bench/results/enroll.json.

    .venv/bin/python bench/enroll.py [--sizes 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.unit.test_enroll_server as harness  # noqa: E402  (the endpoint test's own set-up)
from tests.unit.test_enroll_server import make_env, new_key  # noqa: E402

# Room for 10k devices: the test harness's config uses a /24.
harness.CONFIG = harness.CONFIG.replace("10.77.0.0/24", "10.64.0.0/16")

RESULTS = ROOT / "bench" / "results"


def run_size(n: int) -> dict:
    env = make_env(Path(tempfile.mkdtemp(prefix=f"kanmon-enrollbench-{n}-")), rate=10**6, burst=10**6)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            env.register(f"dev-{i:05d}")
        register_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        identities = []
        for i in range(n):
            key = new_key()
            _, ident = env.issue(f"dev-{i:05d}", key)
            identities.append((key, ident))
        issue_s = time.perf_counter() - t0
        times = []
        t0 = time.perf_counter()
        for key, ident in identities:
            start = time.perf_counter()
            status, body, _ = env.request({"wg_public_key": key, "platform": "ios", "os_version": "17.5"}, identity=ident)
            times.append((time.perf_counter() - start) * 1000)
            if status != 200:
                raise RuntimeError(f"enrollment refused: {body}")
        enroll_s = time.perf_counter() - t0
        times.sort()
        return {"devices": n, "register_s": round(register_s, 2), "issue_certs_s": round(issue_s, 2),
                "enroll_total_s": round(enroll_s, 2), "enrollments_per_s": round(n / enroll_s, 1),
                "enroll_p50_ms": round(statistics.median(times), 2), "enroll_p99_ms": round(times[int(0.99 * n) - 1], 2)}
    finally:
        env.server.stop()
        env.registry.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000])
    ap.add_argument("--out", default=str(RESULTS / "enroll.json"))
    args = ap.parse_args()
    rows = [run_size(n) for n in args.sizes]
    cols = list(rows[0])
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>18}" for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
