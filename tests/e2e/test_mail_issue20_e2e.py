"""Issue #20 end to end, through the tunnel and the real servers of the lab (Postfix, Dovecot):
HTML mail fetched over IMAP (and POP3) arrives as text; an outbound mail to 12 external
recipients in To is refused with the bilingual explanation and nothing of it reaches Postfix
(its log and queue are read); the same mail with the recipients in Bcc is accepted."""

from __future__ import annotations

import base64
import email
import email.policy
import time

from gateway.lab.mailservers import MAIL_DOMAIN, MAIL_HOST
from gateway.lab.topology import MAIL4
from tests.e2e.test_mail_e2e import (HANAKO, TARO, device_python, direct_python, imap_fetch_all,  # noqa: F401
                                     lab, last_sequence, mail_records, smtp_send, wait_delivered)

HTML_MAIL = (
    f"From: =?UTF-8?B?5aSW6YOo?= <news@partner.example.com>\r\nTo: {TARO}\r\n"
    "Subject: =?ISO-2022-JP?B?GyRCJCpDTiRpJDsbKEI=?=\r\nMessage-ID: <html-e2e@partner.example.com>\r\n"
    "Date: Sat, 05 Dec 2026 10:00:00 +0900\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
    "--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n.plain part\r\n"
    "--alt\r\nContent-Type: text/html; charset=ISO-2022-JP\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
).encode() + "<html><body><p>お知らせ本文</p><script>steal()</script><a href=\"https://partner.example.com/x\">詳細</a></body></html>".encode(
    "iso-2022-jp") + b"\r\n--alt--\r\n"


def leaves(raw: bytes):
    return [p for p in email.message_from_bytes(raw, policy=email.policy.default).walk() if not p.is_multipart()]


def test_html_mail_fetched_over_imap_and_pop3_arrives_as_text(lab):
    ms = lab.mail_servers
    ms.clear_mailbox("taro")
    ms.put_message("taro", "html", HTML_MAIL)
    seq = last_sequence(lab)
    via = device_python(lab, imap_fetch_all(MAIL_HOST, "BODY.PEEK[]"))
    [record] = [r for r in mail_records(lab, seq) if r.get("event.action") == "mail-inbound"]
    assert record["kanmon.mail.verdict"] == "deliver" and record["kanmon.mail.html_to_text"] is True
    direct = direct_python(lab, imap_fetch_all(MAIL4, "BODY.PEEK[]"))
    [got] = [base64.b64decode(b) for b in via["messages"].values()]
    [original] = [base64.b64decode(b) for b in direct["messages"].values()]
    assert [p.get_content_type() for p in leaves(original)] == ["text/plain", "text/html"]   # the server has HTML
    parts = leaves(got)
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/plain"]
    assert "お知らせ本文" in parts[1].get_content() and "詳細 ＜https://partner.example.com/x＞" in parts[1].get_content()
    assert b"steal" not in got and b"<script" not in got.lower()
    assert got.split(b"\r\n\r\n")[0] == original.split(b"\r\n\r\n")[0]   # the headers as they came
    pop = device_python(lab, f"""
        p = poplib.POP3_SSL({MAIL_HOST!r}, 995, context=CTX)
        p.user({TARO!r}); p.pass_('taro-pass')
        resp, lines, octets = p.retr(1); p.quit()
        print(json.dumps({{"raw": b64(b"\\r\\n".join(lines) + b"\\r\\n")}}))
    """)
    assert base64.b64decode(pop["raw"]) == got   # POP3 and IMAP deliver the same conversion
    # A client that goes by the server's BODYSTRUCTURE (part 2: text/html, ISO-2022-JP, 7bit)
    # and fetches the part alone gets the same text, as an inert HTML document it can decode.
    alone = device_python(lab, f"""
        m = imaplib.IMAP4_SSL({MAIL_HOST!r}, 993, ssl_context=CTX)
        m.login({TARO!r}, 'taro-pass'); m.select('INBOX')
        typ, data = m.uid('SEARCH', None, 'ALL'); uid = data[0].split()[0]
        typ, structure = m.uid('FETCH', uid, '(BODYSTRUCTURE)')
        typ, part2 = m.uid('FETCH', uid, '(BODY.PEEK[2])')
        print(json.dumps({{"structure": structure[0].decode(), "part2": b64(part2[0][1])}}))
    """)
    assert '"TEXT" "HTML"' in alone["structure"].upper() and "ISO-2022-JP" in alone["structure"].upper()
    view = base64.b64decode(alone["part2"]).decode("iso-2022-jp")
    assert view.startswith("<!DOCTYPE html>") and "お知らせ本文" in view and "詳細 ＜https://partner.example.com/x＞" in view
    assert "<script" not in view and "<a " not in view


