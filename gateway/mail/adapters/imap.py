"""IMAP4rev1 adapter (RFC 3501; LITERAL+ RFC 7888, BINARY RFC 3516, IDLE RFC 2177), device =
client.

Server side: every response is collected whole (its line and literals) before it is passed
on. ``* n FETCH`` responses carrying a whole message (``BODY[]``, ``RFC822``, ``BINARY[]``;
BODY.PEEK[] is answered as BODY[]) are judged and the message is replaced by what ``judge``
returns, with the literal's length rewritten (and ``RFC822.SIZE`` in the same response).
COMPRESS=* is removed from every capability list (untagged CAPABILITY and [CAPABILITY]
response codes); a COMPRESS command is answered NO and never reaches the server.

Partial fetches (the approach and its limits):

* A FETCH command asking for body sections (``BODY[1]``, ``BODY.PEEK[2.MIME]``, ``BODY[TEXT]``,
  ``BINARY[2]``, ``RFC822.TEXT``, ``BODY[]<0.2048>``) is rewritten to fetch ``BODY.PEEK[]`` as
  well. The whole message is judged, every requested section is cut out of the *judged*
  version (gateway/mail/adapters/imap_sections.py) and the added item is removed before the
  response reaches the client. A neutralized attachment fetched on its own is thus the same
  notice a whole-message fetch shows; nothing of the original leaks through a section fetch.
  Cost: each such fetch transfers the whole message from the server to the gateway.
* Header-only items (``BODY[HEADER]``, ``BODY[HEADER.FIELDS (...)]``, ``RFC822.HEADER``,
  ``ENVELOPE``) are passed unchanged and not augmented, so a message list costs no more than
  without the gateway; they show the original subject (without the tag prefix).
* ``BODYSTRUCTURE``/``BODY`` and ``RFC822.SIZE`` in a response without the whole message
  describe the server's original. A client may see a part size that differs from the notice
  it then receives. An HTML part delivered as text (html_to_text, issue #20) and fetched alone
  is served in the form BODYSTRUCTURE announced: an inert HTML document holding the converted
  text, in the original part's charset and transfer encoding (imap_sections.converted_html_view).
* A body section that arrives without the whole message it belongs to (a server that
  ignored the added item) is withheld: replaced by a short notice.
* STARTTLS is passed on, never removed; once the server accepts it the adapter reports
  ``opaque``. APPEND (saving to Sent/Drafts) is passed unchanged: outgoing mail is judged
  where it is sent (SMTP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.mail.adapters import ByteQueue, Judge, LineTooLong, Output
from gateway.mail.adapters.imap_sections import binary_section, converted_html_view, section_bytes
from gateway.mail.engine import MailContext
from gateway.mail.limits import bytes_re2

WITHHELD = b"[Kanmon] This part could not be checked and was withheld.\r\n"
# Issue #15: these stay on Python's re because each is linear on any input (anchored at the
# line start, or searched for a literal with no nested repetition) and they run on every
# line of a mail session in the proxy process, where RE2's per-call overhead would cost more.
_LITERAL_AT_END = re.compile(rb"(~?)\{(\d+)(\+?)\}\r?\n$")
_STATUS = re.compile(rb"^(?:\*|[^\s]+) (?:OK|NO|BAD|BYE|PREAUTH)\b", re.I)
_FETCH = re.compile(rb"^\* (\d+) FETCH \(", re.I)
# Searched anywhere in a line: RE2 (many "[CAPABILITY " without "]" are quadratic in re).
_CAP_CODE = bytes_re2(rb"(?i)\[CAPABILITY ([^\]]*)\]")
_CAP_UNTAGGED = re.compile(rb"^(\* CAPABILITY )(.*?)(\r?\n)$", re.I | re.S)
_FETCH_CMD = re.compile(rb"^(\S+ (?:UID )?FETCH \S+ )(.*?)(\r?\n)$", re.I | re.S)
_SECTION_ITEM = re.compile(r"^(BODY|BINARY)(?:\.PEEK)?\[([^\]]*)\](?:<(\d+)(?:\.(\d+))?>)?$", re.I)
_HEADER_ONLY = re.compile(r"^(HEADER|HEADER\.FIELDS(\.NOT)?\s*\(.*\))$", re.I | re.S)


@dataclass
class FetchItem:
    name: str          # as sent, e.g. BODY[2]<0>
    value: bytes       # the raw value bytes (literal marker and data included)
    content: bytes | None = None   # the string value (literal or quoted), None for NIL/lists/atoms
    literal8: bool = False


def _tag_and_verb(line: bytes) -> tuple[bytes, bytes, bytes]:
    words = line.split(None, 3)
    tag = words[0] if words else b""
    verb = words[1].upper() if len(words) > 1 else b""
    arg = words[2].upper() if len(words) > 2 else b""
    if verb == b"UID" and arg:
        verb, arg = b"UID " + arg, words[3].split(None, 1)[0].upper() if len(words) > 3 else b""
    return tag, verb, arg


class ImapAdapter:
    def __init__(self, judge: Judge, *, device: str | None = None, max_message_bytes: int = 50 * 1024 * 1024):
        self.judge = judge
        self.device = device
        self.max_response_bytes = max_message_bytes + 1024 * 1024
        self._client = ByteQueue()
        self._server = ByteQueue()
        self._client_literal = 0
        self._client_continuing = False
        self._response = bytearray()
        self._response_literal = 0
        self._starttls_tags: set[bytes] = set()
        self._augmented_tags: set[bytes] = set()
        self._opaque = False
        self.mailbox: str | None = None

    # -- client side ---------------------------------------------------------------------
    def from_client(self, data: bytes) -> Output:
        out = Output()
        if self._opaque:
            out.to_server += data
            out.opaque = True
            return out
        self._client.feed(data)
        try:
            while True:
                if self._client_literal:
                    chunk = self._client.take(self._client_literal)
                    if not chunk:
                        break
                    self._client_literal -= len(chunk)
                    out.to_server += chunk
                    continue
                line = self._client.line()
                if line is None:
                    break
                self._client_line(line, out)
        except LineTooLong as exc:
            out.close = f"IMAP client: {exc}"
        return out

    def _client_line(self, line: bytes, out: Output) -> None:
        literal = _LITERAL_AT_END.search(line)
        continuing = self._client_continuing
        self._client_continuing = bool(literal)
        if literal:
            self._client_literal = int(literal.group(2))
        if continuing or literal:
            out.to_server += line  # part of a command with literals (APPEND, LOGIN {n}...)
            return
        tag, verb, arg = _tag_and_verb(line)
        if verb == b"COMPRESS":
            out.to_client += tag + b" NO COMPRESS is disabled by the mail gateway\r\n"
            return
        if verb == b"STARTTLS":
            self._starttls_tags.add(tag)
        elif verb in (b"SELECT", b"EXAMINE"):
            self.mailbox = line.split(None, 2)[2].strip().decode("utf-8", "replace") if len(line.split(None, 2)) > 2 else None
        elif verb in (b"FETCH", b"UID FETCH"):
            line = self._augment_fetch(tag, line)
        out.to_server += line

    def _augment_fetch(self, tag: bytes, line: bytes) -> bytes:
        m = _FETCH_CMD.match(line)
        if not m:
            return line
        items_text = m.group(2).decode("utf-8", "replace")
        names = _command_items(items_text)
        if any(_is_whole(n) for n in names) or not any(_needs_whole(n) for n in names):
            return line
        self._augmented_tags.add(tag)
        inner = items_text.strip()
        if inner.startswith("(") and inner.endswith(")"):
            inner = inner[1:-1]
        return m.group(1) + f"({inner} BODY.PEEK[])".encode() + m.group(3)

    # -- server side ---------------------------------------------------------------------
    def from_server(self, data: bytes) -> Output:
        out = Output()
        if self._opaque:
            out.to_client += data
            out.opaque = True
            return out
        self._server.feed(data)
        try:
            while not self._opaque:
                if self._response_literal:
                    chunk = self._server.take(self._response_literal)
                    if not chunk:
                        break
                    self._response_literal -= len(chunk)
                    self._response += chunk
                    self._check_size()
                    continue
                line = self._server.line()
                if line is None:
                    break
                first = not self._response
                self._response += line
                self._check_size()
                literal = _LITERAL_AT_END.search(line)
                if literal and not (first and (_STATUS.match(line) or line.startswith(b"+"))):
                    self._response_literal = int(literal.group(2))
                    continue
                response, self._response = bytes(self._response), bytearray()
                self._server_response(response, out)
            if self._opaque:
                out.to_client += self._server.take_all()
        except (LineTooLong, ResponseTooBig) as exc:
            out.close = f"IMAP server: {exc}"
        return out

    def _check_size(self) -> None:
        if len(self._response) > self.max_response_bytes:
            raise ResponseTooBig(f"response larger than {self.max_response_bytes} bytes")

    def _server_response(self, response: bytes, out: Output) -> None:
        if _FETCH.match(response):
            out.to_client += self._fetch_response(response, out)
            return
        if response.startswith(b"* ") and _CAP_UNTAGGED.match(response):
            m = _CAP_UNTAGGED.match(response)
            response = m.group(1) + filter_capabilities(m.group(2)) + m.group(3)
        elif b"[CAPABILITY " in response.upper():
            response = _CAP_CODE.sub(lambda c: b"[CAPABILITY " + filter_capabilities(c.group(1)) + b"]", response)
        out.to_client += response
        if not response.startswith((b"* ", b"+")):
            tag, status, _ = _tag_and_verb(response)
            self._augmented_tags.discard(tag)
            if tag in self._starttls_tags:
                self._starttls_tags.discard(tag)
                if status == b"OK":
                    self._opaque = True
                    out.opaque = True

    def _fetch_response(self, response: bytes, out: Output) -> bytes:
        m = _FETCH.match(response)
        parsed = parse_fetch_items(response, m.end())
        if parsed is None:
            if b"{" in response:
                raise ResponseTooBig("unparseable FETCH response carrying a literal")  # fail closed
            return response
        items, tail = parsed
        whole = next((i for i in items if _is_whole(i.name) and i.content is not None), None)
        sections = [i for i in items if _needs_whole(i.name)]
        if whole is None and not sections:
            return response
        served = raw = None
        if whole is not None:
            raw = whole.content
            judgement = self.judge(raw, MailContext("inbound", self.device))
            served = judgement.data if judgement.data is not None else b""
            out.events.append({"kind": "message", "action": judgement.action, "size": len(raw),
                               "number": int(m.group(1)), "mailbox": self.mailbox, "reason": judgement.reason,
                               "uid": next((i.value.decode() for i in items if i.name.upper() == "UID"), None)})
        drop_added = whole is not None and bool(self._augmented_tags) and bool(sections) \
            and whole.name.upper() == "BODY[]"
        if whole is not None and served == raw and not drop_added:
            return response   # the very same bytes
        changed = whole is not None and served != raw
        new_items: list[bytes] = []
        for item in items:
            name = item.name.upper()
            if drop_added and item is whole:
                continue  # the item the adapter added
            if changed and _is_whole(name) and item.content is not None:
                new_items.append(item.name.encode() + b" " + _literal(served, item.literal8))
            elif changed and name == "RFC822.SIZE":
                new_items.append(b"RFC822.SIZE %d" % len(served))
            elif changed and _is_section(name) and item.content is not None:
                part = _section_of(served, raw, item)
                new_items.append(item.name.encode() + b" " + _literal(WITHHELD if part is None else part, item.literal8))
            elif whole is None and _needs_whole(name) and item.content is not None:
                new_items.append(item.name.encode() + b" " + _literal(WITHHELD, item.literal8))
            else:
                new_items.append(item.name.encode() + b" " + item.value)
        return response[:m.end()] + b" ".join(new_items) + b")" + tail


class ResponseTooBig(Exception):
    pass


def filter_capabilities(caps: bytes) -> bytes:
    return b" ".join(c for c in caps.split(b" ") if not c.upper().startswith(b"COMPRESS="))


def _literal(data: bytes, literal8: bool) -> bytes:
    return (b"~" if literal8 else b"") + b"{%d}\r\n" % len(data) + data


def _is_whole(name: str) -> bool:
    n = name.upper().replace(".PEEK", "")
    return n in ("BODY[]", "RFC822", "BINARY[]")


def _is_section(name: str) -> bool:
    return name.upper() in ("RFC822.TEXT", "RFC822.HEADER") or (_SECTION_ITEM.match(name) is not None and not _is_whole(name))


def _needs_whole(name: str) -> bool:
    """A body section whose content depends on the judged message (not header-only)."""
    n = name.upper()
    if n == "RFC822.TEXT":
        return True
    m = _SECTION_ITEM.match(name)
    if not m:
        return False
    section, partial = m.group(2).strip(), m.group(3)
    if not section:
        return partial is not None
    return not _HEADER_ONLY.match(section)


def _section_of(served: bytes, raw: bytes, item: FetchItem) -> bytes | None:
    name = item.name
    if name.upper() in ("RFC822.TEXT", "RFC822.HEADER"):
        return section_bytes(served, name.upper()[7:])
    m = _SECTION_ITEM.match(name)
    if not m:
        return None
    kind, section, origin = m.group(1).upper(), m.group(2), m.group(3)
    cut = binary_section if kind == "BINARY" else section_bytes
    # An HTML part delivered as text, asked for alone: in the form the server's BODYSTRUCTURE
    # announced (issue #20, imap_sections.converted_html_view).
    whole = converted_html_view(served, raw, section, kind == "BINARY") or cut(served, section)
    if whole is None or origin is None:
        return whole
    start = int(origin)
    # The response names only the origin; the length the client asked for is the server's
    # answer length unless that answer ran to the end of the original section.
    original = cut(raw, section) or b""
    sent = len(item.content or b"")
    if start + sent >= len(original):
        return whole[start:]
    return whole[start:start + sent]


def _command_items(text: str) -> list[str]:
    """Fetch attribute names of a FETCH command (macros ALL/FAST/FULL name no body)."""
    inner = text.strip()
    if inner.startswith("(") and inner.endswith(")"):
        inner = inner[1:-1]
    names, depth, current = [], 0, ""
    for ch in inner:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == " " and depth == 0:
            if current:
                names.append(current)
            current = ""
        else:
            current += ch
    if current:
        names.append(current)
    return names


def parse_fetch_items(response: bytes, pos: int) -> tuple[list[FetchItem], bytes] | None:
    """The items of a FETCH response whose '(' ends at ``pos``; None when malformed."""
    items: list[FetchItem] = []
    n = len(response)
    while True:
        while pos < n and response[pos:pos + 1] == b" ":
            pos += 1
        if pos >= n:
            return None
        if response[pos:pos + 1] == b")":
            return items, response[pos + 1:]
        start, depth = pos, 0
        while pos < n:
            ch = response[pos:pos + 1]
            if ch == b"[":
                depth += 1
            elif ch == b"]":
                depth -= 1
            elif ch in (b" ", b")") and depth == 0:
                break
            pos += 1
        name = response[start:pos].decode("ascii", "replace")
        if response[pos:pos + 1] != b" ":
            return None
        pos += 1
        value_start = pos
        value = _value(response, pos)
        if value is None:
            return None
        pos, content, literal8 = value
        items.append(FetchItem(name, response[value_start:pos], content, literal8))


def _value(data: bytes, pos: int) -> tuple[int, bytes | None, bool] | None:
    n = len(data)
    if pos >= n:
        return None
    ch = data[pos:pos + 1]
    if ch in (b"{", b"~"):
        m = re.compile(rb"~?\{(\d+)\+?\}\r\n").match(data, pos)
        if not m:
            return None
        size = int(m.group(1))
        end = m.end() + size
        if end > n:
            return None
        return end, data[m.end():end], ch == b"~"
    if ch == b'"':
        out = bytearray()
        pos += 1
        while pos < n:
            c = data[pos:pos + 1]
            if c == b"\\" and pos + 1 < n:
                out += data[pos + 1:pos + 2]
                pos += 2
                continue
            if c == b'"':
                return pos + 1, bytes(out), False
            out += c
            pos += 1
        return None
    if ch == b"(":
        depth = 0
        while pos < n:
            c = data[pos:pos + 1]
            if c == b"(":
                depth += 1
                pos += 1
            elif c == b")":
                depth -= 1
                pos += 1
                if depth == 0:
                    return pos, None, False
            elif c in (b'"', b"{", b"~"):
                inner = _value(data, pos)
                if inner is None:
                    if c == b"~":
                        pos += 1
                        continue
                    return None
                pos = inner[0]
            else:
                pos += 1
        return None
    end = pos
    while end < n and data[end:end + 1] not in (b" ", b")", b"\r", b"\n"):
        end += 1
    return end, None, False
