"""Operator-input bounds (issue #15): what hostile and maximal inputs cost, and what the one
host normalization (gateway/hostname.py) costs on the per-request path.

    /work/main/.venv/bin/python bench/loadbounds.py            # writes bench/results/loadbounds.json

Three tables:
1. hostile inputs: CPU time and peak RSS of the child process that loads each one (each runs
   in its own forked process, so one input's memory is not counted against the next) and
   the error it gets;
2. the largest inputs the bounds let through (how long a legitimate but huge file takes);
3. host normalization, ns per call, min of 7 repeats: the function before issue #15 (stdlib
   IDNA 2003, copied below as ``before``) and after (UTS 46), for the spellings a request
   carries. Plain lower-case ASCII is nearly every request (browsers send punycode).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import timeit
from datetime import datetime, timezone
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["x0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _policy(rules: int) -> str:
    return "version: 1\nrules:\n" + "".join(
        f"  - id: r{i}\n    action: block\n    match:\n      domain: [h{i}.example, h{i}.test]\n" for i in range(rules))


def _hostile_cases(tmp: Path) -> list[tuple[str, str, object]]:
    """(name, kind, input): kind "policy-text" compiles text, "policy-file" loads a file."""
    fifo = tmp / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    shadow = tmp / "shadow"
    shadow.write_text("".join(f"user{i}:$6$salt$hash{i}:19000:0:99999:7:::\n" for i in range(5000)))
    list_policy = {}
    for name, target in (("dev-zero", "/dev/zero"), ("fifo", str(fifo)), ("shadow", str(shadow))):
        p = tmp / f"{name}.yaml"
        p.write_text(f"version: 1\nlists:\n  l: {{file: '{target}'}}\nrules: [{{id: r, action: block, match: {{list: l}}}}]\n")
        list_policy[name] = str(p)
    return [
        (f"alias bomb ({len(alias_bomb())} bytes, 9x9)", "policy-text", "version: 1\n" + alias_bomb()),
        ("flow nesting, depth 100,000", "policy-text", "version: 1\nx: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ("block nesting, depth 1,000", "policy-text", "version: 1\nx:\n" + "".join("  " * (i + 1) + "k:\n" for i in range(1000))),
        ("5,000-digit integer", "policy-text", "version: " + "9" * 5000 + "\n"),
        ("!!int abc", "policy-text", "version: !!int abc\n"),
        ("expires: 2025-13-01", "policy-text", "version: 1\nrules:\n  - {id: r, action: block, expires: 2025-13-01}\n"),
        ("5,000-character time zone", "policy-text", "version: 1\nsettings:\n  timezone: " + "A" * 5000 + "\n"),
        ("1 MB line", "policy-text", "version: 1\ndescription: " + "x" * 1_000_000 + "\n"),
        ("list file /dev/zero", "policy-file", list_policy["dev-zero"]),
        ("list file a FIFO (no writer)", "policy-file", list_policy["fifo"]),
        ("list file a password file (5,000 lines)", "policy-file", list_policy["shadow"]),
        ("4 MiB of '- 1' lines", "policy-text", "- 1\n" * (1 << 20)),
    ]


def _max_cases() -> list[tuple[str, str, object]]:
    return [
        ("policy of 10,000 rules (0.9 MB)", "policy-text", _policy(10_000)),
        ("policy of 20,000 rules (220k values, near the bound)", "policy-text", _policy(20_000)),
        ("policy of 25,000 rules (over the 250k-value bound)", "policy-text", _policy(25_000)),
        ("list of 1,000,000 domains (19 MB)", "list-text", "".join(f"host{i}.example{i % 97}.jp\n" for i in range(1_000_000))),
    ]


def _run_one(kind: str, value: object, conn) -> None:
    from gateway.policy import compile_text, load_policy
    from gateway.policy.lists import parse_list
    from gateway.yamlsource import SourceErrors

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    outcome = "loaded"
    try:
        if kind == "policy-text":
            compile_text(str(value), filename="p.yaml")
        elif kind == "policy-file":
            load_policy(str(value))
        else:
            _lst, errors = parse_list(str(value), "l", "l.txt")
            if errors:
                outcome = str(errors[0])
    except SourceErrors as exc:
        outcome = f"{len(exc.errors)} error(s): {exc.errors[0]}"
    except BaseException as exc:  # noqa: BLE001 - the table shows it
        outcome = f"EXCEPTION {type(exc).__name__}: {exc}"[:200]
    cpu = time.process_time() - start
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send({"cpu_s": round(cpu, 4), "peak_rss_mib": round(rss1 / 1024, 1), "rss_growth_mib": round((rss1 - rss0) / 1024, 1),
               "outcome": outcome[:160]})


def measure(kind: str, value: object, timeout: float = 120.0) -> dict:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_one, args=(kind, value, child))
    wall = time.monotonic()
    proc.start()
    if not parent.poll(timeout):
        proc.kill()
        return {"outcome": f"HANG (> {timeout:.0f} s)", "cpu_s": None, "peak_rss_mib": None}
    result = parent.recv()
    proc.join()
    result["wall_s"] = round(time.monotonic() - wall, 4)
    return result


def before(host: str | None) -> str | None:
    """normalize_host as it was before issue #15 (gateway/policy/query.py, IDNA 2003)."""
    if not host:
        return None
    h = host.lower()
    while True:
        stripped = h.strip().rstrip(".")
        if stripped.startswith("[") and stripped.endswith("]"):
            stripped = stripped[1:-1]
        if stripped == h:
            break
        h = stripped
    if not h:
        return None
    if ":" in h:
        try:
            return str(ip_address(h))
        except ValueError:
            pass
    if h.isascii():
        return h
    try:
        encoded = h.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return encoded.rstrip(".") or None


