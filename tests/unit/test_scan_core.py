"""Download scanning, pure parts: clamd's INSTREAM framing and replies (sans-io), what counts as
a risky download (content sniffing beats names), the settings and the outcome of a scan."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from gateway.config import load_config_text
from gateway.mail.scanner import ScannerUnavailable
from gateway.mail.clamdproto import INSTREAM, ClamdSizeLimit, ReplyReader, instream_frames, parse_scan_reply
from gateway.scan.decide import (ScanSettings, ScanStatus,
                                 outcome, scan_settings)
from gateway.scan.filetype import FileKind, by_name, classify, filename_of, sniff
from gateway.verdict import RULE_INFECTED, RULE_SCAN_TOO_LARGE, RULE_SCAN_UNAVAILABLE
from gateway.yamlsource import SourceErrors

PE = b"MZ" + b"\x90" * 62 + b"PE\0\0" + b"\0" * 100


# -- protocol ----------------------------------------------------------------------------

def test_instream_frames_are_length_prefixed_chunks_and_a_zero_terminator():
    data = bytes(range(256)) * 5   # 1280 bytes
    frames = [bytes(f) for f in instream_frames(data, chunk=500)]
    assert frames[0] == INSTREAM == b"zINSTREAM\0"
    assert frames[-1] == b"\0\0\0\0"
    body = frames[1:-1]
    assert [struct.unpack("!I", body[i])[0] for i in range(0, len(body), 2)] == [500, 500, 280]
    assert b"".join(body[1::2]) == data
    assert [bytes(f) for f in instream_frames(b"")] == [INSTREAM, b"\0\0\0\0"]
    with pytest.raises(ValueError):
        list(instream_frames(b"x", chunk=0))


def test_reply_reader_joins_pieces_and_stops_at_nul():
    r = ReplyReader()
    assert r.feed(b"stream: Kanmon.Te") is None
    assert r.feed(b"st FOUND\0trailing") == "stream: Kanmon.Test FOUND"
    closed = ReplyReader()
    closed.feed(b"stream: OK")
    assert closed.closed() == "stream: OK"          # closed without NUL: what came is the reply
    with pytest.raises(ScannerUnavailable):
        ReplyReader().closed()                       # nothing at all
    with pytest.raises(ScannerUnavailable):
        ReplyReader(limit=10).feed(b"x" * 11)        # a babbling peer is not read forever


@pytest.mark.parametrize("reply,infected,signature", [
    ("stream: OK", False, None),
    ("stream: Kanmon.Test.Signature.UNOFFICIAL FOUND", True, "Kanmon.Test.Signature.UNOFFICIAL"),
    ("stream: Win.Test.EICAR_HDB-1 FOUND", True, "Win.Test.EICAR_HDB-1"),
])
def test_scan_replies(reply, infected, signature):
    result = parse_scan_reply(reply)
    assert (result.infected, result.signature) == (infected, signature)


@pytest.mark.parametrize("reply", ["stream: FOUND", "", "stream: something odd", "lstat() failed ERROR",
                                   "UNKNOWN COMMAND"])
def test_anything_else_is_unavailable_never_clean(reply):
    with pytest.raises(ScannerUnavailable):
        parse_scan_reply(reply)


def test_size_limit_reply_is_its_own_error():
    with pytest.raises(ClamdSizeLimit):
        parse_scan_reply("INSTREAM size limit exceeded. ERROR")


# -- file types --------------------------------------------------------------------------

def _zip(*names: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            z.writestr(name, b"x")
    return buf.getvalue()


@pytest.mark.parametrize("head,kind", [
    (PE, FileKind.EXECUTABLE),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 60, FileKind.EXECUTABLE),
    (b"#!/bin/sh\ncurl x | sh\n", FileKind.SCRIPT),
    (b"@echo off\r\ndel x\r\n", FileKind.SCRIPT),
    (b"%PDF-1.7\n%\xe2\xe3", FileKind.PDF),
    (bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 100, FileKind.DOCUMENT),
    (b"{\\rtf1\\ansi", FileKind.DOCUMENT),
    (_zip("AndroidManifest.xml", "classes.dex"), FileKind.MOBILE_APP),
    (_zip("Payload/Evil.app/Info.plist"), FileKind.MOBILE_APP),
    (_zip("[Content_Types].xml", "word/document.xml"), FileKind.DOCUMENT),
    (_zip("META-INF/MANIFEST.MF", "a/B.class"), FileKind.EXECUTABLE),
    (_zip("readme.txt"), FileKind.ARCHIVE),
    (b"\x1f\x8b\x08\0" + b"\0" * 20, FileKind.ARCHIVE),
    (b"Rar!\x1a\x07\x01\0", FileKind.ARCHIVE),
])
def test_sniffing_tells_the_kind(head, kind):
    assert sniff(head).kind is kind


@pytest.mark.parametrize("head", [b"<!DOCTYPE html><html>", b"\x89PNG\r\n\x1a\n", b"hello world", b"", b"MZ",
                                  b"\xff\xd8\xff\xe0JFIF"])
def test_harmless_content_is_not_risky(head):
    assert classify(head, filename="page.html", content_type="text/html") is None


def test_content_beats_a_harmless_name_and_type():
    found = classify(PE, filename="notes.txt", content_type="text/plain")
    assert found.kind is FileKind.EXECUTABLE and found.why.startswith("content:")


def test_a_risky_name_or_type_counts_even_when_the_bytes_say_nothing():
    assert classify(b"garbage", filename="setup.exe").kind is FileKind.EXECUTABLE
    assert classify(b"garbage", filename="SETUP.EXE. ").kind is FileKind.EXECUTABLE   # Windows drops the dots
    assert classify(b"garbage", content_type="application/vnd.android.package-archive; x=1").kind is FileKind.MOBILE_APP
    assert classify(b"garbage", content_type="application/vnd.openxmlformats-officedocument.wordprocessingml.document"
                    ).kind is FileKind.DOCUMENT
    # the riskiest signal wins: a PE named .pdf is an executable
    assert classify(PE, filename="invoice.pdf", content_type="application/pdf").kind is FileKind.EXECUTABLE
    assert by_name("archive.tar") .kind is FileKind.ARCHIVE and by_name("noext") is None and by_name(None) is None


def test_file_name_from_content_disposition_or_url():
    assert filename_of("https://x.test/dl?id=1", 'attachment; filename="setup.exe"') == "setup.exe"
    assert filename_of("https://x.test/dl", "attachment; filename*=UTF-8''%E8%AB%8B%E6%B1%82.exe") == "請求.exe"
    assert filename_of("https://x.test/files/a%20b.zip?x=1", None) == "a b.zip"
    assert filename_of("https://x.test/", None) is None


# -- settings and outcomes -----------------------------------------------------------------

def test_outcomes_default_to_failing_closed_for_programs():
    s = ScanSettings(clamd_socket="/x")
    infected = outcome(s, FileKind.PDF, infected=True, signature="Kanmon.Test.Signature")
    assert infected.block and infected.rule_id == RULE_INFECTED and "Kanmon.Test.Signature" in infected.reason.ja
    assert "Kanmon.Test.Signature" in infected.reason.en and infected.signature == "Kanmon.Test.Signature"
    assert not outcome(s, FileKind.PDF, infected=False).block
    big_exe, big_pdf = outcome(s, FileKind.EXECUTABLE, too_large=True), outcome(s, FileKind.PDF, too_large=True)
    assert big_exe.block and big_exe.rule_id == RULE_SCAN_TOO_LARGE and big_exe.status is ScanStatus.TOO_LARGE
    assert not big_pdf.block
    down = outcome(s, FileKind.ARCHIVE, unavailable="connection refused")
    assert down.block and down.rule_id == RULE_SCAN_UNAVAILABLE and "connection refused" in down.reason.en


BASE = """
state_dir: /tmp/kanmon-test
tunnel: {interface: wg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}
uplink: {interface: eth0}
"""


def test_config_section_parses_and_overrides_per_kind():
    cfg = load_config_text(BASE + """
