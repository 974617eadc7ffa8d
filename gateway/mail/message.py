"""Parse one RFC 5322 message (bytes) into the views the checks need, with the standard
library's email package (policy=email.policy.default: RFC 2047 headers, RFC 2231 parameters,
ISO-2022-JP and other charsets are decoded by it). Pure: bytes in, data out."""

from __future__ import annotations

import email
import email.errors
import email.policy
import email.utils
from dataclasses import dataclass
from email.message import EmailMessage

from gateway.i18n import Text
from gateway.mail.html_text import html_to_text

POLICY = email.policy.default
_IDENTIFYING_HEADERS = ("from", "to", "subject", "date", "message-id", "sender", "received")
# Defects that mean the message was cut off or its structure is broken.
_TRUNCATION_DEFECTS = (
    email.errors.CloseBoundaryNotFoundDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
    email.errors.InvalidBase64LengthDefect,
)


class MalformedMessage(Exception):
    """The bytes are not a usable RFC 5322 message; ``text`` says why in both languages."""

    def __init__(self, text: Text):
        self.text = text
        super().__init__(text.en)


@dataclass(frozen=True)
class Part:
    index: int                 # position in EmailMessage.walk() order
    content_type: str
    filenames: tuple[str, ...]  # distinct decoded names (Content-Disposition filename, Content-Type name)
    data: bytes                # decoded transfer encoding


@dataclass(frozen=True)
class ParsedMail:
    message: EmailMessage
    parts: tuple[Part, ...]     # leaf parts that are files (anything not a plain/html body)
    plain: tuple[str, ...]      # text/plain bodies
    html: tuple[str, ...]       # text/html bodies
    linesep: str


def parse_message(raw: bytes) -> ParsedMail:
    try:
        return _parse(raw)
    except (MalformedMessage, MemoryError, RecursionError):
        raise   # MemoryError / RecursionError: too complex, not malformed (engine.py)
    except Exception as exc:  # noqa: BLE001 — the email package raises assorted errors on hostile input
        raise MalformedMessage(Text(
            f"メッセージを解析できません ({type(exc).__name__})",
            f"the message cannot be parsed ({type(exc).__name__}: {exc})")) from exc


def _parse(raw: bytes) -> ParsedMail:
    if not raw.strip():
        raise MalformedMessage(Text("メッセージが空です", "the message is empty"))
    message = email.message_from_bytes(raw, policy=POLICY)
    keys = {k.lower() for k in message.keys()}
    if not keys & set(_IDENTIFYING_HEADERS):
        raise MalformedMessage(Text(
            "メールとして解釈できません (ヘッダー部がありません)",
            "not an e-mail message (no header section found)"))
    parts: list[Part] = []
    plain: list[str] = []
    html: list[str] = []
    for index, part in enumerate(message.walk()):
        for defect in part.defects:
            if isinstance(defect, _TRUNCATION_DEFECTS):
                raise _truncated(defect)
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        names = _filenames(part)
        data = part.get_payload(decode=True) or b""
        for defect in part.defects:
            if isinstance(defect, _TRUNCATION_DEFECTS):
                raise _truncated(defect)
        disposition = (part.get_content_disposition() or "").lower()
        if ctype in ("text/plain", "text/html") and not names and disposition != "attachment":
            text = body_text(part, data)
            (plain if ctype == "text/plain" else html).append(text)
            continue
        parts.append(Part(index, ctype, names, data))
    linesep = "\r\n" if b"\r\n" in raw[:4096] else "\n"
    return ParsedMail(message, tuple(parts), tuple(plain), tuple(html), linesep)


def _truncated(defect: Exception) -> MalformedMessage:
    return MalformedMessage(Text(
        f"メッセージが壊れているか途中で切れています ({type(defect).__name__})",
        f"the message is damaged or truncated ({type(defect).__name__})"))


def fix_8bit(value: str) -> str:
    """Header text that arrived as raw 8-bit bytes (RFC 6532 UTF-8, or Shift_JIS from old
    Japanese mailers) comes out of the email package surrogate-escaped; decode it properly."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    data = value.encode("utf-8", "surrogateescape")
    for charset in ("utf-8", "cp932", "euc_jp"):
        try:
            return data.decode(charset)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace")


def _filenames(part: EmailMessage) -> tuple[str, ...]:
    names: list[str] = []
    for getter in (lambda: part.get_filename(), lambda: part.get_param("name", header="content-type")):
        try:
            value = getter()
        except (ValueError, LookupError, TypeError):
            continue
        if isinstance(value, tuple):  # undecodable RFC 2231 triple
            value = email.utils.collapse_rfc2231_value(value)
        if value:
            value = fix_8bit(str(value))
            if value not in names:
                names.append(value)
    return tuple(names)


def body_text(part: EmailMessage, data: bytes) -> str:
    """Decoded text of a text/* part; unknown or lying charsets fall back with replacement."""
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except (LookupError, UnicodeError, ValueError, AssertionError):
        pass
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def readable_text(mail: ParsedMail) -> str:
    """The body as a reader sees it: plain parts, else HTML converted to text."""
    if mail.plain:
        return "\n".join(mail.plain)
    return "\n".join(html_to_text(h) for h in mail.html)
