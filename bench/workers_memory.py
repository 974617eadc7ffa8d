"""Memory of Kanmon with `proxy.workers: N` (issue #22), in the namespace lab (needs root).

The workers are forked after the policy compile, so the compiled policy should be shared
copy-on-write, not held N times. Measured from /proc/PID/smaps_rollup of the gateway process
and each worker: RSS, PSS (shared pages divided among the processes sharing them) and USS
(private pages: what the process alone costs). Three moments:

  single      `workers: 1`, the one process (today's gateway)
  started     `workers: N` just after start-up (forked after the compile)
  reloaded    the same after a `kanmon policy apply` of the same policy: each worker loads it
              from the prepared cache into its own memory (see gateway/runtime/workers.py)

Prints a table (MiB) and writes bench/results/workers-memory.json.

    sudo .venv/bin/python bench/workers_memory.py [--workers 2] [--policy policies/example.yaml | --ut1 DIR]

``--ut1 DIR``: instead, a policy that blocks every domain of the UT1 snapshot (about 200k, CC
BY-SA 4.0, /work/shared/data/ut1-*), so the compiled policy is large enough to see the sharing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.lab.topology import Lab  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def rollup(pid: int) -> dict[str, float]:
    """MiB: rss, pss, uss (private clean + dirty), from smaps_rollup."""
    kib = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        kib[key.strip()] = int(rest.split()[0])
    mib = lambda k: round(k / 1024, 1)  # noqa: E731
    return {"rss": mib(kib["Rss"]), "pss": mib(kib["Pss"]),
            "uss": mib(kib["Private_Clean"] + kib["Private_Dirty"])}


def processes(lab: Lab) -> dict[str, int]:
    parent = lab.gateway.proc.pid
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return {"parent": parent, **{f"worker {i}": int(pid) for i, pid in enumerate(children)}}


def measure(lab: Lab) -> dict:
    time.sleep(2)   # settle after start or reload
    rows = {name: rollup(pid) for name, pid in processes(lab).items()}
    rows["total"] = {"rss": round(sum(r["rss"] for r in rows.values()), 1),
                     "pss": round(sum(r["pss"] for r in rows.values()), 1),
                     "uss": round(sum(r["uss"] for r in rows.values()), 1)}
    return rows


def ut1_policy(ut1: Path, directory: Path) -> Path:
    from bench.engine import _usable_list_text   # the same filter as the engine benchmark's real inputs
    domains = sorted({name for f in ut1.glob("*/domains")
                      for name in _usable_list_text(f.read_text(encoding="utf-8", errors="replace"), f.parent.name)[0].split()})
    (directory / "ut1.txt").write_text("\n".join(domains) + "\n")
    path = directory / "ut1.yaml"
    path.write_text("version: 1\nsettings: {default_action: allow}\nlists:\n  ut1: {file: ut1.txt}\n"
                    "rules:\n  - {id: ut1, action: block, reason: ut1, match: {list: ut1}}\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--policy", default=str(ROOT / "policies" / "example.yaml"))
    ap.add_argument("--ut1", metavar="DIR")
    ap.add_argument("--out", default=str(RESULTS / "workers-memory.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kanmon-wmem-"))
    policy = str(ut1_policy(Path(args.ut1), work) if args.ut1 else Path(args.policy).resolve())
    lab = Lab(work / "lab", n_devices=1)
    result: dict = {"workers": args.workers, "policy": policy}
    try:
        lab.build()
        lab.write_config({"policy": {"path": policy}})
        lab.start_gateway()
        result["single"] = measure(lab)
        lab.stop_gateway()
        lab.write_config({"policy": {"path": policy}, "proxy": {"workers": args.workers}})
        lab.start_gateway()
        result["started"] = measure(lab)
        lab.kanmon("policy", "apply", policy, "--config", str(lab.config_path), timeout=300)
        result["reloaded"] = measure(lab)
    finally:
        lab.teardown()
    print(f"\nmemory (MiB) with the policy {policy}; PSS counts a shared page once over its sharers\n")
    print(f"{'moment':10} {'process':10} {'RSS':>8} {'PSS':>8} {'USS':>8}")
    for moment in ("single", "started", "reloaded"):
        for name, row in result[moment].items():
            print(f"{moment:10} {name:10} {row['rss']:8.1f} {row['pss']:8.1f} {row['uss']:8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
