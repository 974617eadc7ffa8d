"""Generators of hostile mail (issue #15): each builds one message of about ``n`` units of its
repeated part, for the bounds tests (tests/unit/test_mail_limits.py), the cost oracle
(tests/fuzz/test_mail_cost.py), the regression corpus script and bench/noisy_mail.py.

Every generator is deterministic; ``n`` is the count of the repeated piece, not bytes.
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
import zipfile

_HEAD = ("From: sender@partner.example.co.jp\r\nTo: user@city.kanmon.example.jp\r\n"
         "Subject: test\r\nDate: Sat, 05 Dec 2026 07:00:00 +0900\r\nMessage-ID: <h@example>\r\n"
         "MIME-Version: 1.0\r\n")


def _html(body: str) -> bytes:
    return (_HEAD + "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + body + "\r\n").encode()


def _plain(body: str, head: str = _HEAD) -> bytes:
    return (head + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + body + "\r\n").encode()


def _with_attachment(data: bytes, filename: str = "a.bin", ctype: str = "application/octet-stream") -> bytes:
    b64 = base64.encodebytes(data).decode().replace("\n", "\r\n")
    return (_HEAD + 'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n--b0\r\n'
            "Content-Type: text/plain; charset=utf-8\r\n\r\nsee attached\r\n--b0\r\n"
            f'Content-Type: {ctype}\r\nContent-Disposition: attachment; filename="{filename}"\r\n'
            f"Content-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b0--\r\n").encode()


def anchor_redos(n: int) -> bytes:
    """The 402-byte mail of issue #15 at n=40: anchor text "a。" n times and a character that
    makes the host-like pattern fail, so a backtracking engine tries every way to split the
    run (2x per repetition: 20 -> 0.27 s, 24 -> 4 s, 40 -> never)."""
    return _html(f'<a href="http://example.com/">{"a。" * n}!</a>')


def display_name(n: int) -> bytes:
    head = _HEAD.replace("From: sender@partner.example.co.jp", f'From: "{"a" * n}" <sender@partner.example.co.jp>')
    return _plain("hello", head)


def from_dots(n: int) -> bytes:
    return _plain("hello", _HEAD.replace("From: sender@partner.example.co.jp", "From: a@" + "." * n))


def from_quotes(n: int) -> bytes:
    """A run of '"' in From: the standard library's address parser is worse than quadratic."""
    return _plain("hello", _HEAD.replace("From: sender@partner.example.co.jp", "From: " + '"' * n))


def to_words(n: int) -> bytes:
    """A To of n short words (under the field cap): parsed for the log and the notice."""
    return _plain("hello", _HEAD.replace("To: user@city.kanmon.example.jp", "To: " + "a " * n))


def subject_text(n: int) -> bytes:
    return _plain("hello", _HEAD.replace("Subject: test", "Subject: " + "a. " * n))


def amp_body(n: int) -> bytes:
    """A run of address characters with no address in it, as text (signature scan)."""
    return _plain("&amp" * n)


def unclosed_tag(n: int) -> bytes:
    return _html("<p>hello</p><a href=" + "x" * n)


def address_run_html(n: int) -> bytes:
    return _html("<p>" + "a." * n + "</p>")


def content_type_params(n: int) -> bytes:
    params = "".join(f"; p{i}=v" for i in range(n))
    return (_HEAD + f"Content-Type: text/plain; charset=utf-8{params}\r\n\r\nhello\r\n").encode()


def mime_parts(n: int) -> bytes:
    body = "".join("--b0\r\n\r\nx\r\n" for _ in range(n))
    return (_HEAD + 'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n' + body + "--b0--\r\n").encode()


def mime_nesting(n: int) -> bytes:
    out = [_HEAD + 'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n']
    for i in range(n):
        out.append(f'--b{i}\r\nContent-Type: multipart/mixed; boundary="b{i + 1}"\r\n\r\n')
    out.append(f"--b{n}\r\n\r\nx\r\n")
    for i in range(n, -1, -1):
        out.append(f"--b{i}--\r\n")
    return "".join(out).encode()


def padding_filename(n: int) -> bytes:
    """n "_" before the extension, RFC 2231-continued so no header line is long."""
    name = "a" + "_" * n + "x.exe"
    chunks = [name[i:i + 60] for i in range(0, len(name), 60)]
    params = "".join(f';\r\n filename*{i}="{c}"' for i, c in enumerate(chunks))
    return (_HEAD + 'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n--b0\r\n'
            f"Content-Type: application/octet-stream\r\nContent-Disposition: attachment{params}\r\n\r\n"
            "AAAA\r\n--b0--\r\n").encode()


def encoded_words(n: int) -> bytes:
    """An attachment name of n RFC 2047 encoded words (the 50,000-word MemoryError)."""
    words = "\r\n ".join("=?utf-8?B?YWFh?=" for _ in range(n))
    return (_HEAD + 'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n--b0\r\n'
            f'Content-Type: application/octet-stream;\r\n name="{words}"\r\n\r\nAAAA\r\n--b0--\r\n').encode()


