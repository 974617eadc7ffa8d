"""Messages per second of the mail verdict engine on the generated corpus.

    python bench/mail.py [--seconds N]

Prints a table and writes bench/results/mail.json. The engine runs without a virus scanner
(clamd time is clamd's, not ours) and with the corpus's in-memory DKIM keys, so DKIM-signed
mails pay for a real RSA verification. The rewrite of tag/neutralize verdicts is timed too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.mail.engine import evaluate_message  # noqa: E402
from gateway.mail.policy import load_mail_policy  # noqa: E402
from gateway.mail.rewrite import render_message  # noqa: E402
from tests.mailcorpus.build import build_corpus  # noqa: E402


def measure(fn, seconds: float) -> tuple[int, float]:
    count = 0
    start = time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count, elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.3, help="time per mail")
    args = ap.parse_args()
    policy = load_mail_policy(REPO / "policies" / "mail.yaml")
    corpus = build_corpus()
    rows = []
    for mail in corpus.mails:
        verdict = evaluate_message(mail.raw, policy, dns_txt=corpus.dns_txt)
        n, t = measure(lambda: evaluate_message(mail.raw, policy, dns_txt=corpus.dns_txt), args.seconds)
        rn, rt = measure(lambda: render_message(mail.raw, verdict, policy), args.seconds / 3)
        rows.append({"mail": mail.name, "bytes": len(mail.raw), "verdict": str(verdict.action),
                     "judge_per_s": n / t, "judge_ms": 1000 * t / n, "render_ms": 1000 * rt / rn})
    total_n, total_t = 0, 0.0
    for _ in range(3):
        start = time.perf_counter()
        for mail in corpus.mails:
            evaluate_message(mail.raw, policy, dns_txt=corpus.dns_txt)
        total_t += time.perf_counter() - start
        total_n += len(corpus.mails)
    overall = total_n / total_t

    print(f"{'mail':40} {'bytes':>7} {'verdict':>10} {'msg/s':>9} {'judge ms':>9} {'render ms':>9}")
    for r in rows:
        print(f"{r['mail']:40} {r['bytes']:7d} {r['verdict']:>10} {r['judge_per_s']:9.0f} {r['judge_ms']:9.3f} {r['render_ms']:9.3f}")
    print(f"\ncorpus of {len(corpus.mails)} mails, round-robin: {overall:.0f} messages/s")
    out = REPO / "bench" / "results" / "mail.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                               "corpus_messages_per_s": overall, "per_mail": rows}, indent=2), encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
