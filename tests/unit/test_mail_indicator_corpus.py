"""The issue 20 indicators on their corpus (tests/mailcorpus/indicators.py): no natural
business mail reaches the tag threshold, and each indicator keeps the precision and recall it
was measured at (INDICATORS.md). The floors are the measured values rounded down, so a change
that loses a hit or adds a false alarm fails here."""

from __future__ import annotations

import pytest

from gateway.mail.indicators import ALL_NAMES, MailAction
from tests.mailcorpus.indicators import ISSUE20_NAMES, ISSUE5_NAMES, run, scores, table

MAILS, FIRED, SCORES = run()
# (precision, recall) floors per indicator, from the measured table in INDICATORS.md.
FLOORS = {
    "theme-request": (0.85, 1.0),
    "theme-internal-document": (1.0, 1.0),
    "theme-public-notice": (1.0, 1.0),
    "theme-organization-notice": (1.0, 1.0),
    "theme-delivery-notice": (1.0, 0.8),
    "theme-credential-request": (0.85, 0.85),
    "unnatural-japanese": (1.0, 0.85),
    "non-japanese-han": (1.0, 0.75),
    "signature-error": (0.85, 1.0),
    "attachment-present": (1.0, 1.0),
    "icon-disguise": (1.0, 1.0),
}


def test_corpus_is_large_enough_and_covers_every_new_indicator():
    assert len(MAILS) >= 60
    assert sum(m.natural for m in MAILS) >= 20
    assert set(ISSUE20_NAMES) == set(ALL_NAMES) - set(ISSUE5_NAMES)
    for name in ISSUE20_NAMES:
        assert any(name in m.truth for m in MAILS if not m.natural), name
    raws = b"".join(m.raw for m in MAILS)
    assert b'charset="iso-2022-jp"' in raws and b'charset="shift_jis"' in raws and b'charset="utf-8"' in raws


@pytest.mark.parametrize("mail", [m for m in MAILS if m.natural], ids=lambda m: m.name)
def test_natural_business_mail_stays_below_the_tag_threshold(mail):
    assert SCORES[mail.name] < POLICY_TAG, (mail.name, sorted(FIRED[mail.name]))


def test_precision_and_recall_per_indicator():
    rows = {s.name: s for s in scores(FIRED, MAILS)}
    print("\n" + table(list(rows.values())))
    for name, (precision, recall) in FLOORS.items():
        assert rows[name].precision >= precision, (name, rows[name])
        assert rows[name].recall >= recall, (name, rows[name])


def _policy_tag() -> int:
    from pathlib import Path

    from gateway.mail.policy import load_mail_policy
    return load_mail_policy(Path(__file__).resolve().parents[2] / "policies" / "mail.yaml").thresholds[MailAction.TAG]


POLICY_TAG = _policy_tag()