scan:
  clamd: {socket: /run/clamav/clamd.ctl}
  max_bytes: 1048576
  on_too_large: {default: block, pdf: allow}
  on_unavailable: {archive: allow}
""", "k.yaml")
    s = cfg.scan
    assert s.clamd_socket == "/run/clamav/clamd.ctl" and s.max_bytes == 1048576
    assert s.on_too_large.action(FileKind.ARCHIVE) == "block" and s.on_too_large.action(FileKind.PDF) == "allow"
    assert s.on_too_large.action(FileKind.EXECUTABLE) == "block"
    assert s.on_unavailable.action(FileKind.ARCHIVE) == "allow" and s.on_unavailable.action(FileKind.SCRIPT) == "block"
    assert load_config_text(BASE, "k.yaml").scan is None
    assert scan_settings(None) is None


@pytest.mark.parametrize("clamd", ["{}", "{socket: /s, host: h, port: 1}", "{host: h}", "{port: 3310}"])
def test_clamd_address_must_be_one_of_socket_or_host_and_port(clamd):
    with pytest.raises(SourceErrors) as err:
        load_config_text(BASE + f"scan:\n  clamd: {clamd}\n", "k.yaml")
    text = "\n".join(str(e) for e in err.value.errors)
    assert "k.yaml:" in text and "host and port" in text and "port の組" in text


@pytest.mark.parametrize("bad", ["on_too_large: {executable: quarantine}", "on_unavailable: {video: block}",
                                 "max_bytes: 10"])
def test_bad_scan_settings_are_refused_with_the_line(bad):
    with pytest.raises(SourceErrors) as err:
        load_config_text(BASE + f"scan:\n  clamd: {{socket: /s}}\n  {bad}\n", "k.yaml")
    assert any(e.line == 7 and e.path[0] == "scan" for e in err.value.errors), err.value.errors


# -- bounded decoding ----------------------------------------------------------------------

def test_bounded_decoding_of_every_coding_mitmproxy_knows():
    import gzip
    import zlib

    import brotli
    import zstandard

    from gateway.scan.decoding import decode_bounded
    body = PE + b"payload" * 100
    raw_deflate = zlib.compressobj(wbits=-15)
    assert decode_bounded(gzip.compress(body), "gzip", 10_000) == body
    assert decode_bounded(zlib.compress(body), "deflate", 10_000) == body
    assert decode_bounded(raw_deflate.compress(body) + raw_deflate.flush(), "deflate", 10_000) == body
    assert decode_bounded(brotli.compress(body), "br", 10_000) == body
    assert decode_bounded(zstandard.ZstdCompressor().compress(body), "zstd", 10_000) == body
    assert decode_bounded(brotli.compress(gzip.compress(body)), "gzip, br", 10_000) == body   # last applied first
    assert decode_bounded(body, None, 10_000) == body and decode_bounded(body, "identity", 10_000) == body


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_a_decompression_bomb_stops_at_the_limit(coding):
    import gzip

    import brotli
    import zstandard

    from gateway.scan.decoding import TooLarge, decode_bounded
    zeros = b"\0" * (64 * 1024 * 1024)   # 64 MiB that compress to a few kB
    packed = {"gzip": gzip.compress, "br": brotli.compress,
              "zstd": zstandard.ZstdCompressor().compress}[coding](zeros)
    assert len(packed) < 1024 * 1024
    with pytest.raises(TooLarge):
        decode_bounded(packed, coding, 1024 * 1024)
    with pytest.raises(TooLarge):
        decode_bounded(b"x" * 2000, None, 1000)


@pytest.mark.parametrize("data,coding", [(b"not gzip at all", "gzip"), (b"x", "compress"), (b"\xff" * 20, "br")])
def test_unknown_or_corrupt_codings_are_undecodable(data, coding):
    from gateway.scan.decoding import Undecodable, decode_bounded
    with pytest.raises(Undecodable):
        decode_bounded(data, coding, 10_000)
