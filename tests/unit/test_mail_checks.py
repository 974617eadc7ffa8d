"""The individual checks behind the indicators, and how the verdict follows from weights."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

import pytest

from gateway.mail.archives import ArchiveLimits, inspect_archive
from gateway.mail.engine import decide, evaluate_message
from gateway.mail.filenames import check_filename
from gateway.mail.html_links import Anchor, anchors, mismatched
from gateway.mail.html_text import html_to_text
from gateway.mail.indicators import Finding, MailAction, Name, visible
from gateway.mail.lookalike import edit_distance, find_lookalike, skeleton
from gateway.mail.message import MalformedMessage, parse_message
from gateway.mail.policy import DECOY_EXTENSIONS, EXECUTABLE_EXTENSIONS, SHORTCUT_EXTENSIONS, load_mail_policy
from gateway.mail.sniff import archive_kind, executable_kind, is_lnk
from gateway.i18n import Text
from tests.mailcorpus.build import LNK_STUB, PE_STUB, build_corpus
from tests.mailcorpus.fake_scanner import DownScanner

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
PROTECTED = ("city.kanmon.example.jp", "kanmon-trading.example.co.jp")


def names(filename: str) -> set[str]:
    return {str(f.name) for f in check_filename(filename, EXECUTABLE_EXTENSIONS, SHORTCUT_EXTENSIONS, DECOY_EXTENSIONS, 3)}


@pytest.mark.parametrize("filename,expected", [
    ("report.pdf", set()),
    ("見積書.xlsx", set()),
    ("setup.EXE", {"executable-attachment"}),
    ("script.ps1", {"executable-attachment"}),
    ("evil.exe.", {"executable-attachment"}),          # Windows drops trailing dots
    ("link.lnk", {"shortcut-attachment"}),
    ("report.pdf.exe", {"executable-attachment", "double-extension"}),
    ("photo.jpg.lnk", {"shortcut-attachment", "double-extension"}),
    ("archive.tar.gz", set()),                          # two extensions, nothing dangerous
    ("report      .pdf", {"extension-padding"}),
    ("report\u3000\u3000\u3000.pdf", {"extension-padding"}),
    ("report__________.pdf", {"extension-padding"}),
    ("report  .pdf", set()),                            # two spaces: below padding_min_run
    ("invoice\u202efdp.exe", {"filename-control-chars", "executable-attachment"}),
    ("見積\u200b書.pdf", {"filename-control-chars"}),
    ("a\u2066b.pdf", {"filename-control-chars"}),
])
def test_filename_checks(filename, expected):
    assert names(filename) == expected


def test_control_char_evidence_is_escaped():
    (finding,) = [f for f in check_filename("x\u202egpj.exe", EXECUTABLE_EXTENSIONS, SHORTCUT_EXTENSIONS,
                                            DECOY_EXTENSIONS, 3) if f.name == Name.FILENAME_CONTROL_CHARS]
    assert "\u202e" not in finding.evidence.en and "<U+202E>" in finding.evidence.en
    assert "RIGHT-TO-LEFT OVERRIDE" in finding.evidence.en
    assert visible("a\u200bb\x00") == "a<U+200B>b<U+0000>"


def test_content_sniffing():
    assert executable_kind(PE_STUB).startswith("Windows PE")
    assert executable_kind(b"MZ") is None                # too short to be a PE
    assert executable_kind(b"\x7fELF\x02\x01\x01" + b"\0" * 60) == "ELF executable"
    assert executable_kind(b"#!/usr/bin/env python\n") is not None
    assert executable_kind(b"@echo off\r\ndel *.*\r\n") is not None
    assert executable_kind(b'Set o = CreateObject("WScript.Shell")\n') is not None
    assert executable_kind(b"powershell -enc SQBFAFgA") is not None
    assert executable_kind(b"%PDF-1.7\n") is None
    assert executable_kind("普通の文章です。".encode()) is None
    assert is_lnk(LNK_STUB) and not is_lnk(b"L\0\0\0" + b"\0" * 16)
    assert archive_kind(b"Rar!\x1a\x07\x00") == "rar" and archive_kind(b"PK\x03\x04") == "zip"


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


LIMITS = ArchiveLimits(3, 100, 1_000_000, EXECUTABLE_EXTENSIONS, SHORTCUT_EXTENSIONS, DECOY_EXTENSIONS, 3)


def test_archive_inspection():
    assert inspect_archive(b"%PDF-1.4", "x.pdf", LIMITS) is None
    clean = inspect_archive(_zip([("a.txt", b"hello"), ("b.pdf", b"%PDF-1.4")]), "c.zip", LIMITS)
    assert clean.threats == [] and clean.uninspectable == [] and clean.members == 2
    report = inspect_archive(_zip([("doc.pdf", PE_STUB)]), "c.zip", LIMITS)
    assert len(report.threats) == 1 and "content is Windows PE" in report.threats[0].en
    deep = _zip([("x.exe", b"x")])
    for level in range(4):
        deep = _zip([(f"level{level}.zip", deep)])
    report = inspect_archive(deep, "deep.zip", LIMITS)
    assert any("nested deeper" in t.en for t in report.threats)


def test_zip_bomb_stops_at_the_budget():
    bomb = _zip([("zeros.txt", b"\0" * 5_000_000)])
    assert len(bomb) < 20_000
    report = inspect_archive(bomb, "bomb.zip", LIMITS)
    assert report.bytes_read <= LIMITS.max_total_bytes + 1
    assert any("inspection limit" in t.en for t in report.threats)


def test_damaged_and_foreign_archives_are_uninspectable():
    damaged = inspect_archive(b"PK\x03\x04garbage-not-a-zip", "d.zip", LIMITS)
    assert damaged.uninspectable and not damaged.threats
    rar = inspect_archive(b"Rar!\x1a\x07\x00" + b"\0" * 20, "r.rar", LIMITS)
    assert "rar" in rar.uninspectable[0].en


def test_shift_jis_zip_member_names_are_decoded():
    # Japanese Windows tools write Shift_JIS names without the UTF-8 flag: build such an entry
    # by patching the name bytes of a zip written with a same-length ASCII placeholder.
    sjis = "請求書.pdf".encode("cp932")
    placeholder = b"P" * len(sjis)
    raw = _zip([(placeholder.decode(), PE_STUB)]).replace(placeholder, sjis)
    report = inspect_archive(raw, "s.zip", LIMITS)
    assert any("請求書.pdf" in t.en for t in report.threats), report.threats


@pytest.mark.parametrize("host,how", [
    ("city.kanmon.example.jp", None),
    ("www.city.kanmon.example.jp", None),
    ("google.com", None),
    ("city.kanmοn.example.jp", "confusable"),           # Greek omicron
    ("city.xn--kanmn-uce.example.jp", "punycode"),      # city.kanmοn (omicron) in punycode
    ("xn--bcher-kva.example", None),                    # an ordinary IDN (bücher)
    ("ｃｉｔｙ.kanmon.example.jp", "confusable"),        # full-width letters
    ("kanmon-tradinq.example.co.jp", "edit-distance"),
    ("kanmon-trading.example.co.jp.login.example.net", "contains"),
    ("kanmon-portal.example.net", "contains"),
])
def test_lookalike(host, how):
    hit = find_lookalike(host, PROTECTED, 1)
    assert (hit.how if hit else None) == how


def test_punycode_lookalike_is_decoded():
    host = "city.kanmοn.example.jp".encode("idna").decode()
    hit = find_lookalike(host, PROTECTED, 1)
    assert hit and hit.how == "punycode" and hit.shown_as == "city.kanmοn.example.jp"
    assert skeleton("раураl") == "paypal"                # Cyrillic letters
    assert edit_distance("example", "exmaple", 2) == 1    # transposition
    assert edit_distance("abc", "xyzxyz", 1) == 2


def test_link_text_mismatch():
    found = anchors('<a href="https://evil.example/x">https://bank.example.com/</a>'
                    '<a href="https://www.bank.example.com/">bank.example.com</a>'
                    '<a href="https://evil.example/">こちらをクリック</a><a href="mailto:x@y">x@y</a>')
    assert [mismatched(a) for a in found] == [("bank.example.com", "evil.example"), None, None, None]
    assert mismatched(Anchor("ｂａｎｋ．example．com", "https://evil.example")) is not None


def test_html_to_text_drops_active_content_and_shows_links():
    text = html_to_text('<html><head><style>p{}</style><script>alert(1)</script></head><body>'
                        '<p>こんにちは&amp;<b>世界</b></p><a href="https://x.example/a">ここ</a><ul><li>一</li></ul></body></html>')
    assert "alert" not in text and "p{}" not in text
    assert "こんにちは&世界" in text and "ここ <https://x.example/a>" in text and "・一" in text


@pytest.mark.parametrize("raw,why", [
    (b"", "empty"),
    (b"   \r\n\r\n", "empty"),
    (b"\x00\x01\x02\xff binary garbage \x89PNG", "no header"),
    (b"just a line of text without any header\nand another\n", "no header"),
    (b"From: a@b.example\nSubject: x\nContent-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: text/plain\n\nhello\n",
     "truncated"),
])
def test_malformed_messages_raise_with_a_bilingual_reason(raw, why):
    with pytest.raises(MalformedMessage) as exc:
        parse_message(raw)
    assert why in exc.value.text.en and exc.value.text.ja


def test_verdict_from_weights_thresholds_and_floors():
    f = lambda name: Finding(name, Text("j", "e"))  # noqa: E731
    assert decide([], POLICY).action == MailAction.DELIVER
    assert decide([f(Name.FREEMAIL_SENDER)], POLICY).action == MailAction.DELIVER   # 10 < tag 20
    v = decide([f(Name.FREEMAIL_SENDER), f(Name.SENDER_MISMATCH)], POLICY)
    assert (v.score, v.action) == (30, MailAction.TAG)
    # the same name twice counts once, both are listed
    v = decide([Finding(Name.SENDER_MISMATCH, Text("a", "a")), Finding(Name.SENDER_MISMATCH, Text("b", "b"))], POLICY)
    assert v.score == 20 and len(v.indicators) == 2
    # a floor lifts a low score: an encrypted archive is tagged (policy encrypted_archive: tag)
    assert decide([f(Name.ARCHIVE_ENCRYPTED)], POLICY).action == MailAction.TAG
    strict = dataclasses.replace(POLICY, floors={**POLICY.floors, "archive-encrypted": MailAction.QUARANTINE})
    assert decide([f(Name.ARCHIVE_ENCRYPTED)], strict).action == MailAction.QUARANTINE
    assert decide([f(Name.VIRUS_DETECTED)], POLICY).action == MailAction.REJECT
    v = decide([f(n) for n in (Name.LOOKALIKE_DOMAIN, Name.DISPLAY_NAME_IMPERSONATION, Name.LINK_TEXT_MISMATCH)], POLICY)
    assert (v.score, v.action) == (120, MailAction.QUARANTINE)


def test_scanner_unavailable_follows_policy():
    raw = build_corpus().by_name("clean-ascii").raw
    v = evaluate_message(raw, POLICY, scanner=DownScanner())
    assert v.action == MailAction.QUARANTINE and [i.name for i in v.indicators] == ["virus-scan-unavailable"]
    lenient = dataclasses.replace(POLICY, floors={**POLICY.floors, "virus-scan-unavailable": MailAction.TAG})
    assert evaluate_message(raw, lenient, scanner=DownScanner()).action == MailAction.TAG
    v = evaluate_message(raw, POLICY)
    assert not v.scanned and "no virus scan" in v.notes[0].en


def test_authentication_results_only_from_trusted_ids():
    base = (b"From: a@kanmon-trading.example.co.jp\nTo: b@city.kanmon.example.jp\nSubject: x\n"
            b"Authentication-Results: %s; spf=fail smtp.mailfrom=a@x.example; dkim=pass header.d=x.example\n\nbody\n")
    trusted = evaluate_message(base % b"mx.city.kanmon.example.jp", POLICY)
    assert [i.name for i in trusted.indicators] == ["sender-auth-failure"]
    assert "spf=fail" in trusted.indicators[0].evidence.en
    assert evaluate_message(base % b"mx.evil.example", POLICY).indicators == ()
    # a trusted dkim=pass outweighs a second failing dkim result in the same header
    mixed = base.replace(b"spf=fail", b"spf=pass").replace(b"dkim=pass header.d=x.example",
                                                            b"dkim=fail header.d=y.example; dkim=pass header.d=x.example")
    assert evaluate_message(mixed % b"mx.city.kanmon.example.jp", POLICY).indicators == ()
    garbage = base.replace(b"Authentication-Results: %s; ", b"Authentication-Results: ;;;;(((")
    assert evaluate_message(garbage, POLICY).indicators == ()


def test_dkim_dns_failure_is_not_a_failure():
    from gateway.mail.dns_lookup import DnsLookupError

    corpus = build_corpus()

    def broken_dns(name: str):
        raise DnsLookupError("timeout")

    v = evaluate_message(corpus.by_name("clean-dkim-valid").raw, POLICY, dns_txt=broken_dns)
    assert v.indicators == ()
    v = evaluate_message(corpus.by_name("clean-dkim-valid").raw, POLICY, dns_txt=lambda name: None)
    assert [i.name for i in v.indicators] == ["sender-auth-failure"]  # key missing: permerror


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEEDS = [m.raw for m in build_corpus().mails]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(_SEEDS), cut=st.integers(0, 4000), junk=st.binary(max_size=64), pos=st.integers(0, 4000))
def test_hostile_bytes_give_a_verdict_or_malformed_never_a_crash(seed, cut, junk, pos):
    from gateway.mail.rewrite import neutralize_message, tag_message

    raw = seed[:pos] + junk + seed[pos:cut] if cut > pos else seed[:pos] + junk
    try:
        verdict = evaluate_message(raw, POLICY)
    except MalformedMessage as exc:
        assert exc.text.ja and exc.text.en
        return
    forced = dataclasses.replace(verdict, action=MailAction.NEUTRALIZE)
    assert isinstance(neutralize_message(raw, forced, POLICY), bytes)
    assert isinstance(tag_message(raw, forced, POLICY), bytes)
