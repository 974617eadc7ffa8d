"""POP3 and IMAP adapters with arbitrary chunking: what the client receives for clean,
rewritten and withheld messages; literal lengths; capabilities; partial fetches."""

from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st

from gateway.mail.adapters import Judgement, dot_stuff
from gateway.mail.adapters.imap import ImapAdapter, filter_capabilities, parse_fetch_items
from gateway.mail.adapters.imap_sections import binary_section, section_bytes
from gateway.mail.adapters.pop3 import Pop3Adapter, top_of
from tests.mailcorpus.build import build_corpus

CORPUS = build_corpus()
CLEAN = CORPUS.by_name("clean-rfc2231-pdf").raw
EXE = CORPUS.by_name("executable-by-extension").raw
NOTICE = b"From: kanmon\r\nSubject: removed\r\n\r\nremoved\r\n"
SIZES = st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=8)


def judge(raw, ctx):
    assert ctx.direction == "inbound"
    if b"setup.exe" in raw:
        return Judgement("neutralize", NOTICE, "")
    return Judgement("deliver", raw, "")


def chunks(data: bytes, sizes: list[int]):
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos:pos + n]
        pos += n
        i += 1


def feed(method, data: bytes, sizes: list[int]):
    to_client, to_server, events = bytearray(), bytearray(), []
    for c in chunks(data, sizes):
        out = method(c)
        assert out.close is None
        to_client += out.to_client
        to_server += out.to_server
        events += out.events
    return bytes(to_client), bytes(to_server), events


# -- POP3 -----------------------------------------------------------------------------------
def pop3_answer(msg: bytes) -> bytes:
    return b"+OK %d octets\r\n" % len(msg) + dot_stuff(msg) + b".\r\n"


@settings(max_examples=60, deadline=None)
@given(SIZES)
def test_pop3_retr_clean_byte_identical_and_exe_replaced(sizes):
    a = Pop3Adapter(judge, device="d")
    feed(a.from_server, b"+OK ready\r\n", sizes)
    _, to_server, _ = feed(a.from_client, b"USER u\r\nPASS p\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n", sizes)
    assert to_server == b"USER u\r\nPASS p\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n"
    server = b"+OK\r\n+OK\r\n" + pop3_answer(CLEAN) + pop3_answer(EXE) + b"+OK bye\r\n"
    to_client, _, events = feed(a.from_server, server, sizes)
    assert to_client == b"+OK\r\n+OK\r\n" + pop3_answer(CLEAN) + pop3_answer(NOTICE) + b"+OK bye\r\n"
    assert [e["action"] for e in events] == ["deliver", "neutralize"]


def test_pop3_top_is_fetched_whole_and_cut_from_the_judged_version():
    a = Pop3Adapter(judge)
    a.from_server(b"+OK ready\r\n")
    assert bytes(a.from_client(b"TOP 2 1\r\n").to_server) == b"RETR 2\r\n"
    out = a.from_server(pop3_answer(EXE))
    assert bytes(out.to_client) == b"+OK top of message follows\r\n" + dot_stuff(top_of(NOTICE, 1)) + b".\r\n"
    assert b"setup.exe" not in out.to_client and b"TVqQ" not in out.to_client


def test_pop3_multiline_list_and_err_pass_through():
    a = Pop3Adapter(judge)
    a.from_server(b"+OK ready\r\n")
    a.from_client(b"LIST\r\nRETR 9\r\nCAPA\r\n")
    out = a.from_server(b"+OK 1 messages\r\n1 120\r\n.\r\n-ERR no such message\r\n+OK\r\nSTLS\r\nTOP\r\n.\r\n")
    assert bytes(out.to_client) == b"+OK 1 messages\r\n1 120\r\n.\r\n-ERR no such message\r\n+OK\r\nSTLS\r\nTOP\r\n.\r\n"


def test_pop3_stls_goes_opaque():
    a = Pop3Adapter(judge)
    a.from_server(b"+OK ready\r\n")
    a.from_client(b"STLS\r\n")
    assert a.from_server(b"+OK begin TLS\r\n").opaque


