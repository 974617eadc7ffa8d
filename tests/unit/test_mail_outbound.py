"""The outbound guard (issue #20, gateway/mail/outbound.py): many external recipients in To/Cc,
many external domains, a confidentiality label going outside. Bcc (envelope only) does not
count; Japanese subjects in ISO-2022-JP, Shift_JIS and UTF-8; group syntax, comments,
encoded words and duplicates in To/Cc; IDN and case through gateway/hostname.py."""

from __future__ import annotations

import base64
import time
from email.header import Header
from pathlib import Path

import pytest

from gateway.mail.adapters import dot_stuff
from gateway.mail.adapters.smtp import SmtpAdapter, reply_text
from gateway.mail.engine import MailContext, evaluate_message
from gateway.mail.indicators import MailAction
from gateway.mail.judgement import judge_message
from gateway.mail.outbound import CONFIDENTIAL_LABEL, EXTERNAL_DOMAINS, EXTERNAL_RECIPIENTS
from gateway.mail.policy import load_mail_policy, policy_from_doc
from gateway.yamlsource import SourceErrors, load_yaml_text
from tests.unit.test_mail_adapters_smtp import FakeSmtpServer, chunks

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
ORG = "city.kanmon.example.jp"          # organization.domains of the shipped policy
SENDER = f"hanako@{ORG}"


class FakeQuarantine:
    def __init__(self) -> None:
        self.held: list[bytes] = []

    def put(self, raw, verdict, context) -> str:
        self.held.append(raw)
        return f"q{len(self.held)}"


def message(to: str = "", cc: str = "", subject: str = "会議のお知らせ", body: str = "よろしくお願いします。",
            extra: str = "") -> bytes:
    head = f"From: {SENDER}\r\n"
    if to:
        head += f"To: {to}\r\n"
    if cc:
        head += f"Cc: {cc}\r\n"
    head += f"Subject: {Header(subject, 'utf-8').encode()}\r\n{extra}MIME-Version: 1.0\r\n"
    head += "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    return head.encode() + base64.encodebytes(body.encode()).replace(b"\n", b"\r\n")


def outbound(raw: bytes, rcpt: list[str], policy=POLICY):
    return evaluate_message(raw, policy, MailContext("outbound", "dev1", SENDER, tuple(rcpt)))


def names(verdict) -> set[str]:
    return {i.name for i in verdict.indicators}


def external(n: int, domains: int = 1) -> list[str]:
    return [f"user{i}@partner{i % domains}.example.com" for i in range(n)]


def policy_with(guard: str):
    text = (REPO / "policies" / "mail.yaml").read_text()
    start = text.index("outbound_guard:")
    end = text.index("\nclamd:")
    doc = load_yaml_text(text[:start] + guard + text[end:], "mail.yaml")
    return policy_from_doc(doc, POLICY.freemail_domains)


# -- To/Cc counting -------------------------------------------------------------------------
def test_twelve_external_in_to_is_rejected_and_the_same_in_bcc_passes():
    rcpts = external(12)
    to_all = outbound(message(to=", ".join(rcpts)), rcpts)
    assert to_all.action == MailAction.REJECT and names(to_all) == {EXTERNAL_RECIPIENTS}
    assert "12" in to_all.indicators[0].evidence.en and "12 件" in to_all.indicators[0].evidence.ja
    bcc = outbound(message(to=SENDER), [SENDER, *rcpts])   # recipients only in RCPT TO
    assert bcc.action == MailAction.DELIVER and not bcc.indicators


def test_limit_is_more_than_n_and_cc_counts_with_to():
    assert outbound(message(to=", ".join(external(10))), external(10)).action == MailAction.DELIVER
    split = external(11)
    v = outbound(message(to=", ".join(split[:6]), cc=", ".join(split[6:])), split)
    assert names(v) == {EXTERNAL_RECIPIENTS}


def test_duplicates_and_case_count_once_and_internal_addresses_do_not_count():
    ten = external(10)
    to = ", ".join(ten + [ten[0].upper(), f'"Dup" <{ten[1]}>'])
    cc = ", ".join([ten[2], f"boss@{ORG}", f"kacho@soumu.{ORG}"] + [f"u{i}@{ORG.upper()}" for i in range(20)])
    assert not outbound(message(to=to, cc=cc), ten).indicators


def test_group_syntax_comments_and_empty_groups():
    members = ", ".join(f"p{i}@partner.example.com (Partner {i})" for i in range(11))
    v = outbound(message(to=f"Partners: {members};, undisclosed-recipients:;"), [])
    assert names(v) == {EXTERNAL_RECIPIENTS}
    assert "p0@partner.example.com" in v.indicators[0].evidence.en
    assert not outbound(message(to="undisclosed-recipients:;"), [SENDER]).indicators


