"""Messages per second of the mail verdict engine on the generated corpus.

    python bench/mail.py [--seconds N] [--code CHECKOUT] [--no-pool] [--indicators]
    python bench/mail.py --compare /work/main      # before (that checkout) and after, same run

    # a baseline checkout of main beside this one, for --compare:
    git worktree add --detach ../kanmon-base main && python bench/mail.py --compare ../kanmon-base

Prints a table and writes bench/results/mail.json. The engine runs without a virus scanner
(clamd time is clamd's, not ours) and with the corpus's in-memory DKIM keys, so DKIM-signed
mails pay for a real RSA verification. The rewrite of tag/neutralize verdicts is timed too.

``--code`` imports the gateway (and the corpus) from another checkout, e.g. main before a
change; ``--compare`` runs this script twice in child processes, with the other checkout and
with this one, and prints both. With ``--compare`` both sides judge the very same mails: this
checkout's corpus (tests/mailcorpus/build.py and, since issue 20, the indicator corpus of
tests/mailcorpus/indicators.py) is built once and handed to both children.

``--indicators`` (issue 20) times each indicator family alone over the corpus, on messages
already parsed, and names the slowest: the checks of gateway/mail/content.py (themes, unnatural
Japanese, Han, signature, attachments, icon disguise) and the older families of engine.py. The "judge pool" row (issue #15) is what the gateway really
does per message: the whole judgement (verdict, rewrite, notice) in a worker process of
gateway/mail/judgepool.py, one message after the other, the IPC included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if "--code" in sys.argv:
    CODE = Path(sys.argv[sys.argv.index("--code") + 1]).resolve()
else:
    CODE = REPO
sys.path.insert(0, str(CODE))

from gateway.mail.engine import evaluate_message  # noqa: E402
from gateway.mail.policy import load_mail_policy  # noqa: E402
from gateway.mail.rewrite import render_message  # noqa: E402
from tests.mailcorpus.build import Corpus, CorpusMail, build_corpus  # noqa: E402


def bench_corpus(path: str | None = None):
    """The mails to judge: from ``path`` (a pickle --compare wrote, the same for both sides),
    else this checkout's corpus plus, where the checkout has it, the issue 20 indicator corpus."""
    import pickle
    if path:
        with open(path, "rb") as fh:
            mails, dns = pickle.load(fh)
        return Corpus([CorpusMail(name, raw, frozenset(), "") for name, raw in mails], dns)
    corpus = build_corpus()
    try:
        from tests.mailcorpus.indicators import build_indicator_corpus
    except ImportError:   # a checkout before issue 20
        return corpus
    extra = [CorpusMail("ind-" + m.name, m.raw, frozenset(), m.description) for m in build_indicator_corpus()]
    return Corpus(corpus.mails + extra, corpus.dns)


def indicator_costs(policy, corpus, seconds: float) -> list[dict] | None:
    """Microseconds per message of each indicator family alone, on pre-parsed messages; None
    for a checkout without gateway/mail/content.py."""
    try:
        from gateway.mail import content
    except ImportError:
        return None
    from gateway.mail import engine
    from gateway.mail.authentication import auth_findings
    from gateway.mail.message import parse_message, readable_text
    from gateway.mail.sender import (freemail_findings, header_addresses, impersonation_findings,
                                     mismatch_findings)
    prepared = []
    for mail in corpus.mails:
        parsed = parse_message(mail.raw)
        body = readable_text(parsed)
        senders = header_addresses(parsed.message, "From")
        reply_to = header_addresses(parsed.message, "Reply-To")
        view = content.MailView(parsed, content.subject_of(parsed), body, senders[0].domain if senders else None)
        prepared.append((mail.raw, parsed, body, senders, reply_to, view))

    def sender_checks(p):
        raw, parsed, body, senders, reply_to, view = p
        if senders:
            freemail_findings(senders[0], policy)
            mismatch_findings(senders[0], reply_to, body)
            impersonation_findings(senders[0], policy)

    families = {
        "sender (freemail, mismatch, impersonation)": sender_checks,
        "links (link-text-mismatch, lookalike-domain)":
            lambda p: engine._link_findings(p[1], policy, [a.domain for a in p[3] + p[4]]),
        "attachments (issue 5 names, archives)": lambda p: engine._attachment_findings(p[1], policy),
        "sender-auth-failure (DKIM, Authentication-Results)":
            lambda p: auth_findings(p[0], p[1].message, policy, corpus.dns_txt),
    }
    for name, check in content.CHECKS.items():
        families[name] = (lambda c: lambda p: c(p[5], policy))(check)
    rows = []
    for name, fn in families.items():
        for p in prepared:   # warm (compiles the theme set, fills the Han cache)
            fn(p)
        best = float("inf")
        end = time.perf_counter() + seconds
        while True:
            start = time.process_time()
            for p in prepared:
                fn(p)
            best = min(best, time.process_time() - start)
            if time.perf_counter() >= end:
                break
        rows.append({"indicator": name, "us_per_message": 1e6 * best / len(prepared),
                     "issue20": name in content.CHECKS})
    return rows


