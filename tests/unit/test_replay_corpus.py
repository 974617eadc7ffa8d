"""tests/replay: the committed corpus is what build.py makes, and every flow has an expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.replay.capture import STREAM, read_capture, split_flows
from gateway.replay.expectations import OUTCOMES, load_expectations

REPLAY = Path(__file__).resolve().parents[1] / "replay"


def test_build_is_deterministic_and_the_committed_corpus_is_current(tmp_path):
    proc = subprocess.run([sys.executable, str(REPLAY / "build.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    built = (tmp_path / "corpus.pcapng").read_bytes()
    assert built == (REPLAY / "corpus.pcapng").read_bytes(), "run: python tests/replay/build.py tests/replay"


def test_build_without_outdir_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(REPLAY / "build.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_every_flow_has_exactly_one_expectation_and_the_corpus_covers_the_issue():
    flows = split_flows(read_capture(REPLAY / "corpus.pcapng"))
    expect = load_expectations(REPLAY / "expect.yaml")
    assert [f.id for f in flows] == list(expect.flows)
    assert expect.max_bypass == 0
    ids = set(expect.flows)
    for needed in ("http-allowed", "http-blocked", "tls-sni-allowed", "tls-sni-blocked", "tls-no-sni",
                   "dns-blocked", "dns-https-ech", "doh-https", "dot-853", "quic-initial", "frag-dns", "frag-overlap",
                   "tcp-syn-with-data", "http-out-of-order", "tcp-rst-storm", "spoof-other-device-syn", "spoof-foreign",
                   "oversized-udp", "truncated-ip-length", "garbage-not-ip"):
        assert needed in ids
        assert needed + "-v6" in ids or not any(i.startswith(needed + "-v6") for i in ids)
    assert sum(1 for i in ids if "v6" in i) >= 15
    assert {e.outcome for e in expect.flows.values()} <= set(OUTCOMES)
    by_id = {f.id: f for f in flows}
    assert by_id["http-out-of-order"].mode == STREAM and by_id["http-out-of-order"].payload.startswith(b"GET /replay/ooo ")
    assert by_id["tcp-syn-with-data"].mode != STREAM and by_id["tcp-rst-storm"].mode != STREAM
    assert len(by_id["tcp-rst-storm"].packets) == 40
