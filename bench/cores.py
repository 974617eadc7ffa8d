"""What N busy processes cost this machine per unit of work (issue #22's reference for
"CPU per request with workers within 1.1x of 1 worker").

The workers goal compares CPU-seconds per request with N inspection processes to one. On a
machine whose cores are not independent (vCPUs that are hyperthreads of one physical core on
the host, a host that is itself busy, shared caches and memory bandwidth), a process does less
work per CPU-second when another runs beside it, whatever the program. This bench measures
that floor with no proxy, no network and nothing shared between the processes: the same fixed
piece of pure-Python work (hashing and dict churn, like a request's bookkeeping) done by one
process alone, then by N processes at once, each reporting its own CPU time (``os.times``,
user + system). The ratio "CPU per unit with N at once / alone" is what any N-process design
pays on this machine before its own costs; a workers figure is read against it.

    .venv/bin/python bench/cores.py [--processes 2] [--units 40] [--rounds 5]

Prints a table and writes bench/results/cores.json (per-round figures and medians).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def unit() -> int:
    """One unit of work: ~10-20 ms of interpreter time (strings, hashing, a dict)."""
    table: dict[str, int] = {}
    acc = 0
    for i in range(20_000):
        key = f"host-{i % 997}.example.test/{i}"
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        table[key[:24]] = table.get(key[:24], 0) + digest[0]
        acc ^= digest[1]
    return acc + len(table)


def _worker(units: int, start: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    start.wait()
    t0 = os.times()
    w0 = time.perf_counter()
    for _ in range(units):
        unit()
    t1 = os.times()
    out.put({"cpu_s": (t1.user - t0.user) + (t1.system - t0.system), "wall_s": time.perf_counter() - w0})


def run(processes: int, units: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(units, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    cpu = sum(r["cpu_s"] for r in results)
    return {"processes": processes, "cpu_ms_per_unit": round(cpu * 1000 / (units * processes), 3),
            "units_per_s": round(units * processes / max(r["wall_s"] for r in results), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2, help="N processes at once (default: the cores)")
    ap.add_argument("--units", type=int, default=40, help="units of work per process and run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "cores.json"))
    args = ap.parse_args()
    rounds = []
    for r in range(args.rounds):
        # alternate the order so neither always runs first
        if r % 2:
            together = run(args.processes, args.units)
            alone = run(1, args.units)
        else:
            alone = run(1, args.units)
            together = run(args.processes, args.units)
        rounds.append({"round": r + 1, "alone": alone, "together": together,
                       "cpu_ratio": round(together["cpu_ms_per_unit"] / alone["cpu_ms_per_unit"], 3),
                       "throughput_ratio": round(together["units_per_s"] / alone["units_per_s"], 3)})
        print(f"round {r + 1}/{args.rounds}: alone {alone['cpu_ms_per_unit']:.2f} ms CPU/unit, "
              f"{args.processes} at once {together['cpu_ms_per_unit']:.2f} ms CPU/unit "
              f"(x{rounds[-1]['cpu_ratio']:.3f}); throughput x{rounds[-1]['throughput_ratio']:.3f}", flush=True)
    summary = {"processes": args.processes, "cores": os.cpu_count(), "rounds": len(rounds),
               "cpu_ratio_median": statistics.median(r["cpu_ratio"] for r in rounds),
               "throughput_ratio_median": statistics.median(r["throughput_ratio"] for r in rounds),
               "load_average_end": os.getloadavg()[0]}
    print(f"\n| processes at once | CPU per unit vs alone (median) | throughput vs alone (median) |\n|---|---|---|\n"
          f"| {args.processes} | {summary['cpu_ratio_median']:.3f} | {summary['throughput_ratio_median']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
