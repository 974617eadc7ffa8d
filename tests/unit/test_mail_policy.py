"""Mail policy loading: the shipped example loads, every error names file:line, and the
shipped free-mail list is sourced and covers Japanese carriers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mail.freemail import freemail_match, parse_freemail_list
from gateway.mail.indicators import ALL_NAMES, MailAction
from gateway.mail.policy import load_mail_policy
from gateway.yamlsource import SourceErrors

REPO = Path(__file__).resolve().parents[2]
SHIPPED = (REPO / "policies" / "mail.yaml").read_text(encoding="utf-8")


def write(tmp_path: Path, text: str, freemail: str = "gmail.com  # source: test\n") -> Path:
    (tmp_path / "freemail-domains.txt").write_text(freemail, encoding="utf-8")
    (tmp_path / "mail-themes.txt").write_text("request: 履歴書\n", encoding="utf-8")
    path = tmp_path / "mail.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(SourceErrors) as exc:
        load_mail_policy(path)
    return [str(e) for e in exc.value.errors]


def test_shipped_policy_loads():
    policy = load_mail_policy(REPO / "policies" / "mail.yaml")
    assert set(policy.weights) == set(ALL_NAMES)
    assert policy.floors["virus-scan-unavailable"] == MailAction.QUARANTINE
    assert policy.floors["archive-encrypted"] == MailAction.TAG
    assert "docomo.ne.jp" in policy.freemail_domains and "gmail.com" in policy.freemail_domains
    assert policy.trusted_authserv_ids == frozenset({"mx.city.kanmon.example.jp"})
    assert policy.clamd and policy.clamd.socket


def test_unknown_key_is_reported_with_its_line(tmp_path):
    text = SHIPPED.replace("lookalike:\n  max_edit_distance: 1", "lookalike:\n  max_edit_distance: 1\n  typo_key: 3")
    path = write(tmp_path, text)
    line = text.splitlines().index("  typo_key: 3") + 1
    (err,) = errors_of(path)
    assert err.startswith(f"{path}:{line}: lookalike.typo_key: 不明なキーです") and " / unknown key" in err


def test_thresholds_must_ascend(tmp_path):
    text = SHIPPED.replace("  quarantine: 100", "  quarantine: 10")
    path = write(tmp_path, text)
    line = text.splitlines().index("  quarantine: 10") + 1
    errs = errors_of(path)
    assert any(e.startswith(f"{path}:{line}: thresholds.quarantine: thresholds.neutralize (") and "以上にしてください / must be >="
               in e for e in errs), errs


def test_missing_indicator_and_bad_action(tmp_path):
    text = SHIPPED.replace("  freemail-sender:            {weight: 10}\n", "").replace(
        "scanner_unavailable: quarantine", "scanner_unavailable: ignore")
    errs = errors_of(write(tmp_path, text))
    assert any("indicators: 必須のキー 'freemail-sender' がありません" in e and "'freemail-sender' is a required property" in e
               for e in errs), errs
    assert any("scanner_unavailable: 'ignore' は使えません" in e and "'ignore' is not one of" in e for e in errs), errs


def test_floor_for_encrypted_archive_must_use_the_top_level_key(tmp_path):
    text = SHIPPED.replace("archive-encrypted:          {weight: 20}", "archive-encrypted:          {weight: 20, at_least: reject}")
    errs = errors_of(write(tmp_path, text))
    assert any("indicators.archive-encrypted.at_least: これは最上位のキー encrypted_archive で設定してください"
               " / set this with the top-level key encrypted_archive" in e for e in errs)


def test_bad_freemail_list_line_is_reported(tmp_path):
    path = write(tmp_path, SHIPPED, "gmail.com # source: x\nnot a domain # source: y\n")
    (err,) = errors_of(path)
    assert err.startswith(f"{tmp_path / 'freemail-domains.txt'}:2: not a domain name")


def test_missing_freemail_list_is_reported(tmp_path):
    path = tmp_path / "mail.yaml"
    path.write_text(SHIPPED, encoding="utf-8")
    (tmp_path / "mail-themes.txt").write_text("request: 履歴書\n", encoding="utf-8")
    (err,) = errors_of(path)
    assert "freemail.lists[0]: " in err and "を読めません: ファイルを読めません: ファイルがありません / cannot read" in err


def test_freemail_extra_and_allow(tmp_path):
    text = SHIPPED.replace("  extra: []\n  allow: []", "  extra: [corp-free.example]\n  allow: [gmail.com]")
    policy = load_mail_policy(write(tmp_path, text))
    assert "corp-free.example" in policy.freemail_domains and "gmail.com" not in policy.freemail_domains


def test_shipped_freemail_list_is_sourced_and_covers_japan():
    text = (REPO / "policies" / "freemail-domains.txt").read_text(encoding="utf-8")
    entries, errors = parse_freemail_list(text, "freemail-domains.txt")
    assert errors == []
    assert all(e.source for e in entries), [e.domain for e in entries if not e.source]
    domains = frozenset(e.domain for e in entries)
    carriers = {"docomo.ne.jp", "ezweb.ne.jp", "au.com", "softbank.ne.jp", "i.softbank.jp", "ymobile.ne.jp"}
    assert carriers <= domains
    assert {"gmail.com", "outlook.com", "yahoo.co.jp", "icloud.com"} <= domains
    assert freemail_match("sub.docomo.ne.jp", domains) == "docomo.ne.jp"
    assert freemail_match("docomo.ne.jp.evil.example", domains) is None
