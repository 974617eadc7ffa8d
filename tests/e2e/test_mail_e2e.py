"""Mail at the edge, end to end: real Postfix (465 implicit TLS, 587 plaintext), Dovecot (993,
995), clamd with our own signature, the gateway in between, clients (curl, smtplib, imaplib,
poplib) in a device namespace. What is asserted is what the client really received and what
Postfix really delivered (the Maildir file)."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from gateway.lab.mailservers import MAIL_DOMAIN, MAIL_HOST, PRIVATE_MAIL_HOST, mail_prerequisites
from gateway.lab.topology import MAIL4, PRIVATE_MAIL4, Lab
from tests.e2e.conftest import require_lab, running_lab
from tests.mailcorpus.build import TEST_VIRUS_MARKER, build_corpus
from tests.availability import unavailable

CORPUS = build_corpus()
TARO = f"taro@{MAIL_DOMAIN}"
HANAKO = f"hanako@{MAIL_DOMAIN}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    require_lab()
    missing = mail_prerequisites()
    if missing:
        reason = "mail servers missing: " + ", ".join(missing) + \
            " (apt-get install -y --no-install-recommends postfix dovecot-imapd dovecot-pop3d clamav-daemon)"
        unavailable(reason)
    workdir = tmp_path_factory.mktemp("maillab")
    lab = Lab(workdir, n_devices=1, mail=True, mail_signatures={"Kanmon.Test.Marker": TEST_VIRUS_MARKER})
    lab.config_overrides = {
        "proxy": {"tcp_timeout": 10},
        "mail": {"organization_hosts": [MAIL_HOST, MAIL4],
                 "clamd_socket": str(workdir / "mail" / "clamd" / "clamd.sock"),
                 "idle_timeout_seconds": 120},
    }
    with running_lab(lab, "test_mail_e2e"):
        yield lab


def device_python(lab: Lab, code: str, timeout: float = 60) -> dict:
    """Run client code in the device namespace; it prints one JSON object as its last line."""
    prelude = textwrap.dedent(f"""
        import base64, imaplib, json, poplib, smtplib, socket, ssl, sys
        CTX = ssl.create_default_context(cafile={str(lab.interception_ca)!r})
        def b64(b): return base64.b64encode(b).decode()
    """)
    proc = lab.devices[0].ns.python(prelude + textwrap.dedent(code), timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"device client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                             f"{lab.gateway.log_text()[-3000:] if lab.gateway else ''}")
    return json.loads(lines[-1])


def direct_python(lab: Lab, code: str, timeout: float = 60) -> dict:
    """The same, from the internet namespace straight to the server (no gateway)."""
    prelude = textwrap.dedent(f"""
        import base64, imaplib, json, poplib, smtplib, socket, ssl, sys
        CTX = ssl.create_default_context(cafile={str(lab.ca.cert_path)!r})
        def b64(b): return base64.b64encode(b).decode()
    """)
    proc = lab.inet.python(prelude + textwrap.dedent(code), timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1])


def imap_fetch_all(host: str, item: str = "BODY.PEEK[]") -> str:
    return f"""
        m = imaplib.IMAP4_SSL({host!r}, 993, ssl_context=CTX)
        caps = list(m.capabilities)
        m.login({TARO!r}, 'taro-pass')
        caps_after = m.capability()[1][0].decode()
        m.select('INBOX')
        typ, data = m.uid('SEARCH', None, 'ALL')
        out = {{}}
        for uid in data[0].split():
            typ, resp = m.uid('FETCH', uid, '({item})')
            out[uid.decode()] = b64(resp[0][1])
        m.logout()
        print(json.dumps({{"caps": caps, "caps_after": caps_after, "messages": out}}))
    """


def load_mailbox(lab: Lab, names: list[str]) -> None:
    ms = lab.mail_servers
    ms.clear_mailbox("taro")
    for name in names:
        ms.put_message("taro", name, CORPUS.by_name(name).raw)


def by_message_id(messages: dict, raw_by_b64=True) -> dict[str, bytes]:
    import base64
    import re
    out = {}
    for b in messages.values():
        data = base64.b64decode(b)
        m = re.search(rb"Message-ID: <([^@>]+)@corpus", data, re.I)
        out[m.group(1).decode() if m else "?"] = data
    return out


def test_imap_clean_mail_byte_identical_and_compress_removed(lab):
    names = [m.name for m in CORPUS.mails if not m.expect and not m.needs_dns]
    load_mailbox(lab, names)
    via = device_python(lab, imap_fetch_all(MAIL_HOST))
    direct = direct_python(lab, imap_fetch_all(MAIL4))
    assert "COMPRESS=DEFLATE" in direct["caps_after"], "the server must offer COMPRESS for this test to mean anything"
    assert "COMPRESS" not in via["caps_after"]
    got, want = by_message_id(via["messages"]), by_message_id(direct["messages"])
    assert set(got) == set(names)
    from gateway.mail.rewrite import html_as_text
    for name in names:
        expected = html_as_text(want[name])   # html_to_text: always (issue #20): HTML arrives as text
        assert got[name] == expected, name
        raw = CORPUS.by_name(name).raw
        if b"\r\n" in raw and expected is want[name]:
            assert got[name] == raw, name


def expected_action(name: str) -> str:
    from gateway.mail.engine import evaluate_message
    from gateway.mail.policy import load_mail_policy
    from tests.mailcorpus.fake_scanner import MarkerScanner
    from pathlib import Path
    policy = load_mail_policy(Path(__file__).resolve().parents[2] / "policies" / "mail.yaml")
    return str(evaluate_message(CORPUS.by_name(name).raw, policy, scanner=MarkerScanner()).action)


def mail_records(lab: Lab, since: int) -> list[dict]:
    return [r for r in lab.log_records("mail") if r.get("event.sequence", 0) > since]


def last_sequence(lab: Lab) -> int:
    records = lab.log_records("mail")
    return max((r.get("event.sequence", 0) for r in records), default=0)


INDICATOR_MAILS = [m.name for m in CORPUS.mails if m.expect and not m.needs_dns]


def test_imap_every_indicator_alone_and_combined(lab):
    load_mailbox(lab, INDICATOR_MAILS)
    seq = last_sequence(lab)
    before = lab.metric_value("kanmon_mail_verdicts_total")
    via = device_python(lab, imap_fetch_all(MAIL_HOST), timeout=120)
    got = by_message_id(via["messages"])
    records = {r["email.message_id"].strip("<>").split("@")[0]: r for r in mail_records(lab, seq)
               if r.get("email.message_id")}
    assert set(records) == set(INDICATOR_MAILS)
    for name in INDICATOR_MAILS:
        mail = CORPUS.by_name(name)
        record = records[name]
        fired = {i["name"] for i in record["kanmon.mail.indicators"]}
        assert fired == set(mail.expect), (name, fired)
        action = record["kanmon.mail.verdict"]
        assert action == expected_action(name), name
        received = got[name]
        if action == "deliver":   # fired, but below the tag threshold (e.g. free-mail alone)
            assert received == mail.raw, name
            continue
        assert received != mail.raw, name
        if action in ("tag", "neutralize"):
            assert "要注意".encode() in received or b"SUSPICIOUS" in received or b"=?utf-8?" in received.lower()
            assert b"Kanmon" in received or "関門".encode() in received or b"44CQ" in received
        if action == "neutralize":
            assert b"TVqQ" not in received  # no base64 PE header of the removed executables
        if action in ("quarantine", "reject"):
            assert TEST_VIRUS_MARKER not in received and b"TVqQ" not in received
            if action == "quarantine":
                assert record["kanmon.mail.quarantine_id"]
    assert records["virus"]["kanmon.mail.scanned"] is True
    assert lab.metric_value("kanmon_mail_verdicts_total", verdict="reject", indicator="virus-detected") >= 1
    assert lab.metric_value("kanmon_mail_verdicts_total") > before


def test_imap_section_fetch_of_neutralized_message_serves_the_notice(lab):
    load_mailbox(lab, ["executable-by-extension"])
    via = device_python(lab, f"""
        m = imaplib.IMAP4_SSL({MAIL_HOST!r}, 993, ssl_context=CTX)
        m.login({TARO!r}, 'taro-pass'); m.select('INBOX')
        typ, data = m.uid('SEARCH', None, 'ALL'); uid = data[0].split()[0]
        typ, part2 = m.uid('FETCH', uid, '(BODY.PEEK[2])')
        typ, whole = m.uid('FETCH', uid, '(BODY.PEEK[])')
        typ, partial = m.uid('FETCH', uid, '(BODY.PEEK[]<0.64>)')
        print(json.dumps({{"part2": b64(part2[0][1]), "whole": b64(whole[0][1]), "partial": b64(partial[0][1]),
                          "part2_head": part2[0][0].decode()}}))
    """)
    import base64
    part2, whole, partial = (base64.b64decode(via[k]) for k in ("part2", "whole", "partial"))
    assert b"TVqQ" not in part2 and b"TVqQ" not in whole
    assert partial == whole[:64]
    from gateway.mail.adapters.imap_sections import section_bytes
    assert part2 == section_bytes(whole, "2")   # the part as it is in the neutralized message


def test_pop3s_retr_clean_identical_and_virus_replaced(lab):
    load_mailbox(lab, ["clean-iso2022jp", "virus"])
    code = f"""
        p = poplib.POP3_SSL({{host!r}}, 995, context=CTX)
        p.user({TARO!r}); p.pass_('taro-pass')
        n = len(p.list()[1]); out = {{}}
        for i in range(1, n + 1):
            resp, lines, octets = p.retr(i)
            out[str(i)] = b64(b"\\r\\n".join(lines) + b"\\r\\n")
        top = p.top(1, 0)[1]
        p.quit()
        print(json.dumps({{"messages": out, "top": b64(b"\\r\\n".join(top))}}))
    """
    via = device_python(lab, code.replace("{host!r}", repr(MAIL_HOST)))
    direct = direct_python(lab, code.replace("{host!r}", repr(MAIL4)))
    got, want = by_message_id(via["messages"]), by_message_id(direct["messages"])
    assert got["clean-iso2022jp"] == want["clean-iso2022jp"] == CORPUS.by_name("clean-iso2022jp").raw
    assert TEST_VIRUS_MARKER not in got["virus"]
    assert "[Kanmon] This message was rejected" in notice_text(got["virus"])


def notice_text(raw: bytes) -> str:
    import email
    import email.policy
    return email.message_from_bytes(raw, policy=email.policy.default).get_body(("plain",)).get_content()


def smtp_send(host: str, port: int, raw: bytes, rcpts: list[str], ssl_: bool) -> str:
    conn = f"smtplib.SMTP_SSL({host!r}, {port}, context=CTX)" if ssl_ else f"smtplib.SMTP({host!r}, {port})"
    return f"""
        s = {conn}
        code, ehlo = s.ehlo()
        result = {{"ehlo": ehlo.decode()}}
        try:
            refused = s.sendmail('hanako@{MAIL_DOMAIN}', {rcpts!r}, base64.b64decode({__import__('base64').b64encode(raw).decode()!r}))
            result["refused"] = {{k: [v[0], v[1].decode()] for k, v in refused.items()}}
            result["ok"] = True
        except smtplib.SMTPRecipientsRefused as e:
            result["ok"] = False; result["error"] = {{k: [v[0], v[1].decode()] for k, v in e.recipients.items()}}
        except smtplib.SMTPDataError as e:
            result["ok"] = False; result["error"] = [e.smtp_code, e.smtp_error.decode()]
        s.quit()
        print(json.dumps(result))
    """


def wait_delivered(lab: Lab, user: str, count: int, timeout: float = 15) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = lab.mail_servers.delivered(user)
        if len(got) >= count:
            return got
        time.sleep(0.2)
    return lab.mail_servers.delivered(user)


@pytest.mark.parametrize("port,ssl_", [(465, True), (587, False)])
def test_smtp_submission_clean_delivered_byte_identical_exe_refused(lab, port, ssl_):
    ms = lab.mail_servers
    ms.clear_mailbox("hanako")
    clean = CORPUS.by_name("clean-rfc2231-pdf").raw
    result = device_python(lab, smtp_send(MAIL_HOST if ssl_ else MAIL4, port, clean, [HANAKO], ssl_))
    assert result["ok"] and result["refused"] == {}
    assert "CHUNKING" not in result["ehlo"] and "PIPELINING" in result["ehlo"]
    if not ssl_:
        assert "STARTTLS" in result["ehlo"]          # never stripped
    delivered = wait_delivered(lab, "hanako", 1)
    assert len(delivered) == 1 and delivered[0].endswith(clean.replace(b"\r\n", b"\n"))
    bad = CORPUS.by_name("executable-by-extension").raw
    result = device_python(lab, smtp_send(MAIL_HOST if ssl_ else MAIL4, port, bad, [HANAKO], ssl_))
    assert result["ok"] is False and result["error"][0] in (550, 554) and "5.7.1" in result["error"][1]
    time.sleep(1)
    assert len(ms.delivered("hanako")) == 1      # Postfix never got the executable


def test_smtp_private_recipient_refused_5_7_1(lab):
    lab.mail_servers.clear_mailbox("hanako")
    seq = last_sequence(lab)
    clean = CORPUS.by_name("clean-ascii").raw
    result = device_python(lab, smtp_send(MAIL_HOST, 465, clean, ["someone@gmail.com", HANAKO], True))
    assert result["ok"] and result["refused"]["someone@gmail.com"][0] == 550
    assert "5.7.1" in result["refused"]["someone@gmail.com"][1]
    delivered = wait_delivered(lab, "hanako", 1)
    assert len(delivered) == 1 and b"gmail" not in delivered[0].split(b"\n\n")[0].replace(b"X-Original-To", b"")
    postfix_log = (lab.mail_servers.postfix_dir / "postfix.log").read_text()
    assert "gmail.com" not in postfix_log
    refused = [r for r in mail_records(lab, seq) if r.get("event.action") == "mail-recipient-refused"]
    assert refused and refused[0]["email.to.address"] == ["someone@gmail.com"]
    assert refused[0]["rule.id"] == "kanmon:mail-private-recipient"


def test_smtp_starttls_on_587_is_cut_not_stripped(lab):
    result = device_python(lab, f"""
        s = smtplib.SMTP({MAIL4!r}, 587)
        s.ehlo(); has = s.has_extn('starttls')
        try:
            s.starttls(context=CTX); s.ehlo(); outcome = "tls"
        except (OSError, smtplib.SMTPException) as e:
            outcome = type(e).__name__
        print(json.dumps({{"advertised": has, "outcome": outcome}}))
    """)
    assert result["advertised"] is True and result["outcome"] != "tls"


def test_private_mail_servers_blocked_on_every_mail_port(lab):
    direct = direct_python(lab, f"""
        s = socket.create_connection(({PRIVATE_MAIL4!r}, 993), timeout=5); s.close()
        print(json.dumps({{"reachable": True}}))
    """)
    assert direct["reachable"]   # the server is there; only the gateway stands in the way
    result = device_python(lab, f"""
        out = {{}}
        for port, tls_ in ((993, True), (995, True), (465, True), (587, False), (143, False), (110, False), (25, False)):
            try:
                raw = socket.create_connection(({PRIVATE_MAIL_HOST!r}, port), timeout=5)
                raw.settimeout(5)
                s = CTX.wrap_socket(raw, server_hostname={PRIVATE_MAIL_HOST!r}) if tls_ else raw
                data = s.recv(100)
                out[port] = "greeting" if data else "closed"
            except (OSError, ssl.SSLError) as e:
                out[port] = "error"
        print(json.dumps(out))
    """)
    assert all(v != "greeting" for v in result.values()), result
    records = [r for r in lab.log_records("conn") if r.get("rule.id") == "kanmon:mail-private-server"]
    assert records or lab.metric_value("kanmon_mail_verdicts_total", indicator="private-mail-server") >= 7


def test_curl_smtps_imaps_pop3s(lab):
    load_mailbox(lab, ["clean-ascii"])
    lab.mail_servers.clear_mailbox("hanako")
    dev = lab.devices[0]
    msgfile = lab.workdir / "curl-mail.eml"
    msgfile.write_bytes(CORPUS.by_name("clean-utf8-html").raw)
    ca = str(lab.interception_ca)
    smtp = dev.ns.run("curl", "-sS", "--max-time", "20", "--cacert", ca, f"smtps://{MAIL_HOST}:465",
                      "--mail-from", HANAKO, "--mail-rcpt", HANAKO, "--upload-file", str(msgfile), check=False)
    assert smtp.returncode == 0, smtp.stderr
    delivered = wait_delivered(lab, "hanako", 1)
    from gateway.mail.rewrite import html_as_text   # html_to_text: always also on SMTP (issue #20)
    sent = html_as_text(CORPUS.by_name("clean-utf8-html").raw)
    assert delivered and delivered[0].endswith(sent.replace(b"\r\n", b"\n"))
    imap = dev.ns.run("curl", "-sS", "--max-time", "20", "--cacert", ca, "-u", f"{TARO}:taro-pass",
                      f"imaps://{MAIL_HOST}:993/INBOX;MAILINDEX=1", check=False)
    pop = dev.ns.run("curl", "-sS", "--max-time", "20", "--cacert", ca, "-u", f"{TARO}:taro-pass",
                     f"pop3s://{MAIL_HOST}:995/1", check=False)
    clean = CORPUS.by_name("clean-ascii").raw.decode()
    assert imap.returncode == 0 and pop.returncode == 0, imap.stderr + pop.stderr
    assert imap.stdout.replace("\r\n", "\n").strip() == clean.replace("\r\n", "\n").strip()
    assert pop.stdout.replace("\r\n", "\n").strip() == clean.replace("\r\n", "\n").strip()


def test_imap_idle_survives_beyond_the_proxy_tcp_timeout(lab):
    """proxy.tcp_timeout is 10 s in this lab; mail flows get mail.idle_timeout_seconds (120)."""
    load_mailbox(lab, ["clean-ascii"])
    import threading
    timer = threading.Timer(15, lambda: lab.mail_servers.put_message("taro", "idle", CORPUS.by_name("clean-lf").raw))
    timer.start()
    try:
        result = device_python(lab, f"""
            import time
            m = imaplib.IMAP4_SSL({MAIL_HOST!r}, 993, ssl_context=CTX)
            m.login({TARO!r}, 'taro-pass'); m.select('INBOX')
            tag = m._new_tag().decode()
            m.send(f"{{tag}} IDLE\\r\\n".encode())
            first = m.readline()
            m.sock.settimeout(40)
            start = time.monotonic()
            update = m.readline()
            while b"EXISTS" not in update and time.monotonic() - start < 40:
                update = m.readline()   # Dovecot may send "* OK Still here" keep-alives first
            waited = time.monotonic() - start
            m.send(b"DONE\\r\\n")
            done = m.readline()
            while done.startswith(b"*"):
                done = m.readline()
            print(json.dumps({{"first": first.decode(), "update": update.decode(), "waited": waited, "done": done.decode()}}))
        """, timeout=90)
    finally:
        timer.cancel()
    assert result["first"].startswith("+")
    assert "EXISTS" in result["update"] and result["waited"] > 12
    assert " OK" in result["done"]
