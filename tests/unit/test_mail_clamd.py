"""The clamd client against a REAL clamd, offline: the test builds its own signature database
(an .ndb body signature for the corpus's test marker, not EICAR) and starts clamd on a unix
socket in a temp dir. Skipped only when clamd is not installed — and with CI=true that is a
failure, not a skip (install: apt-get install -y --no-install-recommends clamav-daemon clamav).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gateway.mail.clamd import ClamdScanner
from gateway.mail.engine import evaluate_message
from gateway.mail.indicators import MailAction
from gateway.mail.policy import load_mail_policy
from gateway.mail.scanner import ScannerUnavailable
from tests.mailcorpus.build import TEST_VIRUS_MARKER, build_corpus
from tests.availability import unavailable

REPO = Path(__file__).resolve().parents[2]
CLAMD = shutil.which("clamd") or ("/usr/sbin/clamd" if Path("/usr/sbin/clamd").exists() else None)


def _require_clamd() -> str:
    if CLAMD:
        return CLAMD
    reason = "clamd is not installed (apt-get install -y --no-install-recommends clamav-daemon clamav)"
    unavailable(reason)


@pytest.fixture(scope="module")
def clamd(tmp_path_factory):
    binary = _require_clamd()
    root = tmp_path_factory.mktemp("clamd")
    (root / "db").mkdir()
    # ClamAV extended signature: Name:TargetType(0=any):Offset(*=anywhere):HexSignature
    (root / "db" / "kanmon-test.ndb").write_text(f"Kanmon.Test.Marker:0:*:{TEST_VIRUS_MARKER.hex()}\n")
    sock = root / "clamd.sock"
    (root / "clamd.conf").write_text(
        f"LocalSocket {sock}\nDatabaseDirectory {root / 'db'}\nForeground yes\n"
        f"LogFile {root / 'clamd.log'}\nTemporaryDirectory {root}\nStreamMaxLength 2M\n")
    proc = subprocess.Popen([binary, "-c", str(root / "clamd.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    scanner = ClamdScanner.unix(str(sock), timeout=20)
    deadline = time.monotonic() + 60
    while not scanner.ping():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log = (root / "clamd.log").read_text(errors="replace") if (root / "clamd.log").exists() else ""
            pytest.fail(f"clamd did not come up:\n{err}\n{log}")
        time.sleep(0.2)
    yield scanner, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def policy():
    return load_mail_policy(REPO / "policies" / "mail.yaml")


def test_clamd_finds_marker_inside_base64_attachment(clamd, corpus):
    scanner, _ = clamd
    mail = corpus.by_name("virus")
    assert TEST_VIRUS_MARKER not in mail.raw  # only visible after MIME decoding, which clamd does
    result = scanner.scan(mail.raw)
    assert result.infected
    assert result.signature and result.signature.startswith("Kanmon.Test.Marker")


def test_clamd_passes_clean_mails(clamd, corpus):
    scanner, _ = clamd
    for mail in corpus.mails:
        if mail.name.startswith("clean-"):
            assert not scanner.scan(mail.raw).infected, mail.name


def test_engine_rejects_virus_through_real_clamd(clamd, corpus, policy):
    scanner, _ = clamd
    verdict = evaluate_message(corpus.by_name("virus").raw, policy, scanner=scanner)
    assert verdict.scanned
    assert sorted(i.name for i in verdict.indicators) == ["attachment-present", "virus-detected"]
    (virus,) = [i for i in verdict.indicators if i.name == "virus-detected"]
    assert "Kanmon.Test.Marker" in virus.evidence.en
    assert verdict.action == MailAction.REJECT


def test_size_limit_is_scanner_unavailable(clamd):
    scanner, _ = clamd
    with pytest.raises(ScannerUnavailable, match="size limit"):
        scanner.scan(b"A" * (3 * 1024 * 1024))


def test_stopped_clamd_fails_closed(clamd, corpus, policy):
    scanner, proc = clamd
    # Last test in the module: stop the daemon and check the gateway holds the mail.
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    verdict = evaluate_message(corpus.by_name("clean-ascii").raw, policy, scanner=scanner)
    assert [i.name for i in verdict.indicators] == ["virus-scan-unavailable"]
    assert verdict.action == MailAction.QUARANTINE


def test_tcp_address_that_refuses_is_unavailable():
    scanner = ClamdScanner.tcp("127.0.0.1", 1, timeout=2)
    assert not scanner.ping()
    with pytest.raises(ScannerUnavailable):
        scanner.scan(b"x")
