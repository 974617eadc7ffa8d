"""The mail judge pool (issue #15): each message is judged in a worker process with a CPU time
and a memory limit; a worker over a limit is ended and replaced and the message gets
message-too-complex (quarantined, with a notice); any other failure raises JudgeFailed so the
addon fails closed. The scanners below run inside the production path (judge_message ->
evaluate_message -> scanner.scan) in the worker: what is limited is the real judgement."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from gateway.mail.engine import MailContext
from gateway.mail.judgepool import JudgeFailed, JudgePool
from gateway.mail.policy import JudgeLimits, load_mail_policy
from gateway.mail.quarantine import QuarantineStore
from gateway.mail.scanner import ScanResult
from tests.fuzz.mail_hostile import anchor_redos
from tests.mailcorpus.build import build_corpus
from tests.mailcorpus.fake_scanner import MarkerScanner

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
CORPUS = build_corpus()


class SpinScanner:
    """Burns CPU until the kernel stops the worker."""

    def scan(self, data: bytes) -> ScanResult:
        x = 0
        while True:
            x += 1


class HogScanner:
    """Asks for more memory than the worker may have."""

    def scan(self, data: bytes) -> ScanResult:
        blocks = []
        while True:
            blocks.append(bytearray(64 * 2**20))


class CrashScanner:
    def scan(self, data: bytes) -> ScanResult:
        os._exit(3)


class BrokenScanner:
    def scan(self, data: bytes) -> ScanResult:
        raise RuntimeError("scanner bug")


def make_pool(tmp_path, scanner, **limits) -> JudgePool:
    judge = dataclasses.replace(JudgeLimits(), workers=1, **limits)
    return JudgePool(POLICY, QuarantineStore(tmp_path / "q"), scanner=scanner, limits=judge)


def test_pool_judges_like_the_engine_and_reuses_its_worker(tmp_path):
    pool = make_pool(tmp_path, MarkerScanner())
    try:
        pool.warm()                                  # the gateway starts its workers ahead of use
        deadline = time.monotonic() + 30
        while pool._idle.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._idle.qsize() == 1
        (worker,) = pool._all
        clean = pool.judge(CORPUS.by_name("clean-ascii").raw, MailContext("inbound"))
        assert clean.judgement.action == "deliver" and clean.judgement.data == CORPUS.by_name("clean-ascii").raw
        assert clean.verdict.scanned and clean.headers.get("subject")
        virus = pool.judge(CORPUS.by_name("virus").raw, MailContext("inbound"))
        assert virus.judgement.action == "reject" and "virus-detected" in virus.judgement.reason
        redos = pool.judge(anchor_redos(40), MailContext("inbound"))     # the 402-byte mail of issue #15
        assert redos.judgement.action == "deliver"
        assert pool.killed == 0 and pool._all == {worker} and worker.process.is_alive()
    finally:
        pool.close()


def test_a_judgement_over_its_cpu_limit_is_killed_and_quarantined_as_too_complex(tmp_path):
    pool = make_pool(tmp_path, SpinScanner(), cpu_seconds=1, wall_seconds=60)
    try:
        raw = CORPUS.by_name("clean-ascii").raw
        started = time.monotonic()
        out = pool.judge(raw, MailContext("inbound"))
        elapsed = time.monotonic() - started
        assert pool.killed >= 1
        assert elapsed < 30     # 1 s CPU limit; generous for a loaded machine
        assert out.judgement.action == "quarantine" and out.quarantine_id
        assert [i.name for i in out.verdict.indicators] == ["message-too-complex"]
        assert "CPU" in out.verdict.indicators[0].evidence.en and "CPU" in out.verdict.indicators[0].evidence.ja
        assert QuarantineStore(tmp_path / "q").read(out.quarantine_id) == raw
        assert b"message-too-complex" in __import__("base64").b64decode(
            out.judgement.data.split(b"\r\n\r\n", 1)[1])
    finally:
        pool.close()


def test_a_judgement_over_its_memory_limit_is_too_complex_and_the_worker_replaced(tmp_path):
    pool = make_pool(tmp_path, HogScanner(), memory_mb=512, cpu_seconds=30)
    try:
        out = pool.judge(CORPUS.by_name("clean-ascii").raw, MailContext("inbound"))
        assert out.judgement.action == "quarantine"
        assert out.verdict.indicators[0].name == "message-too-complex"
        assert "memory" in out.verdict.indicators[0].evidence.en
        assert pool.killed == 1
    finally:
        pool.close()


def test_a_wall_deadline_ends_a_stuck_judgement(tmp_path):
    pool = make_pool(tmp_path, SpinScanner(), cpu_seconds=600, wall_seconds=1.5)
    try:
        out = pool.judge(CORPUS.by_name("clean-ascii").raw, MailContext("outbound"))
        assert out.judgement.action == "quarantine" and out.judgement.data is None   # outbound: refused, no notice
        assert "longer than 1.5 s" in out.verdict.indicators[0].evidence.en
    finally:
        pool.close()


@pytest.mark.parametrize("scanner", [CrashScanner(), BrokenScanner()], ids=["worker-dies", "worker-error"])
def test_any_other_failure_fails_closed(tmp_path, scanner):
    pool = make_pool(tmp_path, scanner)
    try:
        with pytest.raises(JudgeFailed):
            pool.judge(CORPUS.by_name("clean-ascii").raw, MailContext("inbound"))
    finally:
        pool.close()


def test_a_pool_that_cannot_start_a_worker_fails_closed(tmp_path):
    pool = make_pool(tmp_path, MarkerScanner())
    pool.close()
    with pytest.raises(JudgeFailed):
        pool.judge(CORPUS.by_name("clean-ascii").raw, MailContext("inbound"))
    unpicklable = JudgePool(POLICY, QuarantineStore(tmp_path / "q"), scanner=lambda d: None,
                            limits=dataclasses.replace(JudgeLimits(), workers=1))
    try:
        with pytest.raises(JudgeFailed):
            unpicklable.judge(CORPUS.by_name("clean-ascii").raw, MailContext("inbound"))
    finally:
        unpicklable.close()


def test_the_gateway_addon_judges_in_the_pool_and_fails_closed(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from addons.mail import MailFilter
    from gateway.config import MailSettings
    from gateway.proxy.connections import LiveConnections
    from gateway.metrics import GatewayMetrics
    from tests.unit.test_mail_adapters_addon import Sink

    settings = MailSettings(policy_path=REPO / "policies" / "mail.yaml", organization_hosts=("mail.city.example",),
                            clamd_socket=str(tmp_path / "no-clamd.sock"))
    sink = Sink()
    f = MailFilter.from_config(settings, tmp_path, LiveConnections(), GatewayMetrics(), sink, cut=lambda *a: True)
    assert isinstance(f.pool, JudgePool)
    flow = SimpleNamespace(metadata={}, server_conn=SimpleNamespace(address=("198.51.100.25", 993)),
                           client_conn=SimpleNamespace(peername=("10.0.0.2", 50000), sni="mail.city.example"))
    judge = f._judge_for(flow, "imap")
    try:
        # clamd is down (no socket): the worker's scanner says so, the message is held — in a worker.
        j = judge(anchor_redos(40), MailContext("inbound"))
        assert j.action == "quarantine" and "virus-scan-unavailable" in j.reason
        record = sink.records[-1][1]
        assert record["kanmon.mail.quarantine_id"] and record["email.subject"] == "test"
        assert f.quarantine.read(record["kanmon.mail.quarantine_id"]) == anchor_redos(40)
        # A pool that cannot judge: the judge raises (the fail-closed guard cuts the connection).
        f.pool.close()
        with pytest.raises(JudgeFailed):
            judge(CORPUS.by_name("clean-ascii").raw, MailContext("inbound"))
    finally:
        f.done()
