"""Policy conditions on the signed-in user (issue #9): signed_in, user_group, amr, acr, mfa,
mfa_within; and that the connection table never caches a verdict that depends on how recent
the MFA sign-in was."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from gateway.policy import ConnectionTable, DeviceContext, PolicyQuery, compile_text, query_for_url
from gateway.policy.conditions import ConditionError, parse_duration_seconds
from gateway.verdict import Action, Stage

NOW = datetime(2026, 6, 10, 3, 0, tzinfo=timezone.utc)
UNSIGNED = DeviceContext("d1", frozenset({"staff"}), "org")
BOB = replace(UNSIGNED, user="bob", signed_in=True, user_groups=frozenset({"staff"}), amr=frozenset({"pwd"}),
              auth_time=NOW - timedelta(minutes=5))
ALICE = replace(UNSIGNED, user="alice", signed_in=True, user_groups=frozenset({"staff", "finance"}),
                amr=frozenset({"pwd", "otp"}), acr="urn:kanmon:mfa", mfa=True, auth_time=NOW - timedelta(minutes=5))

POLICY = """
settings: {default_action: allow}
systems:
  personnel: {class: 3, hosts: [hr.example.jp]}
rules:
  - id: class3-needs-fresh-mfa
    action: block
    reason: 機密性3 の業務システムは 8 時間以内の多要素認証が必要 / class-3 systems need MFA within 8 h
    match: {system_class: ">= 3"}
    unless: {mfa_within: 8h}
  - {id: finance-only, action: block, match: {domain: ledger.example.jp}, unless: {user_group: finance}}
  - {id: must-sign-in, action: block, match: {domain: intranet.example.jp, signed_in: false}}
  - {id: otp-users, action: monitor, match: {domain: otp.example.jp, amr: otp}}
  - {id: acr-mfa, action: monitor, match: {domain: acr.example.jp, acr: "urn:kanmon:mfa"}}
  - {id: no-mfa, action: block, match: {domain: payroll.example.jp, mfa: false}}
"""


def snap():
    return compile_text("version: 1\n" + textwrap.dedent(POLICY), {}, filename="p.yaml", compiled_at=NOW)


def http(s, url, device, now=NOW):
    return s.decide(query_for_url(url, device, stage=Stage.REQUEST, method="GET", now=now))


def test_mfa_within_allows_the_mfa_user_and_blocks_the_password_only_user():
    s = snap()
    assert http(s, "https://hr.example.jp/", ALICE).action is Action.ALLOW
    v = http(s, "https://hr.example.jp/", BOB)
    assert (v.action, v.rule_id) == (Action.BLOCK, "class3-needs-fresh-mfa")
    assert http(s, "https://hr.example.jp/", UNSIGNED).action is Action.BLOCK


def test_mfa_within_lapses_when_the_sign_in_is_older_than_the_window():
    s = snap()
    assert http(s, "https://hr.example.jp/", ALICE, now=NOW + timedelta(hours=7)).action is Action.ALLOW
    late = http(s, "https://hr.example.jp/", ALICE, now=NOW + timedelta(hours=8, minutes=1))
    assert (late.action, late.rule_id) == (Action.BLOCK, "class3-needs-fresh-mfa")


def test_user_group_signed_in_amr_acr_and_mfa_conditions():
    s = snap()
    assert http(s, "https://ledger.example.jp/", ALICE).action is Action.ALLOW
    assert http(s, "https://ledger.example.jp/", BOB).rule_id == "finance-only"
    assert http(s, "https://intranet.example.jp/", UNSIGNED).rule_id == "must-sign-in"
    assert http(s, "https://intranet.example.jp/", BOB).action is Action.ALLOW
    assert http(s, "https://otp.example.jp/", ALICE).rule_id == "otp-users"
    assert http(s, "https://otp.example.jp/", BOB).rule_id is None
    assert http(s, "https://acr.example.jp/", ALICE).rule_id == "acr-mfa"
    assert http(s, "https://acr.example.jp/", BOB).rule_id is None
    assert http(s, "https://payroll.example.jp/", BOB).rule_id == "no-mfa"
    assert http(s, "https://payroll.example.jp/", ALICE).action is Action.ALLOW
    # "mfa: false" means "signed in, without MFA": an unsigned device is not matched by it.
    assert http(s, "https://payroll.example.jp/", UNSIGNED).rule_id is None


def test_the_explanation_names_the_condition():
    v = http(snap(), "https://hr.example.jp/", BOB)
    assert "class-3" in v.explain or "class3" in v.explain or "MFA" in v.explain


def test_connection_table_does_not_cache_a_verdict_that_depends_on_mfa_age():
    s = snap()
    table = ConnectionTable.for_snapshot(s)
    first = table.lookup(ALICE, "hr.example.jp", Stage.TLS, NOW)
    # Either the table declines (None: decide per request) or it answers correctly now; it
    # must not hand the 'allow' out again after the MFA window has closed.
    later = table.lookup(ALICE, "hr.example.jp", Stage.TLS, NOW + timedelta(hours=9))
    if later is not None:
        assert later.action is Action.BLOCK
    if first is not None:
        assert first.action is Action.ALLOW
    full = s.decide(PolicyQuery(Stage.REQUEST, ALICE, host="hr.example.jp", url="https://hr.example.jp/",
                                now=NOW + timedelta(hours=9)))
    assert full.action is Action.BLOCK


@pytest.mark.parametrize("value,seconds", [(90, 90), ("30m", 1800), ("8h", 28800), (" 2 d ", 172800)])
def test_durations(value, seconds):
    assert parse_duration_seconds(value) == seconds


@pytest.mark.parametrize("value", ["0h", "8 hours", "", -5, True])
def test_bad_durations_are_refused(value):
    with pytest.raises(ConditionError):
        parse_duration_seconds(value)


def test_a_bad_mfa_within_in_a_policy_file_names_its_line():
    from gateway.yamlsource import SourceErrors
    text = "version: 1\nrules:\n  - id: r\n    action: block\n    match: {mfa_within: eight hours}\n"
    with pytest.raises(SourceErrors) as exc:
        compile_text(text, {}, filename="bad.yaml", compiled_at=NOW)
    assert any("bad.yaml:5" in str(e) for e in exc.value.errors)