def subject_words(n: int) -> bytes:
    words = "\r\n ".join("=?utf-8?B?44GC?=" for _ in range(n))
    return _plain("hello", _HEAD.replace("Subject: test", "Subject: " + words))


def header_fields(n: int) -> bytes:
    return _plain("hello", _HEAD + "".join(f"X-H{i}: v\r\n" for i in range(n)))


def tar_dirs_bytes(n: int) -> bytes:
    """A tar.gz of n directory entries. One ustar header is built by tarfile and copied with
    the name and checksum patched (tarfile itself takes ~100 us per entry)."""
    info = tarfile.TarInfo("d%09d/" % 0)
    info.type = tarfile.DIRTYPE
    template = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8
    base_sum = sum(template) - sum(template[0:11])
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:   # streamed: no 150 MB tar in memory
        for i in range(n):
            name = b"d%09d/" % i
            block = bytearray(template)
            block[0:11] = name
            block[148:156] = b"%06o\0 " % (base_sum + sum(name))
            gz.write(block)
        gz.write(b"\0" * 1024)
    return buf.getvalue()


def tar_dirs(n: int) -> bytes:
    return _with_attachment(tar_dirs_bytes(n), "a.tar.gz", "application/gzip")


def zip_entries(n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            zf.writestr(f"d{i}/", b"")
    return _with_attachment(buf.getvalue(), "a.zip", "application/zip")


def html_nesting(n: int) -> bytes:
    return _html("<div>" * n + "x" + "</div>" * n)


def anchor_text(n: int) -> bytes:
    return _html('<a href="http://example.com/">' + "word " * n + "</a>")


def huge_numbers(n: int) -> bytes:
    """Numbers of n digits where a parser may convert them: a charref, a Content-Length, a
    continuation index."""
    digits = "9" * n
    head = _HEAD + f"Content-Length: {digits}\r\n"
    return (head + "Content-Type: text/html; charset=utf-8\r\n\r\n"
            f"<p>&#{digits}; &#x{digits};</p><a href=\"http://example.com:{digits}/\">x</a>\r\n").encode()


def huge_charref(n: int) -> bytes:
    """Numeric character references of n digits (int() refuses more than 4,300: ValueError)."""
    digits = "9" * n
    return _html(f"<p>&#{digits}; &#x{digits}; &#{'0' * n}65;</p><a href=\"http://example.com/&#{digits};\">&#{digits};</a>")


# name -> (generator, n for the bounds test: input of several MB where the class allows)
def theme_body(n: int) -> bytes:
    """Issue 20: theme phrases n times (every one a hit of the RE2 set)."""
    return _plain("履歴書 パスワードを入力 " * n)


def han_body(n: int) -> bytes:
    return _plain("这们说" * n)     # three characters no Japanese codec writes


def spaced_kana_body(n: int) -> bytes:
    return _plain("あ い " * n)


def signature_numbers(n: int) -> bytes:
    return _plain("x\r\n--\r\n" + "TEL: 03-0000-0000 " * n)


def pe_icons_attachment(n: int) -> bytes:
    """A PE with n icon resources, named as a PDF (icon-disguise; pefile reads the tree)."""
    from tests.mailcorpus.pe import pe_with_icons
    return _with_attachment(pe_with_icons(n), "請求書.pdf", "application/pdf")


CLASSES = {
    "anchor-redos": (anchor_redos, 40),
    "anchor-redos-large": (anchor_redos, 1_000_000),
    "display-name": (display_name, 1_000_000),
    "from-dots": (from_dots, 200_000),
    "from-quotes": (from_quotes, 60_000),
    "from-quotes-under-caps": (from_quotes, 4_000),
    "to-words": (to_words, 30_000),
    "subject-text": (subject_text, 20_000),
    "amp-body": (amp_body, 1_000_000),
    "unclosed-tag": (unclosed_tag, 3_000_000),
    "address-run-html": (address_run_html, 1_000_000),
    "content-type-params": (content_type_params, 200_000),
    "mime-parts": (mime_parts, 100_000),
    "mime-nesting": (mime_nesting, 5_000),
    "padding-filename": (padding_filename, 100_000),
    "padding-filename-under-caps": (padding_filename, 5_000),
    "encoded-words": (encoded_words, 50_000),
    "subject-words": (subject_words, 50_000),
    "header-fields": (header_fields, 200_000),
    "tar-dirs": (tar_dirs, 300_000),
    "zip-entries": (zip_entries, 20_000),
    "html-nesting": (html_nesting, 300_000),
    "anchor-text": (anchor_text, 1_000_000),
    "huge-numbers": (huge_numbers, 100_000),
    "huge-charref": (huge_charref, 500_000),
    "theme-body": (theme_body, 100_000),
    "han-body": (han_body, 500_000),
    "spaced-kana-body": (spaced_kana_body, 500_000),
    "signature-numbers": (signature_numbers, 100_000),
    "pe-icons": (pe_icons_attachment, 4_000),   # pefile reads no directory of more than 4,096 entries
}