def test_encoded_word_display_names_do_not_invent_or_hide_addresses():
    # A display name (ISO-2022-JP, then UTF-8) that decodes to text with "@" and commas.
    fake = Header("佐藤, x@evil.example <y@evil.example>", "iso-2022-jp").encode()
    utf8 = Header("営業部, 各位", "utf-8").encode()
    to = ", ".join([f"{fake} <r{i}@partner.example.com>" if i % 2 else f"{utf8} <r{i}@partner.example.com>"
                    for i in range(11)])
    v = outbound(message(to=to), [])
    assert names(v) == {EXTERNAL_RECIPIENTS}
    assert "11 external" in v.indicators[0].evidence.en and "evil" not in v.indicators[0].evidence.en
    to10 = ", ".join(f"{fake} <r{i}@partner.example.com>" for i in range(10))
    assert not outbound(message(to=to10), []).indicators


def test_several_to_and_cc_fields_are_all_read():
    raw = message(to=", ".join(external(5)), extra="To: " + ", ".join(external(6)[5:] + ["z@partner0.example.com"]) + "\r\n"
                  + "Cc: " + ", ".join(f"c{i}@partner0.example.com" for i in range(5)) + "\r\n")
    assert names(outbound(raw, [])) == {EXTERNAL_RECIPIENTS}


def test_external_domains_rule_and_idn_and_case_through_the_one_normalization():
    four = [f"a@d{i}.example.org" for i in range(4)]
    assert names(outbound(message(to=", ".join(four)), four)) == {EXTERNAL_DOMAINS}
    # one IDN domain written four ways is one domain: Unicode, punycode in capitals, full-width
    same = ["a@例え.jp", "b@XN--R8JZ45G.JP", "c@例え．ｊｐ", "d@Example.ORG"]
    assert not outbound(message(to=", ".join(same)), []).indicators


def test_internal_domains_key_takes_idn_and_subdomains_but_not_lookalikes():
    policy = policy_with("outbound_guard:\n  max_external_recipients: 1\n  internal_domains: [xn--r8jz45g.jp]\n")
    inside = ["a@例え.jp", "b@XN--R8JZ45G.JP", "c@sub.例え．ｊｐ", f"d@{ORG}", f"e@x.{ORG.upper()}."]
    assert not outbound(message(to=", ".join(inside)), inside, policy).indicators
    look = [f"a@{ORG}.evil.example", f"b@evil{ORG}"]
    v = outbound(message(to=", ".join(look)), look, policy)
    assert names(v) == {EXTERNAL_RECIPIENTS}


def test_unreadable_recipient_list_fails_closed():
    hostile = "(" * 5000 + "a@b.example"
    v = outbound(message(to=hostile), [])
    assert names(v) == {EXTERNAL_RECIPIENTS} and v.action == MailAction.REJECT
    assert "cannot be read" in v.indicators[0].evidence.en


def test_hostile_long_to_header_is_counted_in_linear_time():
    # The email package's structured parser needs ~55 s for 60 KB of dots; getaddresses not.
    start = time.monotonic()
    outbound(message(to="." * 60000), [])
    outbound(message(to='"' * 60000), [])
    assert time.monotonic() - start < 10   # generous: a few hundredths of a second here


def test_inbound_mail_is_not_guarded():
    raw = message(to=", ".join(external(30, 10)), subject="社外秘")
    assert not evaluate_message(raw, POLICY, MailContext("inbound")).indicators


# -- confidentiality labels -----------------------------------------------------------------
SUBJECTS = {
    "iso-2022-jp": Header("【機密性２】予算資料", "iso-2022-jp").encode(),
    # (email.header.Header would re-encode Shift_JIS as ISO-2022-JP: written by hand)
    "shift_jis": "=?Shift_JIS?B?" + base64.b64encode("社外秘：人事異動案".encode("cp932")).decode() + "?=",
    "utf-8": Header("極秘 ご確認ください", "utf-8").encode(),
}


@pytest.mark.parametrize("charset", sorted(SUBJECTS))
def test_label_in_encoded_subject_to_external_fires(charset):
    raw = (f"From: {SENDER}\r\nTo: a@partner.example.com\r\nSubject: {SUBJECTS[charset]}\r\n\r\nbody\r\n").encode()
    assert charset.upper() in SUBJECTS[charset].upper()
    v = outbound(raw, ["a@partner.example.com"])
    assert names(v) == {CONFIDENTIAL_LABEL} and v.action == MailAction.REJECT
    assert "the subject" in v.indicators[0].evidence.en and "件名" in v.indicators[0].evidence.ja


def test_label_in_raw_8bit_shift_jis_subject():
    raw = f"From: {SENDER}\r\nTo: a@partner.example.com\r\nSubject: ".encode() + "機密性3 資料".encode("cp932") + b"\r\n\r\nx\r\n"
    assert names(outbound(raw, ["a@partner.example.com"])) == {CONFIDENTIAL_LABEL}


