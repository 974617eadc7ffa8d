"""IMAP body sections (RFC 3501 6.4.5, RFC 3516 BINARY) cut out of a message's bytes.

The IMAP adapter serves a section of a message that was rewritten (tagged, neutralized, or
replaced by a notice) from the rewritten bytes, so a client that fetches part 2 sees the
same notice that a whole-message fetch shows. Pure: bytes in, bytes out.

Written here rather than taken from a library: the email package re-serializes parts (it
does not keep byte offsets), and IMAP sections must be the exact bytes of the message.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import quopri
from email.parser import BytesHeaderParser
from email.policy import compat32

import re2

from gateway.mail.limits import bytes_re2

# RE2 (linear time) for what the device or the message sends (issue #15).
_SECTION = re2.compile(r"(?is)^((?:\d+\.)*\d+)?\.?(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?\s*(\(.*\))?$")
_PART_NUMBER = re2.compile(r"(\d+\.)*\d+")
_NOT_BASE64 = bytes(b for b in range(256) if not (chr(b).isascii() and (chr(b).isalnum() or chr(b) in "+/=")))


def split_entity(entity: bytes) -> tuple[bytes, bytes]:
    """(header including the empty line, body)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = entity.find(sep)
        if pos >= 0 and not (sep == b"\n\n" and 0 <= entity.find(b"\r\n\r\n") < pos):
            return entity[:pos + len(sep)], entity[pos + len(sep):]
    if entity.startswith((b"\r\n", b"\n")):
        cut = 2 if entity.startswith(b"\r\n") else 1
        return entity[:cut], entity[cut:]
    return entity, b""


def _content_type(header: bytes, default: str = "text/plain") -> tuple[str, str | None]:
    msg = BytesHeaderParser(policy=compat32).parsebytes(header)
    if msg.get("Content-Type") is None:
        return default, None
    return msg.get_content_type(), msg.get_boundary()


