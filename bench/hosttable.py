"""Per-decision cost of mapped host tables (issue #22, gateway/policy/hosttable.py) against the
dicts a compile builds, on bench/engine.py's inputs and its decision path (``gateway_decision``:
``request_query`` + ``snapshot.decide``, as addons/policy.py calls them).

One compile per scenario; the same snapshot decides the same URLs twice per round, once with
its own dict host tables and once with the tables written to a file (gateway/runtime/
hosttablefile.py) and mapped, the two passes alternating (who goes first alternates too), so
load from other work hits both alike. Medians over ``--repeats`` rounds. Also: the bare lookup
(``table.get(name)``) over every name a decision asks (the host and its suffixes), hits and
misses, and the encode/write time and file size. Verdicts of the two passes are compared
(must be identical).

Scenarios: ``synthetic`` (bench/engine.py's generated 1M domains + 10k URL patterns) and
``real`` (the shipped example policy + every UT1 category, ~200k real domains, CC BY-SA 4.0,
read in place).

    python bench/hosttable.py [--domains 1000000] [--urls 100000] [--repeats 5] [--scenarios synthetic,real]

Writes bench/results/hosttable.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine  # noqa: E402 - bench/engine.py: the inputs and the gateway's decision path

from gateway.policy import DeviceContext, compile_text  # noqa: E402
from gateway.policy import hosttable  # noqa: E402
from gateway.runtime import hosttablefile  # noqa: E402


def _pass(snap, device, urls, now) -> tuple[float, list, list]:   # type: ignore[no-untyped-def]
    decision = engine.gateway_decision
    perf = time.perf_counter_ns
    samples, verdicts = [], []
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    for url in urls:
        s = perf()
        v = decision(snap, device, url, now)
        samples.append(perf() - s)
        verdicts.append((v.action, v.rule_id))
    total = time.perf_counter() - t0
    gc.enable()
    return total, samples, verdicts


def _lookup_ns(table, names: list[str]) -> float:   # type: ignore[no-untyped-def]
    get = table.get
    gc.disable()
    t0 = time.perf_counter_ns()
    for name in names:
        get(name)
    dt = time.perf_counter_ns() - t0
    gc.enable()
    return dt / len(names)


def _asked(urls: list[str]) -> list[str]:
    """Every name a decision asks the suffix table for: the host and each of its suffixes."""
    out = []
    for url in urls:
        host = url.split("/")[2].split(":")[0].lower()
        labels = host.split(".")
        out += [".".join(labels[i:]) for i in range(len(labels))]
    return out


def scenario(name: str, data: dict, repeats: int, work: Path) -> dict:
    text, lists = engine.kanmon_inputs(data)
    t0 = time.perf_counter()
    snap = compile_text(text, lists, filename="bench.yaml")
    compile_s = time.perf_counter() - t0
    dicts = {"exact": snap._exact, "suffix": snap._suffix}
    mapped, files = {}, {}
    for table_name, table in dicts.items():
        if len(table) < 4096:
            continue
        t0 = time.perf_counter()
        data_bytes = hosttable.encode_parts(table)
        encode_s = time.perf_counter() - t0
        if data_bytes is None:
            files[table_name] = {"names": len(table), "mapped": False}
            continue
        t0 = time.perf_counter()
        digest = hosttablefile.write(work, data_bytes)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        mapped[table_name] = hosttablefile.open_table(work, digest)
        open_s = time.perf_counter() - t0
        files[table_name] = {"names": len(table), "file_mib": (work / f"{digest}.hosts").stat().st_size / 2**20, "encode_s": encode_s,
                             "write_s": write_s, "open_check_s": open_s}
    device = DeviceContext("bench", frozenset({"staff"}), "org")
    now = datetime.now(timezone.utc)
    urls = data["urls"]

    def use(tables: dict) -> None:
        snap._exact = tables.get("exact", dicts["exact"])
        snap._suffix = tables.get("suffix", dicts["suffix"])

    passes: dict[str, list] = {"dict": [], "mapped": []}
    verdicts: dict[str, list] = {}
    order = [("dict", {}), ("mapped", mapped)]
    for r in range(repeats):
        for label, tables in (order if r % 2 == 0 else order[::-1]):
            use(tables)
            total, samples, got = _pass(snap, device, urls, now)
            passes[label].append((total, samples))
            verdicts.setdefault(label, got)
    use({})
    same = verdicts["dict"] == verdicts["mapped"]
    rows = {label: engine.summarize(p, len(urls)) for label, p in passes.items()}
    asked = _asked(urls)
    lookups = {}
    if "suffix" in mapped:
        hits = [n for n in asked if n in dicts["suffix"]]
        misses = [n for n in asked if n not in dicts["suffix"]]
        for label, table in (("dict", dicts["suffix"]), ("mapped", mapped["suffix"])):
            lookups[label] = {"hit_ns": statistics.median(_lookup_ns(table, hits) for _ in range(3)) if hits else None,
                              "miss_ns": statistics.median(_lookup_ns(table, misses) for _ in range(3))}
        lookups["asked_per_decision"] = len(asked) / len(urls)
        lookups["hit_share"] = len(hits) / len(asked)
    return {"compile_s": compile_s, "urls": len(urls), "tables": files, "decisions": rows, "lookups": lookups,
            "verdicts_identical": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", type=int, default=1_000_000)
    ap.add_argument("--patterns", type=int, default=10_000)
    ap.add_argument("--urls", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scenarios", default="synthetic,real")
    ap.add_argument("--ut1", default=str(engine.UT1_DEFAULT))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hosttable.json"))
    args = ap.parse_args(argv)
    results: dict = {"machine": {"python": platform.python_version()}, "repeats": args.repeats, "scenarios": {}}
    for name in [s for s in args.scenarios.split(",") if s]:
        if name == "synthetic":
            data = engine.generate(args.domains, args.patterns, args.urls, args.seed)
        elif Path(args.ut1).is_dir():
            data = engine.real_inputs(Path(args.ut1), args.urls, args.seed)
        else:
            results["scenarios"][name] = {"skipped": f"UT1 snapshot not found at {args.ut1}"}
            continue
        with tempfile.TemporaryDirectory(prefix="kanmon-hosttable-") as tmp:
            res = results["scenarios"][name] = scenario(name, data, args.repeats, Path(tmp))
        del data
        print(f"\n{name}: {res['urls']:,} URLs, median of {args.repeats} passes each, alternating; "
              f"verdicts identical: {res['verdicts_identical']}")
        for table_name, t in res["tables"].items():
            print(f"  {table_name} table: {t['names']:,} names" + (
                f", file {t['file_mib']:.1f} MiB, encode {t['encode_s']:.2f} s, write {t['write_s']:.2f} s, "
                f"map+check {t['open_check_s']:.3f} s" if t.get("file_mib") else " (not mapped)"))
        print(f"  {'tables':<10}{'mean µs':>10}{'p50 µs':>10}{'p99 µs':>10}{'decisions/s':>14}")
        for label, row in res["decisions"].items():
            print(f"  {label:<10}{row['mean_us']:>10.2f}{row['p50_us']:>10.2f}{row['p99_us']:>10.2f}{row['decisions_per_s']:>14,.0f}")
        d, m = res["decisions"]["dict"], res["decisions"]["mapped"]
        print(f"  mapped - dict: {m['mean_us'] - d['mean_us']:+.2f} µs mean ({m['mean_us'] / d['mean_us']:.2f}x), "
              f"{m['p50_us'] - d['p50_us']:+.2f} µs p50")
        lk = res["lookups"]
        if lk:
            print(f"  suffix-table lookups: {lk['asked_per_decision']:.1f} per decision, {lk['hit_share']:.0%} hits; "
                  f"dict {lk['dict']['hit_ns'] or 0:.0f} ns hit / {lk['dict']['miss_ns']:.0f} ns miss, "
                  f"mapped {lk['mapped']['hit_ns'] or 0:.0f} ns hit / {lk['mapped']['miss_ns']:.0f} ns miss")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
