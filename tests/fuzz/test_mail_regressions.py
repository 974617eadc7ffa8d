"""The mail regression corpus (tests/fuzz/regressions/mail, issue #15): every input that hung
the gateway or blew up its memory before the fix is judged within a watchdog (10 s; measured:
milliseconds) and gets the verdict recorded in MANIFEST.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.mail.engine import MailContext
from gateway.mail.judgement import judge_message
from gateway.mail.policy import load_mail_policy
from tests.fuzz import mail_hostile as hostile
from tests.fuzz.harness import watchdog

HERE = Path(__file__).resolve().parent / "regressions" / "mail"
MANIFEST = json.loads((HERE / "MANIFEST.json").read_text())
POLICY = load_mail_policy(Path(__file__).resolve().parents[2] / "policies" / "mail.yaml")


class NoStore:
    def put(self, raw, verdict, context):
        return "20261205T000000Z-000000000000"


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_regression_input_is_judged_quickly(name):
    entry = MANIFEST[name]
    generated = getattr(hostile, entry["generator"])(entry["n"])
    if entry["file"]:
        raw = (HERE / entry["file"]).read_bytes()
        assert raw == generated, "stale corpus file: run python -m tests.fuzz.regressions.mail.make"
    else:
        raw = generated
    with watchdog(10, name):
        outcome = judge_message(raw, MailContext("inbound"), POLICY, NoStore())
    assert outcome.judgement.action == entry["action"]
    assert sorted({i.name for i in outcome.verdict.indicators}) == entry["indicators"]