def test_pop3_too_big_message_is_refused():
    a = Pop3Adapter(judge, max_message_bytes=50)
    a.from_server(b"+OK ready\r\n")
    a.from_client(b"RETR 1\r\n")
    out = a.from_server(pop3_answer(CLEAN))
    assert out.to_client.startswith(b"-ERR") and b"Content-Type" not in out.to_client


# -- IMAP -----------------------------------------------------------------------------------
def fetch_response(n: int, items: bytes) -> bytes:
    return b"* %d FETCH (%s)\r\n" % (n, items)


def lit(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


@settings(max_examples=60, deadline=None)
@given(SIZES)
def test_imap_whole_fetch_clean_identical_exe_replaced_length_fixed(sizes):
    a = ImapAdapter(judge, device="d")
    _, to_server, _ = feed(a.from_client, b"a1 FETCH 1:2 (UID FLAGS BODY.PEEK[])\r\n", sizes)
    assert to_server == b"a1 FETCH 1:2 (UID FLAGS BODY.PEEK[])\r\n"
    server = (fetch_response(1, b"UID 7 FLAGS (\\Seen) BODY[] " + lit(CLEAN))
              + fetch_response(2, b"UID 8 RFC822.SIZE %d BODY[] " % len(EXE) + lit(EXE))
              + b"a1 OK FETCH completed\r\n")
    to_client, _, events = feed(a.from_server, server, sizes)
    assert to_client == (fetch_response(1, b"UID 7 FLAGS (\\Seen) BODY[] " + lit(CLEAN))
                         + fetch_response(2, b"UID 8 RFC822.SIZE %d BODY[] " % len(NOTICE) + lit(NOTICE))
                         + b"a1 OK FETCH completed\r\n")
    assert [(e["action"], e["uid"]) for e in events] == [("deliver", "7"), ("neutralize", "8")]


def test_imap_rfc822_and_binary_literal8():
    a = ImapAdapter(judge)
    a.from_client(b"a UID FETCH 8 (RFC822)\r\nb UID FETCH 8 (BINARY.PEEK[])\r\n")
    out = a.from_server(fetch_response(2, b"UID 8 RFC822 " + lit(EXE)) + fetch_response(2, b"UID 8 BINARY[] ~" + lit(EXE)))
    assert bytes(out.to_client) == (fetch_response(2, b"UID 8 RFC822 " + lit(NOTICE))
                                    + fetch_response(2, b"UID 8 BINARY[] ~" + lit(NOTICE)))


@settings(max_examples=40, deadline=None)
@given(SIZES)
def test_imap_section_fetch_is_augmented_and_served_from_judged_message(sizes):
    a = ImapAdapter(judge)
    _, to_server, _ = feed(a.from_client, b"a2 UID FETCH 8 (BODY.PEEK[2] BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n", sizes)
    assert to_server == b"a2 UID FETCH 8 (BODY.PEEK[2] BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[])\r\n"
    header = section_bytes(EXE, "HEADER.FIELDS (SUBJECT)")
    server = (fetch_response(2, b"UID 8 BODY[2] " + lit(section_bytes(EXE, "2"))
                             + b" BODY[HEADER.FIELDS (SUBJECT)] " + lit(header) + b" BODY[] " + lit(EXE))
              + b"a2 OK done\r\n")
    to_client, _, _ = feed(a.from_server, server, sizes)
    # NOTICE is not multipart: its part 2 does not exist -> withheld notice, never the exe.
    assert b"TVqQ" not in to_client and b"BODY[] " not in to_client
    assert b"[Kanmon] This part could not be checked" in to_client
    assert b"BODY[HEADER.FIELDS (SUBJECT)] " + lit(section_bytes(NOTICE, "HEADER.FIELDS (SUBJECT)")) in to_client


def test_imap_section_of_clean_message_unchanged_and_added_item_removed():
    a = ImapAdapter(judge)
    a.from_client(b"a3 FETCH 1 BODY.PEEK[1]\r\n")
    part = section_bytes(CLEAN, "1")
    out = a.from_server(fetch_response(1, b"BODY[1] " + lit(part) + b" BODY[] " + lit(CLEAN)) + b"a3 OK\r\n")
    assert bytes(out.to_client) == fetch_response(1, b"BODY[1] " + lit(part)) + b"a3 OK\r\n"


def test_imap_partial_of_neutralized_message_is_a_slice_of_the_notice():
    a = ImapAdapter(judge)
    assert b"BODY.PEEK[]" in bytes(a.from_client(b"a4 FETCH 2 (BODY.PEEK[]<0.10>)\r\n").to_server)
    out = a.from_server(fetch_response(2, b"BODY[]<0> " + lit(EXE[:10]) + b" BODY[] " + lit(EXE)) + b"a4 OK\r\n")
    assert bytes(out.to_client) == fetch_response(2, b"BODY[]<0> " + lit(NOTICE[:10])) + b"a4 OK\r\n"


def test_imap_header_only_fetch_not_augmented():
    a = ImapAdapter(judge)
    line = b"a5 UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])\r\n"
    assert bytes(a.from_client(line).to_server) == line


def test_imap_section_without_whole_message_is_withheld():
    a = ImapAdapter(judge)
    out = a.from_server(fetch_response(2, b"BODY[2] " + lit(b"TVqQAAMAAAAEAAAA")))
    assert b"TVqQ" not in out.to_client and b"withheld" in out.to_client


def test_imap_compress_removed_and_refused():
    a = ImapAdapter(judge)
    out = a.from_server(b"* OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE] ready\r\n")
    assert bytes(out.to_client) == b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n"
    out = a.from_server(b"* CAPABILITY IMAP4rev1 STARTTLS COMPRESS=DEFLATE LITERAL+\r\n")
    assert bytes(out.to_client) == b"* CAPABILITY IMAP4rev1 STARTTLS LITERAL+\r\n"
    out = a.from_client(b"c1 COMPRESS DEFLATE\r\n")
    assert out.to_server == bytearray() and out.to_client.startswith(b"c1 NO")
    assert filter_capabilities(b"A compress=deflate B") == b"A B"


def test_imap_client_literals_pass_and_are_not_parsed_as_commands():
    a = ImapAdapter(judge)
    data = b"a LOGIN {4}\r\nuser {21}\r\nc9 COMPRESS DEFLATE\r\n\r\nb NOOP\r\n"
    out = a.from_client(data)
    assert bytes(out.to_server) == data and out.to_client == bytearray()


def test_imap_idle_and_starttls():
    a = ImapAdapter(judge)
    assert bytes(a.from_client(b"i1 IDLE\r\n").to_server) == b"i1 IDLE\r\n"
    assert bytes(a.from_server(b"+ idling\r\n* 3 EXISTS\r\n").to_client) == b"+ idling\r\n* 3 EXISTS\r\n"
    assert bytes(a.from_client(b"DONE\r\n").to_server) == b"DONE\r\n"
    a.from_client(b"s1 STARTTLS\r\n")
    assert a.from_server(b"s1 OK begin TLS\r\n").opaque


def test_imap_status_line_with_brace_is_not_a_literal():
    a = ImapAdapter(judge)
    out = a.from_server(b"* OK [ALERT] quota {5}\r\n* 1 EXISTS\r\n")
    assert bytes(out.to_client) == b"* OK [ALERT] quota {5}\r\n* 1 EXISTS\r\n"


def test_imap_unparseable_fetch_with_literal_closes():
    a = ImapAdapter(judge)
    out = a.from_server(b"* 1 FETCH (BODY[] {5}\r\nhello\r\n")
    assert out.close


def test_parse_fetch_items_nested_lists_and_quoted():
    resp = b'* 1 FETCH (ENVELOPE ("d" {3}\r\nsub (("n" NIL "a" "b")) NIL) FLAGS (\\Seen) BODY[] "x\\"y")\r\n'
    items, tail = parse_fetch_items(resp, re.match(rb"\* 1 FETCH \(", resp).end())
    assert [i.name for i in items] == ["ENVELOPE", "FLAGS", "BODY[]"]
    assert items[2].content == b'x"y' and tail == b"\r\n"


def test_sections_of_a_multipart_message():
    assert binary_section(EXE, "2").startswith(b"MZ")
    assert section_bytes(EXE, "2.MIME").startswith(b"Content-Type: application/octet-stream")
    assert section_bytes(EXE, "3") is None
    assert section_bytes(CLEAN, "HEADER").endswith(b"\r\n\r\n")