def children(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body, each as the exact bytes between its delimiters."""
    delim = bytes_re2(rb"(?:^|\r?\n)--" + re2.escape(boundary.encode("utf-8", "surrogateescape")) + rb"(--)?[ \t]*(\r?\n|$)")
    parts: list[bytes] = []
    start = None
    for m in delim.finditer(body):
        if start is not None:
            parts.append(body[start:m.start()])
        if m.group(1):
            start = None
            break
        start = m.end()
    if start is not None:  # no closing delimiter: the last part runs to the end
        parts.append(body[start:])
    return parts


def _part(message: bytes, numbers: list[int]) -> tuple[bytes, bool] | None:
    """The entity for part ``numbers`` and whether it is message/rfc822."""
    current = message
    is_message = True          # the top level is a message
    for depth, n in enumerate(numbers):
        header, body = split_entity(current)
        ctype, boundary = _content_type(header)
        if depth > 0 and ctype == "message/rfc822":
            current = body
            header, body = split_entity(current)
            ctype, boundary = _content_type(header)
        if ctype.startswith("multipart/") and boundary:
            kids = children(body, boundary)
            if not 1 <= n <= len(kids):
                return None
            current = kids[n - 1]
            child_header, _ = split_entity(current)
            default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            is_message = _content_type(child_header, default)[0] == "message/rfc822"
        elif n != 1:
            return None
        else:
            is_message = False if depth == 0 else is_message
    return current, is_message


def header_fields(header: bytes, names: list[str], negate: bool) -> bytes:
    """The header lines (with continuations) whose names are (not) in ``names``, and the
    terminating empty line, as RFC 3501 defines HEADER.FIELDS[.NOT]."""
    wanted = {n.lower() for n in names}
    out = bytearray()
    keep = False
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if keep:
                out += line
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        keep = (name in wanted) != negate
        if keep:
            out += line
    return bytes(out) + b"\r\n"


def section_bytes(message: bytes, section: str) -> bytes | None:
    """The bytes of BODY[section] (without a partial), or None when the message has no such
    section or the section cannot be read."""
    m = _SECTION.match(section.strip())
    if not m:
        return None
    numbers_text, kind, fields = m.group(1), (m.group(2) or "").upper(), m.group(3)
    numbers = [int(x) for x in numbers_text.split(".")] if numbers_text else []
    if not numbers:
        entity, is_message = message, True
    else:
        found = _part(message, numbers)
        if found is None:
            return None
        entity, is_message = found
    header, body = split_entity(entity)
    if kind == "MIME":
        return header if numbers else None
    if kind == "":
        return body if numbers else message
    if numbers and not is_message:
        return None  # HEADER/TEXT only name a message (the top level or a message/rfc822 part)
    if numbers:
        header, body = split_entity(body)
    if kind == "TEXT":
        return body
    if kind == "HEADER":
        return header
    names = fields.strip("()").split() if fields else []
    return header_fields(header, names, negate=kind == "HEADER.FIELDS.NOT")


def binary_section(message: bytes, section: str) -> bytes | None:
    """BINARY[section]: the part's content with its transfer encoding removed (RFC 3516)."""
    if not section.strip():
        return message
    if not _PART_NUMBER.fullmatch(section.strip()):
        return None
    found = _part(message, [int(x) for x in section.strip().split(".")])
    if found is None:
        return None
    header, body = split_entity(found[0])
    cte = BytesHeaderParser(policy=compat32).parsebytes(header).get("Content-Transfer-Encoding", "").strip().lower()
    if cte == "base64":
        try:
            return base64.b64decode(body.translate(None, _NOT_BASE64))
        except (binascii.Error, ValueError):
            return None
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body


_HTML_TYPES = ("text/html", "application/xhtml+xml")


def converted_html_view(served: bytes, raw: bytes, section: str, binary: bool) -> bytes | None:
    """Part ``section`` for a client that describes it by the server's BODYSTRUCTURE.

    When the original part is HTML and the served one is its text/plain conversion
    (html_to_text, rewrite.html_as_text), a client that read BODYSTRUCTURE from the server
    believes the part is HTML in the original charset and transfer encoding and fetches it
    alone (iOS Mail, K-9, Thunderbird for large messages). It then gets the converted text as
    an inert HTML document — the text escaped in a ``<pre>``, no link, image or script —
    written in the charset and transfer encoding the original part declared, so the client
    decodes and shows it as the same text the whole-message fetch shows. None when the part is
    not such a conversion (the served part is served as it is)."""
    if not _PART_NUMBER.fullmatch(section.strip()):
        return None
    numbers = [int(x) for x in section.strip().split(".")]
    original, converted = _part(raw, numbers), _part(served, numbers)
    if original is None or converted is None:
        return None
    original_header = split_entity(original[0])[0]
    served_header = split_entity(converted[0])[0]
    if _content_type(original_header)[0] not in _HTML_TYPES or _content_type(served_header)[0] != "text/plain":
        return None
    decoded = binary_section(served, section)
    if decoded is None:
        return None
    served_msg = BytesHeaderParser(policy=compat32).parsebytes(served_header)
    text = decoded.decode(_codec(served_msg.get_content_charset()), "replace")
    original_msg = BytesHeaderParser(policy=compat32).parsebytes(original_header)
    charset = _codec(original_msg.get_content_charset())
    document = ('<!DOCTYPE html>\r\n<html><body><pre style="white-space: pre-wrap">'
                + html.escape(text, quote=False) + "</pre></body></html>\r\n")
    data = document.replace("\r\n", "\n").replace("\n", "\r\n").encode(charset, "xmlcharrefreplace")
    if binary:
        return data
    cte = str(original_msg.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        return quopri.encodestring(data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data


def _codec(charset: str | None) -> str:
    """A charset name the codecs know (mail and web charsets only), else UTF-8."""
    if charset:
        try:
            name = codecs.lookup(charset).name
            if name not in ("punycode", "idna", "unicode_escape", "raw_unicode_escape", "utf-7") \
                    and codecs.lookup(name)._is_text_encoding:
                return name
        except LookupError:
            pass
    return "utf-8"
