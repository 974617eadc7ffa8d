"""Issue #17: a corpus of real URLs (tests/corpus/urls.yaml: services the guidelines ban and
sites staff need, including hosts on a banned host's registered domain) gets the expected
verdict from the shipped example policy, through the operator's own command
`kanmon policy test --json` run once in a subprocess with every URL. Where the machine can
(root and `unshare`), the command runs in a new network namespace with no interface up:
the test then also proves that `policy test` needs no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus" / "urls.yaml"
POLICY = ROOT / "policies" / "example.yaml"
VERDICTS = {"allow", "block", "tenant-restrict", "monitor", "no-inspect"}


def load_corpus() -> list[dict]:
    data = yaml.safe_load(CORPUS.read_text(encoding="utf-8"))
    entries = []
    for category, items in data.items():
        for item in items:
            assert set(item) <= {"url", "expect", "rule", "why"} and item["expect"] in VERDICTS, item
            assert item.get("why"), f"{item['url']}: every entry says why"
            entries.append({**item, "category": category})
    return entries


def run_policy_test(urls: list[str]) -> tuple[list[dict], bool]:
    cmd = [sys.executable, "-m", "gateway.cli", "policy", "test", "--policy", str(POLICY), "--json"]
    offline = os.geteuid() == 0 and shutil.which("unshare") is not None
    if offline:
        cmd = ["unshare", "--net", "--", *cmd]   # a fresh namespace: only a down loopback
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, input="\n".join(urls) + "\n", capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()], offline


def test_corpus_is_large_real_and_unique():
    entries = load_corpus()
    urls = [e["url"] for e in entries]
    assert len(urls) >= 300 and len(set(urls)) == len(urls), [u for u, n in Counter(urls).items() if n > 1]
    counts = Counter(e["category"] for e in entries)
    assert counts["needed"] >= 100 and all(n >= 10 for n in counts.values()), counts
    # hosts next to a banned one on the same registered domain are in the corpus
    for url in ("https://news.yahoo.co.jp/", "https://outlook.office.com/mail/", "https://www.icloud.com/"):
        assert url in urls


def test_shipped_policy_gives_every_corpus_url_its_expected_verdict():
    entries = load_corpus()
    results, _ = run_policy_test([e["url"] for e in entries])
    assert [r["url"] for r in results] == [e["url"] for e in entries]
    wrong = []
    for entry, got in zip(entries, results):
        want_rule = entry.get("rule")
        if got["verdict"] != entry["expect"] or (want_rule is not None and got["rule"] != want_rule) \
                or (entry["expect"] == "allow" and want_rule is None and got["rule"] is not None):
            wrong.append(f"{entry['category']}: {entry['url']} expected {entry['expect']}/{want_rule}, "
                         f"got {got['verdict']}/{got['rule']} ({got['explain']})")
    assert not wrong, f"{len(wrong)} of {len(entries)} URLs:\n" + "\n".join(wrong)
