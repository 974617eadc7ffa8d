"""Judge one hostile message (tests/fuzz/mail_hostile.py) in this process and print what it
cost, as JSON: ``python -m tests.fuzz.mail_bounds_probe CLASS [N]`` or ``--file PATH``.

Run as a child process by the bounds tests, so the peak memory (ru_maxrss) is this message's
alone. The address space is capped (RLIMIT_AS, 2 GiB) so a regression fails the test with a
MemoryError instead of taking the machine down.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024 ** 3, resource.RLIM_INFINITY))
    from gateway.mail.engine import MailContext
    from gateway.mail.judgement import judge_message
    from gateway.mail.policy import load_mail_policy
    from tests.fuzz.mail_hostile import CLASSES

    class NoStore:
        def put(self, raw, verdict, context):
            return "20261205T000000Z-000000000000"

    policy = load_mail_policy(REPO / "policies" / "mail.yaml")
    if argv[0] == "--file":
        name, raw = argv[1], Path(argv[1]).read_bytes()
    else:
        gen, n = CLASSES[argv[0]]
        name, raw = argv[0], gen(int(argv[1]) if len(argv) > 1 else n)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = time.process_time()
    outcome = judge_message(raw, MailContext("inbound"), policy, NoStore())
    cpu = time.process_time() - cpu
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "name": name, "bytes": len(raw), "cpu_seconds": round(cpu, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "start_rss_mb": round(base_rss / 1024, 1),
        "action": outcome.judgement.action,
        "indicators": sorted({i.name for i in outcome.verdict.indicators}),
        "evidence": [[i.evidence.ja, i.evidence.en] for i in outcome.verdict.indicators],
    }, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