def postfix_log(lab) -> str:
    return (lab.mail_servers.postfix_dir / "postfix.log").read_text(errors="replace")


def postfix_queue(lab) -> str:
    out = lab.inet.run("postqueue", "-c", str(lab.mail_servers.postfix_config), "-p", check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def circular(to: str) -> bytes:
    return (f"From: {HANAKO}\r\nTo: {to}\r\nSubject: =?UTF-8?B?5LiA5paJ6YCB5L+h?=\r\n"
            f"Message-ID: <circular-{len(to)}@{MAIL_DOMAIN}>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n各位\r\n.dot line\r\n").encode()


def test_twelve_external_recipients_in_to_refused_nothing_reaches_postfix_and_bcc_passes(lab):
    ms = lab.mail_servers
    ms.clear_mailbox("hanako")
    seq = last_sequence(lab)
    refused_rcpts = [f"member{i}@to-refused.example.org" for i in range(12)]
    result = device_python(lab, smtp_send(MAIL_HOST, 465, circular(", ".join(refused_rcpts)), refused_rcpts, True))
    assert result["ok"] is False and isinstance(result["error"], list) and result["error"][0] == 554, result
    reply = result["error"][1]
    assert "5.7.1" in reply and "Bcc に入れ" in reply and "put the external recipients in Bcc" in reply
    assert "転送サービス" in reply and "transfer service" in reply
    # Upstream: Postfix saw none of it — no recipient in its log, nothing in its queue.
    assert "to-refused.example.org" not in postfix_log(lab)
    assert "to-refused.example.org" not in postfix_queue(lab)
    records = [r for r in mail_records(lab, seq) if r.get("kanmon.mail.direction") == "outbound"]
    assert [r["kanmon.mail.verdict"] for r in records] == ["reject"]
    assert {i["name"] for i in records[0]["kanmon.mail.indicators"]} == {"outbound-external-recipients"}
    assert records[0]["rule.id"] == "mail:outbound-external-recipients"

    # The same circular with the recipients in Bcc (To: the sender, as IPA 7.3 asks) passes.
    bcc_rcpts = [f"member{i}@bcc-passes.example.org" for i in range(12)]
    result = device_python(lab, smtp_send(MAIL_HOST, 465, circular(HANAKO), [HANAKO, *bcc_rcpts], True))
    assert result["ok"] is True and result["refused"] == {}
    delivered = wait_delivered(lab, "hanako", 1)
    assert len(delivered) == 1 and "各位".encode() in delivered[0] and b"\n.dot line\n" in delivered[0]
    # Every Bcc recipient reached Postfix; their copies wait in its queue (the lab has no internet).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(r in postfix_queue(lab) for r in bcc_rcpts):
        time.sleep(0.5)
    queued = postfix_queue(lab)
    assert all(rcpt in queued for rcpt in bcc_rcpts), queued


def test_confidential_label_to_external_refused_and_internal_passes(lab):
    ms = lab.mail_servers
    ms.clear_mailbox("hanako")
    raw = (f"From: {HANAKO}\r\nTo: {HANAKO}\r\nSubject: =?ISO-2022-JP?B?GyRCIVo1IUwpQC0jMiFbGyhC?= budget\r\n"
           f"Message-ID: <label@{MAIL_DOMAIN}>\r\n\r\nattached\r\n").encode()        # 【機密性２】
    outside = "auditor@label-refused.example.org"
    result = device_python(lab, smtp_send(MAIL_HOST, 465, raw, [HANAKO, outside], True))
    assert result["ok"] is False and result["error"][0] == 554 and "機密性" in result["error"][1]
    assert "label-refused.example.org" not in postfix_log(lab) and ms.delivered("hanako") == []
    result = device_python(lab, smtp_send(MAIL_HOST, 465, raw, [HANAKO], True))
    assert result["ok"] is True and len(wait_delivered(lab, "hanako", 1)) == 1
