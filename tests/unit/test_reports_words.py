"""Reports show words in both languages, never raw codes or free English text as categories
(issue #19): authentication failures are grouped by the stable reason code the dashboard
counts (kanmon.auth.reason, else event.action: gateway.metrics.auth_failure_reason), each shown
in Japanese and English with its code; rule categories and revocation reasons likewise."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.devices.certcheck import Reason
from gateway.enroll.decide import REFUSALS
from gateway.logstore import LogStore
from gateway.metrics import GatewayMetrics, auth_failure_reason
from gateway.pages.kinds import CATEGORY_MESSAGES
from gateway.reports.flash import timeline_entry
from gateway.reports.labels import AUTH_FAILURE_WORDS, AUTH_REASONS, CATEGORIES
from gateway.signin.pages import REFUSAL_TEXT

REPO = Path(__file__).resolve().parents[2]


def test_every_auth_reason_code_has_words():
    """A new refusal code without words would show as "unknown code" in the review."""
    codes = set(REFUSALS) | {str(r) for r in Reason if r is not Reason.OK} | set(REFUSAL_TEXT)
    signin = "\n".join(p.read_text() for p in (REPO / "gateway" / "signin").glob("*.py"))
    codes |= set(re.findall(r'Refused\("([a-z][a-z-]+)"', signin))
    codes |= set(re.findall(r'self\.refuse\(device, tunnel_ip, "([a-z][a-z-]+)"', signin))
    assert len(codes) > 35, codes
    missing = sorted(c for c in codes if c not in AUTH_REASONS)
    assert not missing, missing
    # token-<claim>-missing/-invalid, built from the claims the ID token must carry
    claims = re.search(r"claims_options = \{(.*?)\n        \}", (REPO / "gateway/signin/oidc.py").read_text(), re.S).group(1)
    for claim in re.findall(r'"(\w+)": \{"essential"', claims):
        assert f"token-{claim}-missing" in AUTH_REASONS and f"token-{claim}-invalid" in AUTH_REASONS, claim
    for text in AUTH_FAILURE_WORDS.values():
        assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", text.ja) and text.en and text.en.isascii(), text


def test_shipped_categories_have_words():
    shipped = set(re.findall(r"category: ([a-z0-9-]+)", "\n".join(
        p.read_text(encoding="utf-8") for p in (REPO / "policies").glob("*.yaml"))))
    assert shipped and shipped <= set(CATEGORIES), shipped - set(CATEGORIES)
    assert set(CATEGORY_MESSAGES) <= set(CATEGORIES)


def test_review_and_dashboard_group_by_the_same_code():
    records = [
        {"event.action": "enrollment", "event.outcome": "failure", "kanmon.auth.reason": "expired",
         "event.reason": "certificate expired at 2026-01-01T00:00:00+00:00"},
        {"event.action": "enrollment", "event.outcome": "failure", "kanmon.auth.reason": "expired",
         "event.reason": "certificate expired at 2026-01-02T00:00:00+00:00"},
        {"event.action": "user-signin", "event.outcome": "failure", "kanmon.auth.reason": "token-aud-invalid",
         "event.reason": "token-aud-invalid: Invalid claim 'aud'"},
        {"event.action": "admin-login", "event.outcome": "failure", "event.reason": "bad password for admin"},
        {"event.action": "enrollment", "event.outcome": "failure", "kanmon.auth.reason": "Weird Free Text!"},
    ]
    assert [auth_failure_reason(r) for r in records] == ["expired", "expired", "token-aud-invalid", "admin-login",
                                                         "other"]
    metrics = GatewayMetrics()
    for record in records:
        metrics.observe_log_record("auth", json.dumps(record))
    counted = {s.labels["reason"]: s.value for m in metrics.auth_failures.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert counted == {"expired": 2.0, "token-aud-invalid": 1.0, "admin-login": 1.0, "other": 1.0}


T0 = datetime(2026, 1, 15, 3, tzinfo=UTC)


@pytest.fixture
def logs(tmp_path):
    directory = tmp_path / "logs"
    moment = {"now": T0}
    store = LogStore(directory, clock=lambda: moment["now"])

    def put(stream: str, minutes: float, **fields) -> None:
        moment["now"] = T0 + timedelta(minutes=minutes)
        store.append(stream, {"@timestamp": moment["now"].strftime("%Y-%m-%dT%H:%M:%S.%fZ"), **fields})

    for i in range(6):   # a burst of expired-certificate enrollments, each with its own free text
        put("auth", i, **{"device.id": "d4", "source.ip": "192.0.2.4", "event.action": "enrollment",
                          "event.outcome": "failure", "kanmon.auth.reason": "expired",
                          "event.reason": f"certificate expired at 2026-01-0{i + 1}T00:00:00+00:00"})
    put("auth", 30, **{"device.id": "d5", "source.ip": "10.8.0.5", "event.action": "user-signin",
                       "event.outcome": "failure", "kanmon.auth.reason": "owner-mismatch",
                       "event.reason": "owner-mismatch: user sato is not the owner"})
    put("proxy", 40, **{"device.id": "d4", "kanmon.verdict": "block", "rule.id": "webmail", "rule.category": "webmail",
                        "url.full": "https://mail.yahoo.co.jp/", "url.domain": "mail.yahoo.co.jp"})
    put("proxy", 41, **{"device.id": "d4", "kanmon.verdict": "block", "rule.id": "town-only",
                        "rule.category": "town-intranet-only", "url.full": "https://x.example/", "url.domain": "x.example"})
    put("audit", 50, **{"device.id": "d4", "event.action": "device-revoked", "user.name": "admin",
                        "event.reason": "lost", "event.outcome": "success"})
    store.close()
    return directory


def test_review_shows_reasons_and_categories_in_both_languages(logs, tmp_path, capsys):
    out = tmp_path / "review.html"
    assert main(["report", "review", "--month", "2026-01", "--logs", str(logs), "--out", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    auth = html.split('id="auth-failures"')[1].split("</section>")[0]
    expired = '期限切れの証明書</span> / <span lang="en" class="en">expired certificate</span><code class="code">expired</code>'
    assert expired in auth and ">6<" in auth.split(expired)[1][:80]         # six records, one row
    assert "owner-mismatch" in auth and "端末の登録利用者ではない" in auth and "not the device&#x27;s registered user" in auth
    assert "certificate expired at" not in auth                              # free text is not a group
    bursts = html.split('id="auth-bursts"')[1].split("</section>")[0]
    assert expired in bursts
    categories = html.split('id="blocked-by-category"')[1].split("</section>")[0]
    assert "フリーメール（Web メール）</span> / <span lang=\"en\" class=\"en\">free web mail" in categories
    assert "town-intranet-only" in categories and "unknown code" not in categories   # the policy's own category
    actions = html.split('id="device-actions"')[1].split("</section>")[0]
    assert '紛失</span> / <span lang="en" class="en">lost</span><code class="code">lost</code>' in actions


def test_incident_timeline_names_the_category(logs):
    entry = timeline_entry("proxy", {"@timestamp": "2026-01-15T03:40:00Z", "kanmon.verdict": "block",
                                     "rule.id": "webmail", "rule.category": "webmail", "url.full": "https://m.example/"})
    assert entry.what.ja == "遮断: webmail（フリーメール（Web メール））" and entry.what.en == "blocked: webmail (free web mail)"
    own = timeline_entry("proxy", {"@timestamp": "2026-01-15T03:40:00Z", "kanmon.verdict": "block",
                                   "rule.id": "x", "rule.category": "town-only", "url.full": "https://m.example/"})
    assert own.what.en == "blocked: x (town-only)"