def measure(fn, seconds: float) -> tuple[int, float]:
    count = 0
    start = time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count, elapsed


def pool_rate(policy, corpus, rounds: int = 3) -> tuple[float, float] | None:
    """Messages/s of the whole judgement (verdict, rewrite, notice, quarantine store) in this
    process and through the judge pool (1 worker, sequential); None before issue #15."""
    try:
        from gateway.mail.engine import MailContext
        from gateway.mail.judgement import judge_message
        from gateway.mail.judgepool import JudgePool
        from gateway.mail.quarantine import QuarantineStore
    except ImportError:
        return None
    import dataclasses
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        limits = dataclasses.replace(policy.judge, workers=1)
        pool = JudgePool(policy, QuarantineStore(Path(tmp) / "q"), dns_txt=corpus.dns_txt, limits=limits)
        store = QuarantineStore(Path(tmp) / "q")
        try:
            pool.judge(corpus.mails[0].raw, MailContext("inbound"))   # worker started
            rates = []
            for judge in (lambda raw: judge_message(raw, MailContext("inbound"), policy, store, dns_txt=corpus.dns_txt),
                          lambda raw: pool.judge(raw, MailContext("inbound"))):
                start = time.perf_counter()
                for _ in range(rounds):
                    for mail in corpus.mails:
                        judge(mail.raw)
                rates.append(rounds * len(corpus.mails) / (time.perf_counter() - start))
            return rates[0], rates[1]
        finally:
            pool.close()


def compare(other: Path, seconds: float, runs: int) -> int:
    """Before and after alternate ``runs`` times (the machine is shared: a neighbour's burst
    hits both sides alike); the table shows medians."""
    import pickle
    import statistics
    import subprocess
    import tempfile
    corpus = bench_corpus()
    with tempfile.NamedTemporaryFile(suffix=".pickle", delete=False) as fh:
        pickle.dump(([(m.name, m.raw) for m in corpus.mails], corpus.dns), fh)
        corpus_file = fh.name
    samples: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(runs):
        for label, code in (("before", other), ("after", REPO)):
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--code", str(code),
                                   "--seconds", str(seconds), "--json-only", "--corpus", corpus_file,
                                   *(["--indicators"] if label == "after" else [])],
                                  capture_output=True, text=True,
                                  # the judge pool's forkserver imports the gateway again: from
                                  # the checkout under test, not from wherever this was started
                                  cwd=str(code), env={**os.environ, "PYTHONPATH": str(code)})
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return 2
            samples[label].append(json.loads(proc.stdout))

    def med(label: str, key: str) -> float | None:
        values = [r[key] for r in samples[label] if r.get(key)]
        return statistics.median(values) if values else None

    results = {label: rs[-1] for label, rs in samples.items()}
    b, a = results["before"], results["after"]
    eb, ea = med("before", "corpus_messages_per_s"), med("after", "corpus_messages_per_s")
    Path(corpus_file).unlink(missing_ok=True)
    print(f"medians of {runs} alternating runs, the same {len(corpus.mails)} mails on both sides")
    print(f"{'':34} {'before':>10} {'after':>10} {'after/before':>13}")
    print(f"{'engine, corpus round-robin msg/s':34} {eb:10.0f} {ea:10.0f} {ea / eb:13.2f}")
    cb, ca = med("before", "corpus_cpu_ms_per_message"), med("after", "corpus_cpu_ms_per_message")
    print(f"{'engine, CPU ms per message (min)':34} {cb:10.3f} {ca:10.3f} {ca / cb:13.2f}")
    if med("after", "pool_messages_per_s"):
        print(f"{'whole judgement, in process msg/s':34} {'-':>10} {med('after', 'judgement_messages_per_s'):10.0f}")
        print(f"{'whole judgement, judge pool msg/s':34} {'-':>10} {med('after', 'pool_messages_per_s'):10.0f}")
    print_indicators(a.get("indicators"))
    by_name = {r["mail"]: r for r in b["per_mail"]}
    print(f"\n{'mail':40} {'before ms':>10} {'after ms':>10}")
    for r in a["per_mail"]:
        old = by_name.get(r["mail"])
        print(f"{r['mail']:40} {old['judge_ms'] if old else float('nan'):10.3f} {r['judge_ms']:10.3f}")
    out = REPO / "bench" / "results" / "mail_compare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"before_code": str(other), "after_code": str(REPO), "runs": samples,
                               "median_engine_before": eb, "median_engine_after": ea}, indent=2), encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


