"""Memory of Kanmon with `proxy.workers: N` (issue #22), in the namespace lab (needs root).

The workers are forked after the policy compile, so the compiled policy is shared
copy-on-write at start. After a policy reload every process loads the new policy from the
prepared-policy cache the parent's compile wrote; its big host tables are files every process
maps (gateway/runtime/policycache.py, gateway/policy/hosttable.py), so they stay one copy.
Measured from /proc/PID/smaps_rollup of the gateway process and each worker: RSS, PSS (shared
pages divided among the processes sharing them) and USS (private pages: what the process alone
costs). For each worker count of ``--workers`` (1 is the single process), two moments:

  started     just after start-up
  reloaded    after one `kanmon policy apply`; with ``--reload changed`` (the default with
              ``--ut1``) the list got one more domain first, so the parent compiles anew (a
              feed update or a policy edit), with ``same`` it loads the unchanged policy

Prints a table (MiB) and writes bench/results/workers-memory.json.

    sudo .venv/bin/python bench/workers_memory.py [--workers 1,2] [--policy policies/example.yaml | --ut1 DIR]
    sudo .venv/bin/python bench/workers_memory.py --ut1 DIR --tree /path/to/other/checkout   # "before"

``--ut1 DIR``: instead, a policy that blocks every domain of the UT1 snapshot (about 200k, CC
BY-SA 4.0, /work/shared/data/ut1-*), so the compiled policy is large enough to see the sharing.
``--tree DIR``: measure another checkout (its gateway and lab), e.g. a `git worktree` of the
previous commit; the run starts there so `python -m gateway.cli` imports that tree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_tree = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv[:-1] else str(ROOT)
sys.path.insert(0, str(Path(_tree).resolve()))   # the lab starts the gateway of the tree it is imported from
os.chdir(_tree)   # `python -m gateway.cli` puts the working directory first on the path

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
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated (1: the single process)")
    ap.add_argument("--policy", default=str(ROOT / "policies" / "example.yaml"))
    ap.add_argument("--ut1", metavar="DIR")
    ap.add_argument("--reload", choices=("changed", "same"), help="default: changed with --ut1, else same")
    ap.add_argument("--tree", default=str(ROOT), help="the checkout to measure (default: this one)")
    ap.add_argument("--out", default=str(RESULTS / "workers-memory.json"))
    args = ap.parse_args()
    reload = args.reload or ("changed" if args.ut1 else "same")
    if reload == "changed" and not args.ut1:
        ap.error("--reload changed needs --ut1 (the shipped policy's files are not edited)")
    work = Path(tempfile.mkdtemp(prefix="kanmon-wmem-"))
    policy = str(ut1_policy(Path(args.ut1), work) if args.ut1 else Path(args.policy).resolve())
    counts = [int(n) for n in args.workers.split(",") if n]
    lab = Lab(work / "lab", n_devices=1)
    result: dict = {"tree": str(Path(args.tree).resolve()), "policy": policy, "reload": reload, "runs": {}}
    try:
        lab.build()
        for n in counts:
            if args.ut1:
                ut1_policy(Path(args.ut1), work)   # the same inputs for every run
            lab.write_config({"policy": {"path": policy}, "proxy": {"workers": n}})
            lab.start_gateway(timeout=300)
            run = result["runs"][str(n)] = {"started": measure(lab)}
            if reload == "changed":
                with open(work / "ut1.txt", "a", encoding="utf-8") as fh:
                    fh.write(f"kanmon-bench-reload-{n}.example\n")
            lab.kanmon("policy", "apply", policy, "--config", str(lab.config_path), timeout=300)
            run["reloaded"] = measure(lab)
            # the mapped host-table files the processes share (none before issue #22's change)
            run["host_table_files_mib"] = [round(f.stat().st_size / 2**20, 1)
                                           for f in sorted((lab.state_dir / "policy-cache").glob("*.hosts"))]
            lab.stop_gateway()
    finally:
        lab.teardown()
    print(f"\nmemory (MiB) of {result['tree']} with the policy {policy}, reload: {reload}; "
          "PSS counts a shared page once over its sharers\n")
    print(f"{'workers':8} {'moment':10} {'process':10} {'RSS':>8} {'PSS':>8} {'USS':>8}")
    for n, run in result["runs"].items():
        for moment in ("started", "reloaded"):
            for name, row in run[moment].items():
                print(f"{n:8} {moment:10} {name:10} {row['rss']:8.1f} {row['pss']:8.1f} {row['uss']:8.1f}")
    for n, run in result["runs"].items():
        print(f"{n} worker(s): mapped host-table files after the reload (MiB): {run['host_table_files_mib'] or 'none'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
