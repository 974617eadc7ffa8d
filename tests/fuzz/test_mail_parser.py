"""Fuzz: the mail verdict engine on mutated corpus mails.

Every mutation of a corpus mail or of a hostile one of issue #15 (bytes flipped, cut, headers duplicated or mangled, MIME
boundaries broken, parts nested deep, encoded words and RFC 2231 names garbled) gives a
verdict or ``MalformedMessage`` — never another exception, never a hang. With the virus
scanner down every usable message is held (quarantine or harsher: issue 7 "ClamAV down"
fails closed for any input, not only for clean mail), and judging is deterministic.
"""

from __future__ import annotations

import re

from hypothesis import strategies as st

from gateway.mail.engine import MailVerdict, evaluate_message
from gateway.mail.indicators import MailAction
from gateway.mail.message import MalformedMessage
from gateway.mail.policy import load_mail_policy
from tests.fuzz import mail_hostile as hostile
from tests.fuzz.harness import Harness
from tests.fuzz.test_policy_yaml import ROOT
from tests.mailcorpus.build import build_corpus
from tests.mailcorpus.fake_scanner import DownScanner, MarkerScanner

POLICY = load_mail_policy(ROOT / "policies" / "mail.yaml")
CORPUS = build_corpus()
SEEDS = [m.raw for m in CORPUS.mails]
# Issue #15: the hostile shapes too, near the caps (tests/fuzz/mail_hostile.py).
SEEDS += [hostile.anchor_redos(40), hostile.from_quotes(300), hostile.amp_body(2000), hostile.unclosed_tag(2000),
          hostile.content_type_params(99), hostile.mime_parts(60), hostile.encoded_words(199), hostile.tar_dirs(600),
          hostile.huge_charref(5000), hostile.html_nesting(1001), hostile.padding_filename(2000)]
_HOLD = {MailAction.QUARANTINE, MailAction.REJECT}

_HEADER_JUNK = st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=\"\"\r\n", b"Content-Type: multipart/mixed\r\n",
    b"Content-Type: text/plain; charset=\"x-unknown-\xff\"\r\n", b"Content-Type: text/html; charset=iso-2022-jp\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n", b"Subject: =?utf-8?B?!!!?= =?iso-2022-jp?Q?=1B$B?=\r\n",
    b"From: \"=?utf-8?b?5L6L?=\" <a@@b>\r\n", b"From: <>\r\n", b"From: a@b, c@d, \"x\" <e@f>\r\n", b"To:\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%E4%BE%8B%ZZ.exe\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''a; filename*1=.e; filename*2=xe\r\n",
    b"Content-Disposition: attachment; filename=\"report.pdf\xe2\x80\xaeexe.js\"\r\n",
    b"Reply-To: =?utf-8?q?=E4=BE=8B?= <x@y>\r\n", b"Authentication-Results: ;;;(((\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=; s=; b=!!\r\n", b"Received: from [999.1.1.1]\r\n",
    b"X-Long: " + b"a" * 20000 + b"\r\n", b" folded continuation\r\n", b"\r\n", b"Mime-Version: 9.9\r\n",
])


def _nested(depth: int, inner: bytes) -> bytes:
    out = inner
    for i in range(depth):
        b = f"b{i}".encode()
        out = (b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\r\n\r\n--" + b + b"\r\n" + out
               + b"\r\n--" + b + b"--\r\n")
    return b"From: a@example.com\r\nTo: b@city.kanmon.example.jp\r\nSubject: nest\r\nMIME-Version: 1.0\r\n" + out


@st.composite
def mutated_mail(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "cut", "insert-header", "junk", "break-boundary", "dup-part",
                                   "base64-garbage", "nest", "crlf", "nul"]))
        pos = draw(st.integers(0, len(raw)))
        if op == "flip" and raw:
            i = min(pos, len(raw) - 1)
            raw[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            raw = raw[:pos] if draw(st.booleans()) else raw[pos:]
        elif op == "insert-header":
            raw[0:0] = draw(_HEADER_JUNK)
        elif op == "junk":
            raw[pos:pos] = draw(st.binary(max_size=40))
        elif op == "break-boundary":
            m = re.search(rb"boundary=\"?([^\";\r\n]+)", raw)
            if m:
                raw = bytearray(raw.replace(b"--" + m.group(1), draw(st.sampled_from([b"--", b"--x", b"", b"--" + m.group(1)[:-1]])), draw(st.integers(1, 3))))
        elif op == "dup-part":
            start = raw.find(b"\r\n--", pos)
            end = raw.find(b"\r\n--", start + 4) if start != -1 else -1
            if start != -1 and end != -1:
                raw[end:end] = raw[start:end] * draw(st.integers(1, 20))
        elif op == "base64-garbage":
            m = re.search(rb"base64\r?\n\r?\n", raw)
            if m:
                raw[m.end():m.end()] = draw(st.sampled_from([b"====", b"!!!!\r\n", b"QUJD\r\nRA", b"\xff\xfe"]))
        elif op == "nest":
            return _nested(draw(st.integers(1, 120)), bytes(raw))
        elif op == "crlf":
            raw = bytearray(raw.replace(b"\r\n", draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))))
        elif op == "nul":
            raw[pos:pos] = b"\x00" * draw(st.integers(1, 8))
    return bytes(raw)


def check_verdict_or_malformed(raw: bytes) -> None:
    try:
        verdict = evaluate_message(raw, POLICY, scanner=MarkerScanner(), dns_txt=CORPUS.dns_txt)
    except MalformedMessage as exc:
        assert exc.text.ja and exc.text.en
        return
    assert isinstance(verdict, MailVerdict) and verdict.action in MailAction
    again = evaluate_message(raw, POLICY, scanner=MarkerScanner(), dns_txt=CORPUS.dns_txt)
    assert (again.action, again.score, [i.name for i in again.indicators]) == \
        (verdict.action, verdict.score, [i.name for i in verdict.indicators]), "not deterministic"
    held = evaluate_message(raw, POLICY, scanner=DownScanner())
    assert held.action in _HOLD, f"scanner down, yet {held.action}"
    verdict.gateway_verdict()  # the log/metric form is always buildable


HARNESSES = [Harness("mail-mutated", mutated_mail(), check_verdict_or_malformed, ci_examples=80, hang_seconds=20)]

for _h in HARNESSES:
    globals()[_h.as_test().__name__] = _h.as_test()