def test_label_in_iso2022jp_body_and_in_html_only_body():
    body = "各位\r\n本資料は 社 外 秘 です。\r\n".encode("iso-2022-jp")
    raw = (f"From: {SENDER}\r\nTo: a@partner.example.com\r\nSubject: =?utf-8?q?x?=\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=ISO-2022-JP\r\nContent-Transfer-Encoding: 7bit\r\n\r\n").encode() + body
    v = outbound(raw, ["a@partner.example.com"])
    assert names(v) == {CONFIDENTIAL_LABEL} and "the body" in v.indicators[0].evidence.en
    html = (f"From: {SENDER}\r\nTo: a@partner.example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/html; charset=utf-8\r\n\r\n<p>&#x6975;&#x79D8; report</p>\r\n").encode()
    assert names(outbound(html, ["a@partner.example.com"])) == {CONFIDENTIAL_LABEL}   # 極秘 as char refs


def test_label_in_rfc2231_attachment_name():
    raw = (f"From: {SENDER}\r\nTo: a@partner.example.com\r\nSubject: report\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n'
           "--b\r\nContent-Type: application/pdf\r\n"
           "Content-Disposition: attachment; filename*=UTF-8''%E7%A4%BE%E5%A4%96%E7%A7%98_%E8%B3%87%E6%96%99.pdf\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n").encode()
    v = outbound(raw, ["a@partner.example.com"])
    assert names(v) == {CONFIDENTIAL_LABEL} and "社外秘_資料.pdf" in v.indicators[0].evidence.en


def test_label_only_matters_when_the_mail_goes_outside_bcc_included():
    raw = message(to=SENDER, subject="【機密性2】議事録")
    assert not outbound(raw, [SENDER, f"kacho@{ORG}"]).indicators               # internal only
    v = outbound(raw, [SENDER, "someone@partner.example.com"])                    # external in Bcc
    assert names(v) == {CONFIDENTIAL_LABEL} and "someone@partner.example.com" in v.indicators[0].evidence.en
    assert not outbound(message(to="a@partner.example.com", subject="機密性1 公開資料"),
                        ["a@partner.example.com"]).indicators                       # 機密性1 is not a label here


def test_labels_are_configurable_and_guard_can_be_disabled():
    policy = policy_with('outbound_guard:\n  labels: ["Confidential", "取扱注意"]\n')
    rcpt = ["a@partner.example.com"]
    assert names(outbound(message(to=rcpt[0], subject="STRICTLY CONFIDENTIAL plan"), rcpt, policy)) == {CONFIDENTIAL_LABEL}
    assert not outbound(message(to=rcpt[0], subject="社外秘"), rcpt, policy).indicators
    off = policy_with("outbound_guard:\n  enabled: false\n")
    assert not outbound(message(to=", ".join(external(30, 9)), subject="社外秘"), external(30, 9), off).indicators


# -- action, explanation, SMTP ---------------------------------------------------------------
def test_reject_explanation_is_bilingual_and_names_bcc_and_the_transfer_service():
    rcpts = external(12)
    outcome = judge_message(message(to=", ".join(rcpts)), MailContext("outbound", "d", SENDER, tuple(rcpts)),
                            POLICY, FakeQuarantine())
    assert outcome.judgement.action == "reject" and outcome.judgement.data is None
    ja, en = outcome.judgement.reason.split("\n")
    assert "Bcc" in ja and "送信を拒否しました" in ja and "転送サービス" in ja
    assert "Bcc" in en and "transfer service" in en and "https://transfer.city.kanmon.example.jp/" in en
    assert en.isascii()


def test_hold_action_quarantines_with_the_id_in_the_explanation():
    policy = policy_with("outbound_guard:\n  action: quarantine\n")
    q = FakeQuarantine()
    raw = message(to="a@partner.example.com", subject="極秘")
    outcome = judge_message(raw, MailContext("outbound", "d", SENDER, ("a@partner.example.com",)), policy, q)
    assert outcome.judgement.action == "quarantine" and outcome.judgement.data is None
    assert q.held == [raw] and "q1" in outcome.judgement.reason and "保留" in outcome.judgement.reason


def test_bad_guard_settings_are_refused_with_file_and_line():
    for bad in ("outbound_guard:\n  action: tag\n", "outbound_guard:\n  max_external_recipients: -1\n",
                "outbound_guard:\n  internal_domains: ['not a domain']\n", "outbound_guard:\n  limit: 3\n"):
        with pytest.raises(SourceErrors) as info:
            policy_with(bad)
        assert "mail.yaml:" in str(info.value.errors[0]) and "outbound_guard" in str(info.value.errors[0])


