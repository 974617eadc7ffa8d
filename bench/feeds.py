"""Category feeds (issue #17): what a real feed costs to take in, and what hostile feed
files cost to refuse.

    /work/main/.venv/bin/python bench/feeds.py [--ut1 DIR]     # writes bench/results/feeds.json

Each case runs in its own forked process (CPU time and that process's peak RSS, so one case's
memory is not counted against the next):
1. the UT1 snapshot (/work/shared/data/ut1-2026-08-17, CC BY-SA 4.0, every category it has):
   update from the directory and from a blacklists.tar.gz built from it (fetch, parse,
   public-suffix check, store), then a policy compile from the stored copy with one rule per
   category (what the gateway does in a worker thread before the swap);
2. hostile feed files: parse time and outcome.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UT1 = Path("/work/shared/data/ut1-2026-08-17")


def _child(fn, args, q):
    t0 = time.process_time()
    w0 = time.perf_counter()
    try:
        detail = fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        detail = f"error: {type(exc).__name__}: {exc}"
    q.put({"cpu_s": round(time.process_time() - t0, 3), "wall_s": round(time.perf_counter() - w0, 3),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "detail": detail})


def measure(fn, *args) -> dict:
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get(timeout=1800)
    p.join()
    return out


def _policy(tmp: Path, url: str, cats: list[str]) -> Path:
    p = tmp / f"policy-{abs(hash(url))}.yaml"
    p.write_text("version: 1\nlists:\n  ut1:\n" f"    url: {url}\n    format: ut1\n    categories: [{', '.join(cats)}]\n"
                 "    accept_public_suffixes: [bet.br, game.tw, gouv.fr, x.se]\nrules:\n"
                 + "".join(f"  - {{id: c-{c}, action: block, match: {{list: ut1/{c}}}}}\n" for c in cats))
    return p


def _spec(policy: Path):
    from gateway.policy.compiler import parse_policy
    return next(s.feed for s in parse_policy(policy.read_text(), str(policy))[1] if s.feed)


def update_case(policy: str, state: str) -> str:
    from gateway.feeds.update import update_feed
    r = update_feed(_spec(Path(policy)), Path(state))
    snap = r.snapshot
    size = (Path(state) / "ut1.json").stat().st_size if (Path(state) / "ut1.json").exists() else 0
    return (f"{r.outcome} {r.reason or ''} {snap.total() if snap else 0} entries, "
            f"{snap.skipped() if snap else 0} skipped, copy {size / 1e6:.1f} MB").replace("  ", " ")


def compile_case(policy: str, state: str) -> str:
    from gateway.policy.loader import load_policy
    snap = load_policy(policy, feeds_dir=state)
    return f"{len(snap.rules)} rules, lists {sum(v for k, v in snap.lists.items() if '/' in k)} entries"


def parse_case(text_path: str, fmt: str) -> str:
    from gateway.feeds.formats import parse_text
    cat = parse_text(Path(text_path).read_text(), fmt)
    return f"{len(cat)} taken, {cat.skipped} skipped"


def tar_bomb_case(path: str) -> str:
    from gateway.feeds.formats import FeedFormatError, ut1_files_from_tar
    try:
        ut1_files_from_tar(Path(path).read_bytes(), ("webmail",))
    except FeedFormatError as exc:
        return f"refused: {exc.reason}"
    return "accepted"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ut1", default=str(UT1))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "feeds.json"))
    args = ap.parse_args()
    ut1 = Path(args.ut1)
    cats = sorted(d.name for d in ut1.iterdir() if (d / "domains").exists())
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        tar_path = tmp / "blacklists.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar:
            for c in cats:
                for kind in ("domains", "urls"):
                    if (ut1 / c / kind).exists():
                        tar.add(ut1 / c / kind, arcname=f"blacklists/{c}/{kind}")
        for label, url in (("UT1 directory", str(ut1)), (f"UT1 tar.gz ({tar_path.stat().st_size / 1e6:.1f} MB)", str(tar_path))):
            policy, state = _policy(tmp, url, cats), tmp / f"state-{len(rows)}"
            rows.append({"case": f"{label}: update, {len(cats)} categories", **measure(update_case, str(policy), str(state))})
            rows.append({"case": f"{label}: update again (unchanged)", **measure(update_case, str(policy), str(state))})
            rows.append({"case": f"{label}: compile from the copy", **measure(compile_case, str(policy), str(state))})
        # Each hostile file is the default feed cap (max_bytes, 64 MiB) of one kind of line;
        # written line by line, so the parent never holds it (the child's peak RSS is its own).
        cap = 64 * 1024 * 1024
        hostile = {
            "lines of 4,000 '-' (no entry, under the line cap)": ("domains", "-" * 4000 + "\n"),
            "lines over the line cap (5,000 chars)": ("domains", "x" * 5000 + "\n"),
            "abp option / exception / cosmetic lines": ("abp", "||a.example^$third-party\n@@||b.example^\n##.ad\n"),
            "dotted 241-char names (120 labels)": ("domains", "a." * 120 + "x\n"),
            "distinct 60-char names": ("domains", None),
        }
        for label, (fmt, line) in hostile.items():
            path = tmp / "hostile.txt"
            n = 0
            with open(path, "w") as f:
                size = 0
                while size < cap:
                    chunk = line if line is not None else f"{n:012d}-{'h' * 40}.example.jp\n"
                    f.write(chunk)
                    size += len(chunk)
                    n += 1
            rows.append({"case": f"{fmt}: {label}, {n:,} repeats, 64 MiB", **measure(parse_case, str(path), fmt)})
        bomb = io.BytesIO()
        with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
            zeros = tmp / "zeros"
            with open(zeros, "wb") as f:
                f.truncate(600 * 1024 * 1024)
            tar.add(zeros, arcname="blacklists/webmail/domains")
        (tmp / "bomb.tar.gz").write_bytes(bomb.getvalue())
        rows.append({"case": f"tar.gz bomb ({len(bomb.getvalue()) / 1e6:.1f} MB packed, 600 MiB unpacked)",
                     **measure(tar_bomb_case, str(tmp / "bomb.tar.gz"))})
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print("| case | CPU s | wall s | peak RSS MiB | result |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['cpu_s']} | {r['wall_s']} | {r['peak_rss_mib']} | {r['detail']} |")


if __name__ == "__main__":
    main()
