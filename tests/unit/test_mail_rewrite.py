"""Tag, neutralize and the stand-in notice: what a device receives after the gateway."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from pathlib import Path

from gateway.mail.engine import evaluate_message
from gateway.mail.indicators import MailAction
from gateway.mail.policy import load_mail_policy
from gateway.mail.rewrite import neutralize_message, notice_message, render_message, tag_message
from tests.mailcorpus.build import PE_STUB, TEST_VIRUS_MARKER, build_corpus
from tests.mailcorpus.fake_scanner import MarkerScanner

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
CORPUS = build_corpus()


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def leaves(msg):
    return [p for p in msg.walk() if not p.is_multipart()]


def test_tag_prefixes_subject_and_adds_bilingual_warning_keeping_the_body():
    mail = CORPUS.by_name("sender-mismatch-signature")  # ISO-2022-JP body
    verdict = evaluate_message(mail.raw, POLICY)
    assert verdict.action == MailAction.TAG
    out = render_message(mail.raw, verdict, POLICY)
    msg = parse(out)
    assert msg["Subject"] == POLICY.subject_prefix + "お振込先変更のお知らせ"
    warning, original = leaves(msg)[:2]
    text = warning.get_content()
    assert "標的型攻撃" in text and "targeted attack" in text and "sender-mismatch" in text
    assert "keiri@payments-desk.example.net" in original.get_content()
    assert original.get_content_charset() == "iso-2022-jp"
    assert b"\r\n" in out and b"\n" not in out.replace(b"\r\n", b"")  # kept CRLF
    # tagging twice does not stack prefixes
    again = parse(tag_message(out, verdict, POLICY))
    assert again["Subject"].count(POLICY.subject_prefix.strip()) == 1


def test_neutralize_removes_dangerous_attachments_and_keeps_the_rest():
    mail = CORPUS.by_name("combo-rlo-exe-in-zip-encrypted")
    verdict = evaluate_message(mail.raw, POLICY)
    forced = dataclasses.replace(verdict, action=MailAction.NEUTRALIZE)
    out = render_message(mail.raw, forced, POLICY)
    msg = parse(out)
    payloads = [p.get_payload(decode=True) or b"" for p in leaves(msg)]
    assert not any(PE_STUB in p for p in payloads)
    names = [p.get_filename() for p in leaves(msg)]
    assert names.count("kanmon-removed-attachment.txt") == 3
    notices = [p.get_content() for p in leaves(msg) if p.get_filename() == "kanmon-removed-attachment.txt"]
    assert all("削除しました" in n and "was removed" in n for n in notices)
    assert "履歴書をお送りします" in leaves(msg)[1].get_content()
    # the output is itself clean of attachment indicators (the notices are harmless text files)
    after = evaluate_message(out, POLICY)
    assert {i.name for i in after.indicators} == {"freemail-sender", "attachment-present", "theme-request"}


def test_neutralize_converts_html_to_text():
    mail = CORPUS.by_name("combo-phish-link-lookalike")
    verdict = evaluate_message(mail.raw, POLICY)
    out = neutralize_message(mail.raw, dataclasses.replace(verdict, action=MailAction.NEUTRALIZE), POLICY)
    msg = parse(out)
    types = [p.get_content_type() for p in leaves(msg)]
    assert "text/html" not in types
    texts = "\n".join(p.get_content() for p in leaves(msg))
    assert "<a " not in texts and "href" not in texts
    # (the link target in full-width brackets: rewrite.inert_text)
    assert "https://city.kanmon.example.jp/login ＜https://city.xn--kanmn-uce.example.jp/login＞" in texts


def test_neutralize_a_single_part_executable():
    raw = (b"From: a@kanmon-trading.example.co.jp\r\nTo: b@city.kanmon.example.jp\r\nSubject: tool\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream; name=\"tool.exe\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + __import__("base64").encodebytes(PE_STUB).replace(b"\n", b"\r\n"))
    verdict = evaluate_message(raw, POLICY)
    assert verdict.action == MailAction.NEUTRALIZE
    out = render_message(raw, verdict, POLICY)
    assert not any(PE_STUB in (p.get_payload(decode=True) or b"") for p in leaves(parse(out)))
    # only the notice that replaced it remains, a harmless attachment (issue 20's attachment-present)
    assert [i.name for i in evaluate_message(out, POLICY).indicators] == ["attachment-present"]


def test_quarantine_and_reject_render_nothing_but_a_notice_is_available():
    mail = CORPUS.by_name("virus")
    verdict = evaluate_message(mail.raw, POLICY, scanner=MarkerScanner())
    assert verdict.action == MailAction.REJECT
    assert render_message(mail.raw, verdict, POLICY) is None
    notice = parse(notice_message(mail.raw, verdict, POLICY))
    assert notice["From"] == parse(mail.raw)["From"]
    body = notice.get_content()
    assert "受信を拒否しました" in body and "rejected" in body and "virus-detected" in body
    assert TEST_VIRUS_MARKER not in notice.as_bytes()
    held = dataclasses.replace(verdict, action=MailAction.QUARANTINE)
    body = parse(notice_message(mail.raw, held, POLICY, quarantine_id="20240401T000000Z-0123456789ab")).get_content()
    assert "20240401T000000Z-0123456789ab" in body and "quarantined" in body
