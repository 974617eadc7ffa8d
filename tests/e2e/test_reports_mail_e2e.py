"""Issue #18: the incident flash report from the mail log a running gateway wrote — real
Postfix/Dovecot/clamd (the lab of tests/e2e/test_mail_e2e.py), messages with targeted-attack
indicators and our test virus fetched over IMAP through the gateway — checked in headless
Chromium: each fired indicator shown as words in both languages (never the record's objects
as text), the mail verdict as words, ウイルス感染 suggested from the virus with its evidence.
Screenshot in artifacts/reports/."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from gateway.lab.mailservers import MAIL_HOST
from gateway.reports.labels import MAIL_INDICATORS, MAIL_VERDICTS
from tests.e2e.test_mail_e2e import lab  # noqa: F401 (the mail lab fixture, one per module)
from tests.e2e.test_mail_e2e import CORPUS, device_python, imap_fetch_all, last_sequence, load_mailbox, mail_records
from tests.e2e.test_reports_e2e import DICT_TEXT, PROBE, REPORTS, _browser_or_skip, open_report

pytestmark = pytest.mark.e2e

MAILS = ["virus", "double-extension", "executable-by-extension"]


def test_incident_report_shows_mail_indicators_as_words(lab):  # noqa: F811
    _browser_or_skip()
    started = datetime.now(UTC)
    missing = [n for n in MAILS if n not in {m.name for m in CORPUS.mails}]
    assert not missing, missing
    load_mailbox(lab, MAILS)
    seq = last_sequence(lab)
    device_python(lab, imap_fetch_all(MAIL_HOST), timeout=120)
    records = [r for r in mail_records(lab, seq) if r.get("kanmon.mail.indicators")]
    assert len(records) >= len(MAILS), records
    fired = sorted({i["name"] for r in records for i in r["kanmon.mail.indicators"]})
    verdicts = sorted({r["kanmon.mail.verdict"] for r in records})
    assert "virus-detected" in fired, fired
    device = lab.devices[0].device_id

    REPORTS.mkdir(parents=True, exist_ok=True)
    out = REPORTS / "e2e-incident-mail.html"
    lab.kanmon("report", "incident", "--device", device, "--since", (started - timedelta(minutes=5)).isoformat(),
               "--logs", str(lab.state_dir / "logs"), "--out", str(out))
    html = out.read_text(encoding="utf-8")
    assert "'name'" not in html and "&#x27;name&#x27;" not in html and "'weight'" not in html

    page = open_report(out, REPORTS / "e2e-incident-mail.png", PROBE)
    assert "mail" in page["sections"] and "report-form" in page["sections"]
    mail_rows = page["lists"]["mail"]
    assert len(mail_rows) == sum(1 for r in lab.log_records("mail") if r.get("device.id") == device
                                 and r["@timestamp"] >= started.strftime("%Y-%m-%dT%H:%M:%S")), mail_rows
    shown = " ".join(cell for row in mail_rows for cell in row)
    for name in fired:
        words = MAIL_INDICATORS[name]
        assert words.ja in shown and words.en in shown, name
    for verdict in verdicts:
        assert MAIL_VERDICTS[verdict].ja in shown, verdict
    text = page["text"]
    assert not re.search(DICT_TEXT, text)
    assert "ログからの推定: ウイルス感染" in text and "suggested by the logs: malware infection" in text
    assert (REPORTS / "e2e-incident-mail.png").stat().st_size > 20_000