HOSTS = [("ascii lower-case", "www.example.co.jp"), ("ascii mixed case + dot", "WWW.Example.CO.JP."),
         ("IDN (例え.jp)", "www.例え.jp"), ("IDN (faß.de)", "faß.de"), ("IPv6 literal", "[2001:DB8::1]")]


def host_table() -> list[dict]:
    from gateway.hostname import normalize_host

    rows = []
    for label, host in HOSTS:
        row = {"input": label, "host": host}
        for name, fn in (("before", before), ("after", normalize_host)):
            timer = timeit.Timer(lambda fn=fn: fn(host))
            number = 20_000
            row[f"{name}_ns"] = round(min(timer.repeat(7, number)) / number * 1e9)
            row[f"{name}_result"] = fn(host)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "loadbounds.json"))
    ap.add_argument("--skip-max", action="store_true", help="skip the (slower) largest-input table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hostile = [{"input": name, **measure(kind, value)} for name, kind, value in _hostile_cases(Path(tmp))]
    maximal = [] if args.skip_max else [{"input": name, **measure(kind, value)} for name, kind, value in _max_cases()]
    hosts = host_table()

    print("\n## Hostile inputs (each in its own process)\n")
    print("| input | CPU s | peak RSS MiB | outcome |\n|---|---:|---:|---|")
    for r in hostile:
        print(f"| {r['input']} | {r['cpu_s']} | {r['peak_rss_mib']} | {r['outcome'][:110]} |")
    if maximal:
        print("\n## Largest inputs within the bounds\n")
        print("| input | CPU s | peak RSS MiB | outcome |\n|---|---:|---:|---|")
        for r in maximal:
            print(f"| {r['input']} | {r['cpu_s']} | {r['peak_rss_mib']} | {r['outcome'][:110]} |")
    print("\n## Host normalization, ns per call (min of 7 x 20,000)\n")
    print("| input | before (IDNA 2003) | after (UTS 46) | before -> | after -> |\n|---|---:|---:|---|---|")
    for r in hosts:
        print(f"| {r['input']} | {r['before_ns']} | {r['after_ns']} | {r['before_result']} | {r['after_result']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
        "machine": platform.node(), "hostile": hostile, "maximal": maximal, "hosts": hosts,
    }, ensure_ascii=False, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
