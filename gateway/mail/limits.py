"""Caps in front of the mail parsers (issue #15): a message the parsers cannot judge in
bounded time and memory is not parsed at all; it gets the indicator ``message-too-complex``
and the policy's ``too_complex`` action (default quarantine).

``check_message`` is one linear pass over the raw bytes, before the standard library's email
package sees them: header fields (count and size, each with its folded lines), RFC 2047
encoded words per field, parameters of Content-Type / Content-Disposition, and the number of
MIME parts (lines that open a part of any boundary the message declares). The caps on HTML
(size, nesting, anchor text) are checked where the HTML is parsed (html_links.py); archive
entries, directories included, in archives.py. Pure: bytes in, an exception out.
"""

from __future__ import annotations

from dataclasses import dataclass

import re2

from gateway.i18n import Text

TOO_COMPLEX = "message-too-complex"

# The characters Python's str.isspace() accepts, for RE2 character classes (RE2's \s is
# ASCII only: [\t\n\f\r ]).
RE2_SPACE = r"\s\x0b\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"



def bytes_re2(pattern: bytes):
    """RE2 over bytes with one byte = one character, as Python's bytes patterns (RE2's default
    UTF-8 mode would not let a class match an invalid UTF-8 byte)."""
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    return re2.compile(pattern, options)


# boundary="..." or boundary=token, anywhere (top level or in a part's own headers).
_BOUNDARY = bytes_re2(rb'(?i)\bboundary[ \t]*=[ \t]*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))')


@dataclass(frozen=True)
class MessageLimits:
    """Defaults leave room for any real mail seen in the corpus (tests/mailcorpus) by a wide
    margin; each is a policy key under ``limits`` (policies/mail.yaml)."""

    max_header_fields: int = 2000          # header fields in the whole message, all parts
    max_header_field_bytes: int = 65536    # one field with its continuation lines
    # From / Sender / Reply-To (and Resent-): the standard library's address parser is
    # quadratic or worse on runs of dots, quotes or words (32 KB of '"': 11 s).
    max_address_header_bytes: int = 4096
    max_encoded_words: int = 200           # RFC 2047 "=?" words in one header field
    max_parameters: int = 100              # ";" parameters of one Content-Type/-Disposition
    max_mime_parts: int = 1000             # part delimiter lines
    max_html_bytes: int = 4 * 1024 * 1024  # one HTML body, decoded
    max_html_depth: int = 1000             # open (unclosed) elements at any point
    max_anchor_text: int = 65536           # visible text of one link, in characters


class MessageTooComplex(Exception):
    """A cap was exceeded; ``text`` says which, in both languages."""

    def __init__(self, text: Text):
        self.text = text
        super().__init__(text.en)


def too_complex(ja: str, en: str) -> MessageTooComplex:
    return MessageTooComplex(Text(f"メッセージが複雑すぎて検査できません: {ja}",
                                  f"the message is too complex to inspect: {en}"))


def check_message(raw: bytes, limits: MessageLimits) -> None:
    """Raise MessageTooComplex if ``raw`` is over any of the header / MIME caps. Linear."""
    boundaries = _boundaries(raw)
    fields = 0
    parts = 0
    pos = 0
    n = len(raw)
    in_headers = True   # the message starts with its header section
    while pos < n:
        end = raw.find(b"\n", pos)
        end = n if end < 0 else end + 1
        line = raw[pos:end]
        if in_headers:
            if line.strip(b"\r\n") == b"":
                in_headers = False
                pos = end
                continue
            # One field: this line and the continuation lines (starting with space or tab).
            field_end = end
            while field_end < n and raw[field_end:field_end + 1] in (b" ", b"\t"):
                nxt = raw.find(b"\n", field_end)
                field_end = n if nxt < 0 else nxt + 1
                if field_end - pos > limits.max_header_field_bytes:
                    break
            fields += 1
            if fields > limits.max_header_fields:
                raise too_complex(f"ヘッダーが {limits.max_header_fields} 個を超える",
                                  f"more than {limits.max_header_fields} header fields")
            _check_field(raw, pos, field_end, limits)
            pos = field_end
            continue
        if not boundaries:
            break       # no MIME structure: the body is not looked at
        if not line.startswith(b"--"):
            nxt = raw.find(b"\n--", pos)
            if nxt < 0:
                break
            pos = nxt + 1
            continue
        token = line[2:].rstrip()
        opens = token in boundaries
        if opens or (token.endswith(b"--") and token[:-2] in boundaries):
            parts += 1
            if parts > limits.max_mime_parts:
                raise too_complex(f"MIME パートが {limits.max_mime_parts} 個を超える",
                                  f"more than {limits.max_mime_parts} MIME parts")
            in_headers = opens   # a part's own header section follows an opening delimiter
        pos = end


_ADDRESS_HEADERS = frozenset({"from", "sender", "reply-to", "resent-from", "resent-sender"})


def _boundaries(raw: bytes) -> set[bytes]:
    out: set[bytes] = set()
    for m in _BOUNDARY.finditer(raw):
        value = m.group(1) if m.group(1) is not None else m.group(2)
        out.add(value.rstrip())
        if len(out) > 10 * 1000:   # far more than max_mime_parts could use; stop collecting
            break
    return out


def _check_field(raw: bytes, start: int, end: int, limits: MessageLimits) -> None:
    size = end - start
    colon = raw.find(b":", start, min(end, start + 200))
    name = raw[start:colon if colon >= 0 else min(end, start + 40)].strip().decode("ascii", "replace")
    lower = name.lower()
    if size > limits.max_header_field_bytes:
        raise _field_error(name, f"が {limits.max_header_field_bytes} バイトを超える",
                           f"is longer than {limits.max_header_field_bytes} bytes")
    if lower in _ADDRESS_HEADERS and size > limits.max_address_header_bytes:
        raise _field_error(name, f"が {limits.max_address_header_bytes} バイトを超える",
                           f"is longer than {limits.max_address_header_bytes} bytes")
    if raw.count(b"=?", start, end) > limits.max_encoded_words:
        raise _field_error(name, f"の RFC 2047 符号化語が {limits.max_encoded_words} 個を超える",
                           f"has more than {limits.max_encoded_words} RFC 2047 encoded words")
    if lower in ("content-type", "content-disposition") and raw.count(b";", start, end) > limits.max_parameters:
        raise _field_error(name, f"のパラメーターが {limits.max_parameters} 個を超える",
                           f"has more than {limits.max_parameters} parameters")


def _field_error(name: str, ja: str, en: str) -> MessageTooComplex:
    shown = "".join(ch if ch.isprintable() else "?" for ch in name)[:40]
    return too_complex(f"ヘッダー {shown} {ja}", f"header field {shown} {en}")