def print_indicators(rows: list[dict] | None) -> None:
    if not rows:
        return
    print(f"\n{'indicator family (alone, parsed messages)':52} {'µs/message':>11}")
    for r in sorted(rows, key=lambda r: -r["us_per_message"]):
        print(f"{r['indicator'] + (' [issue 20]' if r['issue20'] else ''):52} {r['us_per_message']:11.1f}")
    slowest = max(rows, key=lambda r: r["us_per_message"])
    new = [r for r in rows if r["issue20"]]
    print(f"slowest family: {slowest['indicator']}")
    if new:
        print(f"slowest issue 20 indicator: {max(new, key=lambda r: r['us_per_message'])['indicator']}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.3, help="time per mail")
    ap.add_argument("--code", help="import the gateway from this checkout (default: this one)")
    ap.add_argument("--compare", metavar="CHECKOUT", help="before (CHECKOUT) and after (this checkout), same run")
    ap.add_argument("--runs", type=int, default=3, help="--compare: alternating runs per side")
    ap.add_argument("--no-pool", action="store_true", help="skip the judge pool row")
    ap.add_argument("--indicators", action="store_true", help="time each indicator family alone")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        return compare(Path(args.compare).resolve(), args.seconds, args.runs)
    policy = load_mail_policy(CODE / "policies" / "mail.yaml")
    corpus = bench_corpus(args.corpus)
    rows = []
    for mail in corpus.mails:
        verdict = evaluate_message(mail.raw, policy, dns_txt=corpus.dns_txt)
        n, t = measure(lambda: evaluate_message(mail.raw, policy, dns_txt=corpus.dns_txt), args.seconds)
        rn, rt = measure(lambda: render_message(mail.raw, verdict, policy), args.seconds / 3)
        rows.append({"mail": mail.name, "bytes": len(mail.raw), "verdict": str(verdict.action),
                     "judge_per_s": n / t, "judge_ms": 1000 * t / n, "render_ms": 1000 * rt / rn})
    total_n, total_t = 0, 0.0
    best_cpu = float("inf")
    for _ in range(5):
        start, cpu = time.perf_counter(), time.process_time()
        for mail in corpus.mails:
            evaluate_message(mail.raw, policy, dns_txt=corpus.dns_txt)
        total_t += time.perf_counter() - start
        best_cpu = min(best_cpu, time.process_time() - cpu)
        total_n += len(corpus.mails)
    overall = total_n / total_t
    cpu_ms = 1000 * best_cpu / len(corpus.mails)   # CPU time: what a busy neighbour disturbs least
    rates = None if args.no_pool else pool_rate(policy, corpus)
    judged, pooled = rates if rates else (None, None)
    result = {"python": platform.python_version(), "machine": platform.machine(), "code": str(CODE),
              "corpus_messages_per_s": overall, "corpus_cpu_ms_per_message": cpu_ms,
              "judgement_messages_per_s": judged,
              "pool_messages_per_s": pooled, "per_mail": rows,
              "indicators": indicator_costs(policy, corpus, args.seconds) if args.indicators else None}
    if args.json_only:
        print(json.dumps(result))
        return 0

    print(f"{'mail':40} {'bytes':>7} {'verdict':>10} {'msg/s':>9} {'judge ms':>9} {'render ms':>9}")
    for r in rows:
        print(f"{r['mail']:40} {r['bytes']:7d} {r['verdict']:>10} {r['judge_per_s']:9.0f} {r['judge_ms']:9.3f} {r['render_ms']:9.3f}")
    print_indicators(result["indicators"])
    print(f"\ncorpus of {len(corpus.mails)} mails, round-robin: {overall:.0f} messages/s, {cpu_ms:.3f} ms CPU per message")
    if pooled:
        print(f"whole judgement (verdict, rewrite, notice, quarantine): {judged:.0f} messages/s in process, "
              f"{pooled:.0f} through the judge pool (1 worker process, sequential)")
    out = REPO / "bench" / "results" / "mail.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
