"""Cost oracle for the mail parsers (issue #15): for each parser and each shape of hostile
input (long runs, deep nesting, many pieces, huge numbers), the CPU time for an input of size
n, 2n and 4n of its repeated part grows at most ~3x per doubling — linear, with room for noise
(quadratic would be 4x, the old backtracking patterns 5x to exponential).

CPU time (time.process_time), the minimum of several runs, sizes chosen so one run takes
tens of milliseconds: the machine is shared, and a minimum of CPU time is what load disturbs
least. The parsers are called directly with the caps lifted (MessageLimits with huge values),
so what is measured is the parser, not the cap in front of it; the whole judgement
(evaluate_message, caps on) is measured too. Whole file: well under a minute.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.mail.archives import ArchiveLimits, inspect_archive
from gateway.mail.hanzi import non_japanese_han
from gateway.mail.pe_icons import pe_icons
from gateway.mail.signature import signature_problems
from gateway.mail.unnatural import unnatural_signs
from gateway.mail.engine import evaluate_message
from gateway.mail.filenames import check_filename
from gateway.mail.html_links import anchors, hosts_in_text, text_host
from gateway.mail.html_text import html_to_text
from gateway.mail.limits import MessageLimits, check_message
from gateway.mail.message import parse_message
from gateway.mail.policy import load_mail_policy
from gateway.mail.sender import Address, mismatch_findings, signature_block
from tests.fuzz import mail_hostile as hostile
from tests.fuzz.cost import assert_linear
from tests.mailcorpus.pe import pe_with_icons

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
UNCAPPED = MessageLimits(**{k: 10**12 for k in MessageLimits.__dataclass_fields__})


def _links(html: str) -> None:
    for a in anchors(html, UNCAPPED):
        text_host(a.text)
    hosts_in_text(html)


def _sender(body: str) -> None:
    mismatch_findings(Address(body[:200000], "a@b.example"), [], body)


def _filename(name: str) -> None:
    check_filename(name, POLICY.executable_extensions, POLICY.shortcut_extensions, POLICY.decoy_extensions,
                   POLICY.padding_min_run)


_ARCHIVE_LIMITS = ArchiveLimits(3, 10**9, 10**12, POLICY.executable_extensions, POLICY.shortcut_extensions,
                                POLICY.decoy_extensions, POLICY.padding_min_run)


def _zip_files(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            zf.writestr(f"f{i}.txt", b"x")
    return buf.getvalue()


def _judge(raw: bytes) -> None:
    evaluate_message(raw, POLICY)


def _themes(text: str) -> None:
    POLICY.themes.match(text)


def _signature(block: str) -> None:
    signature_problems(block, "partner.example.co.jp")


def _body_mail(body: str) -> bytes:
    return hostile._plain(body)


# Han characters: many distinct ones (the per-character codec look-up is cached), one repeated
_HAN_SPREAD = "".join(chr(0x4E00 + (i * 7919) % 20900) for i in range(20900))


# name -> (build an input of size n, the parser, base n)
CASES: dict[str, tuple[Callable[[int], object], Callable[[object], object], int]] = {
    # html links: the 402-byte ReDoS shape, many anchors, unclosed tag, deep nesting, huge numbers
    "html-links/anchor-run": (lambda n: f'<a href="http://x.example/">{"a。" * n}!</a>', _links, 20_000),
    "html-links/anchor-run-match": (lambda n: f'<a href="http://x.example/">{"a。" * n}</a>', _links, 20_000),
    "html-links/many-anchors": (lambda n: '<a href="http://a.example/">b.example</a>' * n, _links, 2_000),
    "html-links/unclosed-tag": (lambda n: "<a href=" + "x" * n, _links, 200_000),
    "html-links/nesting": (lambda n: "<div>" * n + "x" + "</div>" * n, _links, 8_000),
    "html-links/url-run": (lambda n: "http://" + "a." * n, _links, 100_000),
    "html-text/huge-numbers": (lambda n: "&#" + "0" * n + "65;&#x" + "f" * n + ";", html_to_text, 200_000),
    "html-links/huge-numbers": (lambda n: "&#" + "9" * n + ";" + f'<a href="http://x:{"9" * n}/">1</a>', _links, 200_000),
    # html text (neutralize, readable body)
    "html-text/blanks": (lambda n: "<p>" + " \t" * n + "</p>", html_to_text, 100_000),
    "html-text/blank-lines": (lambda n: "<br>" * n, html_to_text, 8_000),
    "html-text/unclosed-comment": (lambda n: "<!--" + "x" * n, html_to_text, 200_000),
    "html-text/nested-links": (lambda n: '<a href="http://x/">' * n, html_to_text, 4_000),
    # sender: address scan over display name, signature and body
    "sender/amp-run": (lambda n: "&amp" * n, _sender, 50_000),
    "sender/dots-after-at": (lambda n: "a@" + "." * n, _sender, 200_000),
    "sender/label-run": (lambda n: "x@" + "a-" * n, _sender, 100_000),
    "sender/many-addresses": (lambda n: "a@b.example " * n, _sender, 2_000),
    "sender/long-lines": (lambda n: ("-" * 5 + "\n") * n, signature_block, 50_000),
    # header decoding: the linear pre-scan, and the whole judgement over the caps
    "headers/prescan-fields": (lambda n: hostile.header_fields(n), lambda raw: check_message(raw, UNCAPPED), 20_000),
    "headers/prescan-words": (lambda n: hostile.subject_words(n), lambda raw: check_message(raw, UNCAPPED), 20_000),
    "headers/judge-encoded-words": (hostile.encoded_words, _judge, 20_000),
    "headers/judge-display-name": (hostile.display_name, _judge, 200_000),
    "headers/judge-params": (hostile.content_type_params, _judge, 20_000),
    # file names
    "filenames/padding-run": (lambda n: "a" + "_" * n + "x.exe", _filename, 50_000),
    "filenames/space-run": (lambda n: "a" + " \u3000" * n + "x.pdf.exe", _filename, 50_000),
    "filenames/controls": (lambda n: "a" + "\u202e" * n + ".exe", _filename, 20_000),
    "filenames/dots": (lambda n: "a" + "." * n + "exe", _filename, 50_000),
    # archives: every entry counted, directories included
    "archives/tar-dirs": (hostile.tar_dirs_bytes, lambda data: inspect_archive(data, "a.tar.gz", _ARCHIVE_LIMITS), 2_000),
    "archives/zip-files": (_zip_files, lambda data: inspect_archive(data, "a.zip", _ARCHIVE_LIMITS), 1_000),
    # MIME walk (standard library under our caps) and the judgement over the part cap
    "mime/walk-parts": (hostile.mime_parts, parse_message, 200),
    "mime/walk-nesting": (hostile.mime_nesting, parse_message, 50),
    "mime/judge-parts": (hostile.mime_parts, _judge, 20_000),
    # issue 20: themes (one RE2 set over the normalized text), Han, unnatural Japanese,
    # signature numbers and hosts, PE icon resources, and the whole judgement over such bodies
    "themes/near-phrases": (lambda n: "履歴" * n, _themes, 100_000),
    "themes/many-hits": (lambda n: "履歴書 my cv 職員各位 " * n, _themes, 20_000),
    "themes/word-ends": (lambda n: "cvcv " * n, _themes, 100_000),
    "han/simplified-run": (lambda n: "这" * n, non_japanese_han, 200_000),
    "han/distinct-chars": (lambda n: (_HAN_SPREAD * (n // 20900 + 1))[:n], non_japanese_han, 50_000),
    "han/middle-dots": (lambda n: "a\u00b7" * n + "这", non_japanese_han, 100_000),
    "unnatural/spaced-kana": (lambda n: "あ い " * n, unnatural_signs, 50_000),
    "unnatural/half-width": (lambda n: "あ." * n, unnatural_signs, 100_000),
    "unnatural/particles": (lambda n: "アを" * n, unnatural_signs, 100_000),
    "unnatural/nine-kana": (lambda n: "あa" * 9 + "ab" * n, unnatural_signs, 200_000),
    "signature/number-run": (lambda n: "TEL: " + "0-" * n, _signature, 100_000),
    "signature/labels": (lambda n: "TEL FAX 電話 " * n, _signature, 20_000),
    "signature/host-run": (lambda n: "http://" + "a." * n + "jp", _signature, 50_000),
    "pe/icons": (pe_with_icons, pe_icons, 500),
    "content/judge-theme-body": (lambda n: _body_mail("履歴書 " * n), _judge, 20_000),
    "content/judge-han-body": (lambda n: _body_mail("这是 " * n), _judge, 20_000),
    "content/judge-signature": (lambda n: _body_mail("x\n--\nTEL: " + "0" * n), _judge, 50_000),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cost_grows_linearly(name):
    build, fn, n = CASES[name]
    assert_linear(fn, build, n, name)
