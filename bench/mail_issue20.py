"""What issue #20's two mail features cost per message, each measured against itself switched
off in the same run (alternating, medians of CPU time: the machine is shared).

* html_to_text: the whole judgement (verdict + rewrite, gateway/mail/judgement.py) of HTML mail
  with ``html_to_text: always`` and with ``neutralized`` (the behaviour before), and the
  conversion alone (rewrite.html_as_text), for HTML bodies from 10 KB to 3.9 MB (the cap is
  4 MiB) and the corpus's clean HTML mail.
* outbound guard: the judgement of a submitted mail with 12 and 1,000 recipients in To and a
  1 MB body, guard enabled and disabled.

    python bench/mail_issue20.py [--rounds 5]

Prints a table and writes bench/results/mail_issue20.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.mail.engine import MailContext  # noqa: E402
from gateway.mail.judgement import judge_message  # noqa: E402
from gateway.mail.policy import load_mail_policy  # noqa: E402
from gateway.mail.rewrite import html_as_text  # noqa: E402
from tests.mailcorpus.build import build_corpus  # noqa: E402

ORG = "city.kanmon.example.jp"


class NoStore:
    def put(self, raw, verdict, context):
        return "q"


def html_mail(size: int) -> bytes:
    row = "<tr><td>項目</td><td><a href='https://city.kanmon.example.jp/x'>リンク</a></td></tr>\n"
    html = "<html><body><table>" + row * max(1, size // len(row.encode())) + "</table></body></html>"
    return (f"From: sato@{ORG}\r\nTo: taro@{ORG}\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() + html.encode()


def outbound_mail(n: int, body_bytes: int) -> tuple[bytes, tuple[str, ...]]:
    rcpts = tuple(f"user{i}@partner{i % 7}.example.com" for i in range(n))
    body = ("本文の行です。\r\n" * (body_bytes // 24 + 1))
    raw = (f"From: hanako@{ORG}\r\nTo: {', '.join(rcpts)}\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body).encode()
    return raw, rcpts


def cpu_ms(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        samples.append(1000 * (time.process_time() - start))
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    policy = load_mail_policy(REPO / "policies" / "mail.yaml")
    before = dataclasses.replace(policy, html_to_text="neutralized")
    corpus = build_corpus()
    inbound = MailContext("inbound")
    html_rows = []
    cases = [("corpus clean-utf8-html", corpus.by_name("clean-utf8-html").raw)]
    cases += [(f"HTML table {size // 1000} KB", html_mail(size)) for size in (10_000, 100_000, 1_000_000, 3_900_000)]
    for label, raw in cases:
        after_ms, before_ms = [], []
        for _ in range(args.rounds):   # alternating: a neighbour's burst hits both sides alike
            after_ms.append(cpu_ms(lambda: judge_message(raw, inbound, policy, NoStore()), 1))
            before_ms.append(cpu_ms(lambda: judge_message(raw, inbound, before, NoStore()), 1))
        convert = cpu_ms(lambda: html_as_text(raw), args.rounds)
        html_rows.append({"mail": label, "bytes": len(raw), "judgement_ms_neutralized": statistics.median(before_ms),
                          "judgement_ms_always": statistics.median(after_ms), "conversion_ms": convert})
    guard_rows = []
    off = dataclasses.replace(policy, outbound_guard=dataclasses.replace(policy.outbound_guard, enabled=False))
    for n in (12, 1000):
        raw, rcpts = outbound_mail(n, 1_000_000)
        ctx = MailContext("outbound", None, f"hanako@{ORG}", rcpts)
        on_ms, off_ms = [], []
        for _ in range(args.rounds):
            on_ms.append(cpu_ms(lambda: judge_message(raw, ctx, policy, NoStore()), 1))
            off_ms.append(cpu_ms(lambda: judge_message(raw, ctx, off, NoStore()), 1))
        action = judge_message(raw, ctx, policy, NoStore()).judgement.action
        guard_rows.append({"mail": f"{n} recipients in To, 1 MB body", "bytes": len(raw), "action": action,
                           "judgement_ms_guard_off": statistics.median(off_ms),
                           "judgement_ms_guard_on": statistics.median(on_ms)})

    print(f"{'HTML mail (inbound)':28} {'bytes':>9} {'judge ms, before':>17} {'judge ms, always':>17} {'conversion ms':>14}")
    for r in html_rows:
        print(f"{r['mail']:28} {r['bytes']:9d} {r['judgement_ms_neutralized']:17.1f} "
              f"{r['judgement_ms_always']:17.1f} {r['conversion_ms']:14.1f}")
    print(f"\n{'submitted mail':34} {'bytes':>9} {'action':>7} {'guard off ms':>13} {'guard on ms':>12}")
    for r in guard_rows:
        print(f"{r['mail']:34} {r['bytes']:9d} {r['action']:>7} {r['judgement_ms_guard_off']:13.1f} "
              f"{r['judgement_ms_guard_on']:12.1f}")
    print(f"\nCPU time, medians of {args.rounds} alternating rounds")
    out = REPO / "bench" / "results" / "mail_issue20.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": platform.python_version(), "machine": platform.machine(),
                               "rounds": args.rounds, "html_to_text": html_rows, "outbound_guard": guard_rows},
                              indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
