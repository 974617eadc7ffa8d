"""SMTP submission adapter: arbitrary chunking of both directions against a fake server that
records what it accepted."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from gateway.mail.adapters import Judgement, dot_stuff, dot_unstuff
from gateway.mail.adapters.smtp import SmtpAdapter, filter_ehlo

CLEAN = (b"From: a@city.example\r\nTo: b@city.example\r\nSubject: hi\r\n\r\n"
         b"line one\r\n.leading dot line\r\n..two dots\r\nend\r\n")
BAD = b"From: a@city.example\r\nSubject: bad\r\n\r\nEVIL attachment\r\n"


class FakeSmtpServer:
    def __init__(self) -> None:
        self.buf = b""
        self.mode = "cmd"
        self.data = b""
        self.rcpts: list[bytes] = []
        self.messages: list[bytes] = []
        self.commands: list[bytes] = []

    def greeting(self) -> bytes:
        return b"220 fake ESMTP\r\n"

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = b""
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            line += b"\n"
            if self.mode == "data":
                if line == b".\r\n":
                    self.messages.append(dot_unstuff(self.data))
                    self.mode, self.data, self.rcpts = "cmd", b"", []
                    out += b"250 2.0.0 queued\r\n"
                else:
                    self.data += line
                continue
            self.commands.append(line)
            verb = line.split()[0].upper()
            if verb == b"EHLO":
                out += b"250-fake\r\n250-PIPELINING\r\n250-BINARYMIME\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250 CHUNKING\r\n"
            elif verb == b"RCPT":
                if b"nobody@" in line:
                    out += b"550 5.1.1 no such user\r\n"
                else:
                    self.rcpts.append(line)
                    out += b"250 2.1.5 ok\r\n"
            elif verb == b"DATA":
                if self.rcpts:
                    self.mode = "data"
                    out += b"354 go ahead\r\n"
                else:
                    out += b"554 5.5.1 no valid recipients\r\n"
            elif verb == b"RSET":
                self.rcpts = []
                out += b"250 2.0.0 reset\r\n"
            elif verb == b"QUIT":
                out += b"221 2.0.0 bye\r\n"
            else:
                out += b"250 ok\r\n"
        return out


def judge_fn(calls):
    def judge(raw, ctx):
        calls.append((raw, ctx))
        if b"EVIL" in raw:
            return Judgement("reject", None, "dangerous attachment (executable-attachment)")
        if b"NEUTRALIZE" in raw:
            return Judgement("neutralize", raw.replace(b"NEUTRALIZE", b"[removed]"), "")
        return Judgement("deliver", raw, "")
    return judge


def refusal(address: str) -> str | None:
    return "private address not allowed" if address.endswith("@gmail.com") else None


def chunks(data: bytes, sizes: list[int]):
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        yield data[pos:pos + n]
        pos += n
        i += 1


def converse(client_bytes: bytes, sizes: list[int]):
    calls: list = []
    adapter = SmtpAdapter(judge_fn(calls), refusal, device="dev1")
    server = FakeSmtpServer()
    to_client = bytearray()

    def pump(out):
        to_client.extend(out.to_client)
        if out.to_server:
            reply = server.feed(bytes(out.to_server))
            for c in chunks(reply, sizes):
                pump(adapter.from_server(c))

    for c in chunks(server.greeting(), sizes):
        pump(adapter.from_server(c))
    for c in chunks(client_bytes, sizes):
        pump(adapter.from_client(c))
    return bytes(to_client), server, calls


def codes(replies: bytes) -> list[bytes]:
    return [ln[:3] for ln in replies.split(b"\r\n") if ln[3:4] == b" "]


def session(*messages: tuple[list[bytes], bytes]) -> bytes:
    out = b"EHLO device\r\n"
    for rcpts, msg in messages:
        out += b"MAIL FROM:<a@city.example>\r\n"
        out += b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts)
        out += b"DATA\r\n" + dot_stuff(msg) + b".\r\n"
    return out + b"QUIT\r\n"


SIZES = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(SIZES)
def test_clean_message_reaches_server_byte_identical_any_chunking(sizes):
    replies, server, calls = converse(session(([b"b@city.example"], CLEAN)), sizes)
    assert server.messages == [CLEAN]
    assert codes(replies) == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert calls[0][1].direction == "outbound" and calls[0][1].rcpt_to == ("b@city.example",)


@settings(max_examples=60, deadline=None)
@given(SIZES)
def test_rejected_message_never_reaches_server_and_next_message_does(sizes):
    replies, server, _ = converse(session(([b"b@city.example"], BAD), ([b"c@city.example"], CLEAN)), sizes)
    assert server.messages == [CLEAN]
    assert b"554 5.7.1 dangerous attachment" in replies
    assert codes(replies) == [b"220", b"250", b"250", b"250", b"354", b"554", b"250", b"250", b"354", b"250", b"221"]
    assert b"RSET\r\n" in server.commands
    assert not any(b"EVIL" in c for c in server.commands)


@settings(max_examples=60, deadline=None)
@given(SIZES)
def test_private_recipient_refused_with_5_7_1_and_never_forwarded(sizes):
    replies, server, calls = converse(session(([b"x@gmail.com", b"b@city.example"], CLEAN)), sizes)
    assert b"550 5.7.1 private address not allowed" in replies
    assert codes(replies) == [b"220", b"250", b"250", b"550", b"250", b"354", b"250", b"221"]
    assert not any(b"gmail" in c for c in server.commands)
    assert server.messages == [CLEAN]
    assert calls[0][1].rcpt_to == ("b@city.example",)


def test_only_private_recipients_gives_no_354():
    replies, server, calls = converse(session(([b"x@gmail.com"], CLEAN)), [7])
    assert codes(replies) == [b"220", b"250", b"250", b"550", b"554", b"221"]
    assert server.messages == [] and calls == []


@settings(max_examples=40, deadline=None)
@given(SIZES)
def test_neutralized_message_is_what_the_server_gets(sizes):
    msg = CLEAN.replace(b"line one", b"NEUTRALIZE me")
    _, server, _ = converse(session(([b"b@city.example"], msg)), sizes)
    assert server.messages == [msg.replace(b"NEUTRALIZE", b"[removed]")]


def test_ehlo_loses_chunking_binarymime_burl_keeps_starttls():
    lines = [b"250-mx\r\n", b"250-STARTTLS\r\n", b"250-BURL imap\r\n", b"250-SIZE 10\r\n", b"250 CHUNKING\r\n"]
    assert filter_ehlo(lines) == b"250-mx\r\n250-STARTTLS\r\n250 SIZE 10\r\n"
    replies, _, _ = converse(session(), [3])
    assert b"CHUNKING" not in replies and b"BINARYMIME" not in replies
    assert b"250 8BITMIME\r\n" in replies


def test_bdat_is_refused_and_its_chunk_swallowed():
    replies, server, _ = converse(b"EHLO d\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@city.example>\r\nBDAT 5 LAST\r\nhelloQUIT\r\n", [4])
    assert b"502 5.5.1 BDAT" in replies
    assert not any(c.startswith(b"BDAT") or b"hello" in c for c in server.commands)


def test_starttls_is_passed_and_reported_opaque():
    adapter = SmtpAdapter(judge_fn([]))
    adapter.from_server(b"220 hi\r\n")
    out = adapter.from_client(b"STARTTLS\r\n")
    assert bytes(out.to_server) == b"STARTTLS\r\n"
    out = adapter.from_server(b"220 go ahead\r\n\x16\x03\x01")
    assert out.opaque and bytes(out.to_client) == b"220 go ahead\r\n\x16\x03\x01"
    assert adapter.from_client(b"\x16\x03\x01binary").to_server == bytearray(b"\x16\x03\x01binary")


def test_overlong_line_closes():
    adapter = SmtpAdapter(judge_fn([]))
    out = adapter.from_client(b"A" * 70000)
    assert out.close and "line longer" in out.close


def test_too_big_message_refused_552():
    calls: list = []
    adapter = SmtpAdapter(judge_fn(calls), max_message_bytes=100)
    server = FakeSmtpServer()
    replies = bytearray(adapter.from_server(server.greeting()).to_client)
    out = adapter.from_client(session(([b"b@city.example"], CLEAN + b"x" * 200 + b"\r\n")))
    while out.to_server or out.to_client:
        replies += out.to_client
        reply = server.feed(bytes(out.to_server)) if out.to_server else b""
        out = adapter.from_server(reply) if reply else type(out)()
    assert b"552 5.3.4" in replies and server.messages == [] and calls == []