def test_reply_text_is_multiline_utf8_and_wraps_long_lines():
    reply = reply_text(b"554", b"5.7.1", "日本語の説明。" * 40 + "\nEnglish explanation\x00 here")
    lines = reply.split(b"\r\n")[:-1]
    assert all(ln.startswith(b"554-5.7.1 ") for ln in lines[:-1]) and lines[-1].startswith(b"554 5.7.1 ")
    assert all(len(ln) + 2 <= 512 for ln in lines)
    text = b"".join(ln[10:] for ln in lines).decode("utf-8")
    assert text.count("日本語の説明。") == 40 and "English explanation? here" in text


def _session(rcpts: list[str], raw: bytes, sizes: list[int]):
    q = FakeQuarantine()
    adapter = SmtpAdapter(lambda r, ctx: judge_message(r, ctx, POLICY, q).judgement, device="dev1")
    server = FakeSmtpServer()
    to_client = bytearray()

    def pump(out):
        to_client.extend(out.to_client)
        if out.to_server:
            for c in chunks(server.feed(bytes(out.to_server)), sizes):
                pump(adapter.from_server(c))

    client = (b"EHLO d\r\nMAIL FROM:<" + SENDER.encode() + b">\r\n"
              + b"".join(b"RCPT TO:<" + r.encode() + b">\r\n" for r in rcpts)
              + b"DATA\r\n" + dot_stuff(raw) + b".\r\nQUIT\r\n")
    for c in chunks(server.greeting(), sizes):
        pump(adapter.from_server(c))
    for c in chunks(client, sizes):
        pump(adapter.from_client(c))
    return bytes(to_client), server


@pytest.mark.parametrize("sizes", [[1], [7, 3], [4096]])
def test_smtp_adapter_refuses_to_before_the_server_sees_data_and_passes_bcc(sizes):
    rcpts = external(12)
    replies, server = _session(rcpts, message(to=", ".join(rcpts), body=".leading dot\r\n"), sizes)
    assert server.messages == [] and b"DATA\r\n" not in server.commands
    assert b"554-5.7.1 " in replies and "Bcc に入れ".encode() in replies and b"554 5.7.1 [Kanmon]" in replies
    raw = message(to=SENDER, body=".leading dot\r\n")
    replies, server = _session([SENDER, *rcpts], raw, sizes)
    assert server.messages == [raw]          # byte-identical, dot-stuffing undone by the server
    assert b"250 2.0.0 queued" in replies


def test_addon_cache_does_not_reuse_an_internal_verdict_for_an_external_envelope(tmp_path):
    """The same bytes with a 社外秘 label: delivered to an internal recipient, then submitted to
    an outside one — the cached 'deliver' must not be reused (the envelope is in the key)."""
    from types import SimpleNamespace

    from tests.unit.test_mail_adapters_addon import make_filter
    f, sink = make_filter(tmp_path)
    flow = SimpleNamespace(metadata={}, server_conn=SimpleNamespace(address=("198.51.100.25", 465)),
                           client_conn=SimpleNamespace(peername=("10.0.0.2", 50000), sni="mail.city.example"))
    judge = f._judge_for(flow, "smtp")
    raw = message(to=SENDER, subject="【社外秘】人事案")
    assert judge(raw, MailContext("outbound", "d", SENDER, (f"kacho@{ORG}",))).action == "deliver"
    refused = judge(raw, MailContext("outbound", "d", SENDER, (f"kacho@{ORG}", "x@partner.example.com")))
    assert refused.action == "reject" and refused.data is None and "転送サービス" in refused.reason
    records = [r for _, r in sink.records]
    assert [r["kanmon.mail.verdict"] for r in records] == ["deliver", "reject"]
    assert records[1]["kanmon.mail.indicators"][0]["name"] == CONFIDENTIAL_LABEL and not records[1]["kanmon.mail.repeated"]


def test_cli_scan_with_rcpt_judges_as_outgoing_mail(tmp_path, capsys, monkeypatch):
    from tests.unit.test_mail_cli import run, scan
    monkeypatch.delenv("KANMON_LANG", raising=False)
    path = tmp_path / "m.eml"
    path.write_bytes(message(to=", ".join(external(12))))
    assert run(scan(path)) == 0                                   # as received mail: nothing to say
    capsys.readouterr()
    assert run(scan(path, "--rcpt", "user0@partner0.example.com")) == 1
    out = capsys.readouterr().out
    assert "verdict: reject" in out and EXTERNAL_RECIPIENTS in out and "社外の宛先が 12 件" in out
    path.write_bytes(message(to=SENDER))
    assert run(scan(path, "--rcpt", SENDER, "--rcpt", "user0@partner0.example.com")) == 0   # Bcc: passes
