"""Engine benchmark: Kanmon's compiled policy next to python-adblock (adblock-rust), same
rules, same URLs, one run. ``kanmon`` is the gateway's own decision path (issue #22, "one
engine"): ``gateway_decision`` below calls ``request_query`` and ``snapshot.decide`` exactly
as addons/policy.py does for an HTTP request (tests/unit/test_policy_one_engine.py checks
that both call the same functions and agree). Its verdicts are also compared, untimed,
with the reference ``decide(query_for_url(...))`` of the operator tools (same action and
rule on every URL), and with adblock.

Issue #22 removed the native C++ fast path (``decide_url`` in _fastpath.cpp): the gateway
never called it. Its last figures, this benchmark at --urls 50000 --repeats 3 on the project
machine (2 cores, one run, both variants side by side, before the removal): synthetic 1M
domains + 10k patterns, native 3.01 µs mean / 0.80 µs p50 vs Python 10.88 / 6.86 µs, but
compile 9.30 s and 221 MiB vs 5.26 s and 167 MiB; real domains (the shipped example policy +
UT1), native 22.88 µs mean vs Python 23.41 µs, with 99.50 % of URLs handed back to Python.
At the gateway a request costs about 1,100 µs of CPU (issue #22: 909 req/s on one core), so
even the synthetic saving (< 8 µs) is under 1 % of a request, and wiring it in would have
meant a C++ parser of attacker-controlled URLs that takes every fact of the query.

    /tmp/venv/bin/python bench/engine.py            # 1M domains, 10k URL patterns, 200k URLs
    /tmp/venv/bin/python bench/engine.py --quick    # small sizes, a few seconds

A second scenario uses real domains (issue #17): the shipped example policy
(policies/example.yaml with every list in policies/lists/) plus every category of the UT1
snapshot (``--ut1``, default /work/shared/data/ut1-2026-08-17: about 200k domains, UT1
blacklists, Université Toulouse Capitole, CC BY-SA 4.0 — read only, never copied into the
repository) as one block rule per category, after the example's rules. Its URLs are the
corpus tests/corpus/urls.yaml, UT1 domains (bare and with a sub-domain) and the corpus'
allowed hosts with random paths. Same engines, same rows; adblock gets ``||domain^`` for
every list domain and the lists' /regex/ lines (it has no device conditions or tenant
restrictions, so agreement there is below 100% by design: tenant-restricted and BYOD-only
URLs). When the snapshot is absent the scenario is skipped and says why (``--no-real``
skips it on purpose).

Everything synthetic is generated from a fixed seed. Each engine runs in its own forked process so its
compile time and memory (RSS growth while compiling) are its own. Per-decision time includes
turning the URL string into the engine's query (URL parsing) for both engines. Both engines
run the same URL list ``--repeats`` times in the same order, their passes alternating (see
``run_interleaved``); the table shows the median over
the passes of each figure (mean, p50, p99, decisions/s), and the first pass is also reported
on its own ("cold"): RE2 builds its DFA lazily, so Kanmon's first pass over new URLs pays for
building it, which a single-pass run used to count against every decision. Writes
bench/results/engine.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.policy.query import request_query  # noqa: E402 - the gateway's own (gateway_decision)

TLDS = ["com", "net", "org", "jp", "co.jp", "ne.jp", "io", "info", "biz", "de"]
SOURCE_URL = "https://portal.example.lg.jp/"


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def generate(domains: int, patterns: int, urls: int, seed: int) -> dict:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    blocked = [f"{word(rng.randint(4, 10))}{i}.{rng.choice(TLDS)}" for i in range(domains)]
    n_sites = max(1, patterns * 4 // 5)
    sites = [f"site{i}-{word(5)}.{rng.choice(TLDS)}" for i in range(n_sites)]
    host_patterns = [(site, f"/{word(6)}{i}/") for i, site in enumerate(sites)]  # host + path prefix
    generic = [f"/{word(7)}{i}/" for i in range(patterns - n_sites)]  # anywhere in the URL
    clean = [f"{word(rng.randint(5, 12))}.{rng.choice(TLDS)}" for _ in range(max(1000, urls // 10))]
    out = []
    for _ in range(urls):
        r = rng.random()
        tail = f"{word(rng.randint(3, 12))}/{word(8)}.html?q={word(6)}"
        if r < 0.3:
            d = rng.choice(blocked)
            host = d if rng.random() < 0.5 else f"{word(3)}.{d}"
            out.append(f"https://{host}/{tail}")
        elif r < 0.55:
            site, path = rng.choice(host_patterns)
            out.append(f"https://{site}{path}{tail}" if rng.random() < 0.7 else f"https://{site}/{tail}")
        elif r < 0.65:
            g = rng.choice(generic) if generic else "/"
            out.append(f"https://{rng.choice(clean)}/x{g}{tail}")
        else:
            out.append(f"https://www.{rng.choice(clean)}/{tail}")
    return {"blocked": blocked, "host_patterns": host_patterns, "generic": generic, "urls": out}


def kanmon_inputs(data: dict) -> tuple[str, dict[str, tuple[str, str]]]:
    if "policy" in data:  # the real-domain scenario brings its own policy text and lists
        return data["policy"]
    lines = ["version: 1", "settings: {default_action: allow}", "lists:", "  bench: {file: bench.txt, format: domains}", "rules:",
             "  - id: bench-domains", "    action: block", "    match: {list: bench}"]
    if data["host_patterns"]:
        lines += ["  - id: bench-url-host", "    action: block", "    match:", "      url:"]
        lines += [f"        - '{site}{path}*'" for site, path in data["host_patterns"]]
    if data["generic"]:
        lines += ["  - id: bench-url-generic", "    action: block", "    match:", "      url_regex:"]
        lines += [f"        - '{g}'" for g in data["generic"]]
    return "\n".join(lines) + "\n", {"bench": ("bench.txt", "\n".join(data["blocked"]) + "\n")}


def adblock_rules(data: dict) -> list[str]:
    if "adblock_rules" in data:
        return list(data["adblock_rules"])
    rules = [f"||{d}^" for d in data["blocked"]]
    rules += [f"||{site}{path}" for site, path in data["host_patterns"]]
    # "/x/" would be an ABP regex filter; the trailing "*" keeps it a plain substring filter,
    # which is what the Kanmon side (an RE2 search for the literal) means too.
    rules += [f"{g}*" for g in data["generic"]]
    return rules


UT1_DEFAULT = Path("/work/shared/data/ut1-2026-08-17")
ROOT = Path(__file__).resolve().parent.parent


def _usable_list_text(text: str, name: str) -> tuple[str, int]:
    """The lines of a UT1 ``domains`` file the policy list parser accepts (UT1 has a few IP
    addresses and odd names; one bad line would refuse the whole policy), and how many
    lines were dropped."""
    from gateway.policy.lists import parse_list

    lines = text.splitlines()
    _, errors = parse_list(text, name, name, fmt="domains")
    bad = {e.line for e in errors}
    if len(errors) >= 100:  # the parser stops at 100 errors per file: check line by line
        bad = {i for i, line in enumerate(lines, 1) if parse_list(line, name, name, fmt="domains")[1]}
    kept = [line for i, line in enumerate(lines, 1) if i not in bad]
    return "\n".join(kept) + "\n", len(bad)


def real_inputs(ut1: Path, urls: int, seed: int) -> dict:
    """The shipped example policy plus one block rule per UT1 category, and URLs drawn from
    the corpus, UT1 and the corpus' allowed hosts."""
    import yaml

    from gateway.policy.lists import parse_list

    rng = random.Random(seed)
    policy_path = ROOT / "policies" / "example.yaml"
    doc = yaml.safe_load(policy_path.read_text(encoding="utf-8"))
    lists: dict[str, tuple[str, str]] = {}
    adblock: list[str] = []
    for name, spec in doc["lists"].items():
        path = policy_path.parent / spec["file"]
        text = path.read_text(encoding="utf-8")
        lists[name] = (str(path), text)
        parsed, _ = parse_list(text, name, str(path), spec.get("format", "auto"))
        adblock += [f"||{d}^" for d in sorted(parsed.suffix | parsed.exact)] + [f"/{r}/" for r, _line in parsed.regexes]
    ut1_domains: list[str] = []
    skipped = 0
    categories = sorted(d.name for d in ut1.iterdir() if (d / "domains").is_file())
    for cat in categories:
        text, dropped = _usable_list_text((ut1 / cat / "domains").read_text(encoding="utf-8", errors="replace"), cat)
        skipped += dropped
        name = f"ut1-{cat}"
        lists[name] = (str(ut1 / cat / "domains"), text)
        doc["lists"][name] = {"file": f"{name}.txt", "format": "domains"}
        doc["rules"].append({"id": f"ut1-{cat}", "category": cat, "action": "block", "match": {"list": name}})
        names = text.split()
        ut1_domains += names
        adblock += [f"||{d}^" for d in names]
    corpus = yaml.safe_load((ROOT / "tests" / "corpus" / "urls.yaml").read_text(encoding="utf-8"))
    corpus_urls = [e["url"] for items in corpus.values() for e in items]
    allowed_hosts = sorted({u.split("/")[2] for u in (e["url"] for e in corpus.get("needed", []))})
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = list(corpus_urls)
    while len(out) < urls:
        tail = "".join(rng.choice(letters) for _ in range(8))
        if rng.random() < 0.5:
            d = rng.choice(ut1_domains)
            out.append(f"https://{d if rng.random() < 0.5 else 'www.' + d}/{tail}.html")
        else:
            out.append(f"https://{rng.choice(allowed_hosts)}/{tail}/index.html?q={tail}")
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    return {"policy": (text, lists), "adblock_rules": adblock, "urls": out[:max(urls, len(corpus_urls))],
            "meta": {"ut1": str(ut1), "categories": len(categories), "ut1_domains": len(ut1_domains),
                     "ut1_lines_skipped": skipped, "shipped_lists": len(doc["lists"]) - len(categories),
                     "list_entries_total": len(adblock), "corpus_urls": len(corpus_urls)}}


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    s = sorted(samples_ns)
    return s[len(s) // 2] / 1000, s[min(len(s) - 1, int(len(s) * 0.99))] / 1000


def summarize(passes: list[tuple[float, list[int]]], n: int) -> dict:
    """Per pass (wall seconds, per-decision ns samples) -> medians over the passes, plus
    the first pass on its own ("cold")."""
    rows = []
    for total, samples in passes:
        p50, p99 = _percentiles(samples)
        rows.append({"decisions_per_s": n / total, "mean_us": statistics.fmean(samples) / 1000, "p50_us": p50, "p99_us": p99})
    out: dict = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    out["cold_mean_us"] = rows[0]["mean_us"]
    out["pass_mean_us"] = [r["mean_us"] for r in rows]
    return out


def gateway_decision(snap, device, url: str, now: datetime):  # type: ignore[no-untyped-def]
    """The HTTP request decision as addons/policy.py makes it (``requestheaders``): the host
    and URL mitmproxy gives it (``pretty_host``, ``pretty_url``), then ``request_query`` and
    ``snapshot.decide``. The host and port are split off the URL here the simple way
    mitmproxy would have (counted in the time, as adblock parses its URLs too)."""
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    host, colon, port = authority.rpartition(":") if not authority.endswith("]") else (authority, "", "")
    if not colon or not port.isdigit():
        host, port = authority, ("443" if scheme == "https" else "80")
    return snap.decide(request_query(device, host.strip("[]"), url, scheme, "GET", None, int(port), None, None, now))


def run_kanmon(data: dict, repeats: int, conn) -> None:  # type: ignore[no-untyped-def]
    """The gateway's decision path (``gateway_decision``) over the URLs."""
    from gateway.policy import DeviceContext, compile_text, query_for_url
    from gateway.runtime.heaptrim import give_back_freed_memory
    from gateway.verdict import Action

    text, lists = kanmon_inputs(data)
    gc.collect()
    before = rss_kib()
    t0 = time.perf_counter()
    snap = compile_text(text, lists, filename="bench.yaml")
    give_back_freed_memory()  # what the gateway's loader does after every compile
    compile_s = time.perf_counter() - t0
    rss = rss_kib() - before
    del text, lists
    device = DeviceContext("bench", frozenset({"staff"}), "org")
    urls = data["urls"]
    now = datetime.now(timezone.utc)
    perf = time.perf_counter_ns
    decision = gateway_decision
    block = Action.BLOCK
    passes = []
    conn.send("ready")
    for _ in range(repeats):  # the loop body is the same shape as run_adblock's
        conn.recv()  # the parent's turn signal: the engines' passes alternate
        samples, blocked, verdicts = [], [], []
        gc.collect()
        gc.disable()  # same for every engine: time decisions, not collector pauses
        t0 = time.perf_counter()
        for url in urls:
            s = perf()
            v = decision(snap, device, url, now)
            samples.append(perf() - s)
            blocked.append(v.action is block)
            verdicts.append(v)
        passes.append((time.perf_counter() - t0, samples))
        gc.enable()
        conn.send("pass")
    # Untimed: the reference path of the operator tools on the same URLs.
    reference = [snap.decide(query_for_url(url, device, now=now)) for url in urls]
    same = sum((v.action, v.rule_id) == (r.action, r.rule_id) for v, r in zip(verdicts, reference))
    conn.send({"engine": "kanmon", "path": "gateway", "compile_s": compile_s, "rss_mib": rss / 1024,
               **summarize(passes, len(urls)), "agreement_reference": same / len(urls), "blocked": blocked})


def run_adblock(data: dict, repeats: int, conn) -> None:  # type: ignore[no-untyped-def]
    import adblock

    rules = adblock_rules(data)
    gc.collect()
    before = rss_kib()
    t0 = time.perf_counter()
    fs = adblock.FilterSet(debug=False)
    fs.add_filters(rules, format="standard")
    engine = adblock.Engine(filter_set=fs, optimize=True)
    compile_s = time.perf_counter() - t0
    del rules, fs
    gc.collect()
    rss = rss_kib() - before
    urls = data["urls"]
    perf = time.perf_counter_ns
    check = engine.check_network_urls
    passes = []
    conn.send("ready")
    for _ in range(repeats):
        conn.recv()
        samples, blocked = [], []
        gc.collect()
        gc.disable()  # same for both engines: time decisions, not collector pauses
        t0 = time.perf_counter()
        for url in urls:
            s = perf()
            r = check(url, SOURCE_URL, "other")
            samples.append(perf() - s)
            blocked.append(r.matched)
        passes.append((time.perf_counter() - t0, samples))
        gc.enable()
        conn.send("pass")
    conn.send({"engine": "adblock", "compile_s": compile_s, "rss_mib": rss / 1024, **summarize(passes, len(urls)),
               "blocked": blocked})


def run_interleaved(data: dict, repeats: int) -> list[dict]:
    """Each engine in its own forked process (its own compile time and RSS), set up one after
    the other; then their passes alternate, the order rotating every pass (kanmon, adblock;
    adblock, kanmon; ...), so a burst of load from other work
    on a shared machine hits every engine alike instead of whichever happened to run then."""
    ctx = mp.get_context("fork")  # the children inherit the generated data without copying it
    workers = []
    for target, args in ((run_kanmon, ()), (run_adblock, ())):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(data, repeats, child, *args))
        proc.start()
        # The parent keeps only its own end: a child that dies (at import, in the compile) then
        # closes the pipe's last writer and recv() raises EOFError instead of waiting for ever.
        child.close()
        try:
            ready = parent.recv()  # compiled before the next one starts compiling
        except EOFError:
            ready = None
        if ready != "ready":
            raise RuntimeError(f"{target.__name__} did not start (exit code {proc.join(5) or proc.exitcode})")
        workers.append((proc, parent))
    for r in range(repeats):
        shift = r % len(workers)
        for _proc, pipe in workers[shift:] + workers[:shift]:
            pipe.send("go")
            pipe.recv()
    results = [pipe.recv() for _proc, pipe in workers]
    for proc, _pipe in workers:
        proc.join()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Kanmon policy engine vs python-adblock")
    ap.add_argument("--domains", type=int, default=1_000_000)
    ap.add_argument("--patterns", type=int, default=10_000)
    ap.add_argument("--urls", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="passes over the URL list per engine (medians reported)")
    ap.add_argument("--quick", action="store_true", help="20k domains, 1k patterns, 20k URLs")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "engine.json"))
    ap.add_argument("--ut1", default=str(UT1_DEFAULT), help="UT1 snapshot for the real-domain scenario (read only)")
    ap.add_argument("--no-real", action="store_true", help="skip the real-domain scenario")
    args = ap.parse_args(argv)
    if args.quick:
        args.domains, args.patterns, args.urls = 20_000, 1_000, 20_000
    t0 = time.perf_counter()
    data = generate(args.domains, args.patterns, args.urls, args.seed)
    gen_s = time.perf_counter() - t0
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    k, a = run_interleaved(data, args.repeats)
    n = len(data["urls"])
    agree = sum(x == y for x, y in zip(k.pop("blocked"), a.pop("blocked"))) / n
    ratio = k["mean_us"] / a["mean_us"]
    rows = [("compile (s)", "compile_s", "{:.2f}"), ("RSS growth (MiB)", "rss_mib", "{:.0f}"),
            ("decisions/s", "decisions_per_s", "{:,.0f}"), ("mean (µs)", "mean_us", "{:.2f}"),
            ("p50 (µs)", "p50_us", "{:.2f}"), ("p99 (µs)", "p99_us", "{:.2f}"),
            ("cold pass mean (µs)", "cold_mean_us", "{:.2f}")]
    print(f"\n{args.domains:,} domains, {args.patterns:,} URL patterns, {args.urls:,} URLs (seed {args.seed}; generated in {gen_s:.1f}s); "
          f"median of {args.repeats} passes")
    _table(k, a, rows)
    print(f"verdict agreement with adblock: {agree:.4%}; gateway path vs reference (query_for_url): "
          f"{k['agreement_reference']:.4%} same action and rule")
    print(f"goal per-decision time <= 0.5x adblock: {'met' if ratio <= 0.5 else 'NOT met'} ({ratio:.2f}x)")
    real = None if args.no_real else run_real(Path(args.ut1), args.urls, args.seed, args.repeats, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "sizes": {"domains": args.domains, "patterns": args.patterns, "urls": args.urls, "seed": args.seed,
                  "repeats": args.repeats},
        "machine": {"python": platform.python_version(), "cpus": mp.cpu_count()},
        "kanmon": k, "adblock": a, "per_decision_ratio": ratio, "agreement": agree, "goal_met": ratio <= 0.5,
        "kanmon_path": k["path"],
        "real": real if real is not None else {"skipped": "--no-real"},
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _table(k: dict, a: dict, rows: list) -> None:
    print(f"{'':<20}{'kanmon (gateway)':>18}{'adblock':>12}{'kanmon/adblock':>16}")
    for label, key, fmt in rows:
        print(f"{label:<20}{fmt.format(k[key]):>18}{fmt.format(a[key]):>12}"
              f"{k[key] / a[key] if a[key] else float('nan'):>16.2f}")


def run_real(ut1: Path, urls: int, seed: int, repeats: int, rows: list) -> dict:
    """The real-domain scenario (module docstring); returns its JSON part, or why it was
    skipped."""
    if not (ut1.is_dir() and any((d / "domains").is_file() for d in ut1.iterdir())):
        reason = f"UT1 snapshot not found at {ut1} (pass --ut1 DIR with <category>/domains files)"
        print(f"\nreal-domain scenario skipped: {reason}")
        return {"skipped": reason}
    t0 = time.perf_counter()
    data = real_inputs(ut1, urls, seed)
    prep_s = time.perf_counter() - t0
    meta = data.pop("meta")
    k, a = run_interleaved(data, repeats)
    n = len(data["urls"])
    agree = sum(x == y for x, y in zip(k.pop("blocked"), a.pop("blocked"))) / n
    print(f"\nreal domains: shipped example policy ({meta['shipped_lists']} lists) + UT1 {meta['categories']} categories, "
          f"{meta['ut1_domains']:,} domains ({meta['ut1_lines_skipped']} unusable lines skipped), {n:,} URLs "
          f"({meta['corpus_urls']} from tests/corpus; read in {prep_s:.1f}s); median of {repeats} passes")
    _table(k, a, rows)
    print(f"block agreement with adblock: {agree:.4%} (adblock has no tenant restrictions or device conditions); "
          f"gateway path vs reference (query_for_url): {k['agreement_reference']:.4%} same action and rule")
    return {"source": "UT1 blacklists, Université Toulouse Capitole (CC BY-SA 4.0)", **meta, "urls": n,
            "kanmon": k, "adblock": a, "agreement": agree, "kanmon_path": k["path"]}


if __name__ == "__main__":
    raise SystemExit(main())
