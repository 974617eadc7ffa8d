"""SMTP submission adapter (RFC 5321, PIPELINING RFC 2920), device = client.

What it does to the conversation:

* EHLO replies lose CHUNKING, BINARYMIME and BURL, so every message comes as DATA and can
  be read whole. STARTTLS is never removed (that would be a downgrade); if a client starts
  TLS inside the stream the adapter reports ``opaque`` and the addon cuts or passes the
  connection as configured.
* RCPT TO an address the ``recipient_refusal`` function refuses (free-mail / private
  addresses: IPA SME sample 7.3, no forwarding of business mail to private addresses) is
  answered ``550 5.7.1`` by the adapter and never reaches the server.
* DATA is not forwarded when the client sends it. The adapter answers 354 itself, holds the
  message until the end-of-data dot, asks ``judge`` and only then sends DATA + message to
  the server (or answers 550/554 and resets the server's transaction with RSET, whose reply
  it swallows). The server never sees a byte of a refused message.

Replies stay in order: every command the client sends gets one entry in a queue; entries
answered by the server are filled from the server's replies, entries the adapter answers
itself are sent when they reach the head. Pipelined commands after an end-of-data dot are
held until the message has been released and answered.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.mail.adapters import ByteQueue, Judge, LineTooLong, Output, dot_stuff, dot_unstuff
from gateway.mail.engine import MailContext

STRIPPED_EXTENSIONS = frozenset({"CHUNKING", "BINARYMIME", "BURL"})
_REPLY_LINE = re.compile(rb"^(\d{3})([ -]?)(.*)$", re.S)
_PATH = re.compile(rb"^(?:MAIL\s+FROM|RCPT\s+TO)\s*:\s*<?([^>\s]*)>?", re.I)


@dataclass
class _Pending:
    kind: str                 # greeting ehlo mail rcpt other starttls auth internal-data data-end internal-rset
    synthetic: bytes | None = None   # the adapter answers this itself
    address: str = ""


class SmtpAdapter:
    def __init__(self, judge: Judge, recipient_refusal: Callable[[str], str | None] = lambda a: None, *,
                 device: str | None = None, max_message_bytes: int = 50 * 1024 * 1024):
        self.judge = judge
        self.recipient_refusal = recipient_refusal
        self.device = device
        self.max_message_bytes = max_message_bytes
        self._client = ByteQueue()
        self._server = ByteQueue()
        self._queue: deque[_Pending] = deque([_Pending("greeting")])
        self._reply_lines: list[bytes] = []
        self._mode = "command"            # command | data | opaque
        self._data = bytearray()
        self._data_too_big = False
        self._data_gate_open = True       # False: DATA got a 554 (no recipients); discard what follows
        self._hold_client = False         # a released message awaits its reply
        self._payload: bytes | None = None
        self._sasl_line = False
        self._bdat_skip = 0
        self.mail_from = ""
        self.rcpts: list[str] = []

    # -- client side ---------------------------------------------------------------------
    def from_client(self, data: bytes) -> Output:
        out = Output()
        if self._mode == "opaque":
            out.to_server += data
            out.opaque = True
            return out
        self._client.feed(data)
        try:
            self._process_client(out)
        except LineTooLong as exc:
            out.close = f"SMTP client: {exc}"
        self._drain(out)
        return out

    def _process_client(self, out: Output) -> None:
        while not self._hold_client and self._mode != "opaque":
            if self._bdat_skip:
                self._bdat_skip -= len(self._client.take(self._bdat_skip))
                if self._bdat_skip:
                    return
                continue
            if self._mode == "data":
                if not self._read_data(out):
                    return
                continue
            line = self._client.line()
            if line is None:
                return
            self._command(line, out)

    def _command(self, line: bytes, out: Output) -> None:
        if self._sasl_line:  # a SASL response line, not a command
            self._sasl_line = False
            self._forward(line, _Pending("auth"), out)
            return
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if verb == b"EHLO":
            self._forward(line, _Pending("ehlo"), out)
        elif verb == b"MAIL":
            m = _PATH.match(line)
            self.mail_from = m.group(1).decode("utf-8", "replace") if m else ""
            self.rcpts = []
            self._forward(line, _Pending("mail"), out)
        elif verb == b"RCPT":
            m = _PATH.match(line)
            address = m.group(1).decode("utf-8", "replace") if m else ""
            refusal = self.recipient_refusal(address)
            if refusal:
                self._queue.append(_Pending("rcpt", synthetic=b"550 5.7.1 " + _one_line(refusal) + b"\r\n"))
                out.events.append({"kind": "recipient-refused", "address": address, "reason": refusal,
                                   "mail_from": self.mail_from})
            else:
                self._forward(line, _Pending("rcpt", address=address), out)
        elif verb == b"DATA":
            self._queue.append(_Pending("data-gate"))
            self._mode = "data"
            self._data = bytearray()
            self._data_too_big = False
            self._data_gate_open = True
        elif verb == b"BDAT":
            parts = line.split()
            size = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self._bdat_skip = size
            self._queue.append(_Pending("other", synthetic=b"502 5.5.1 BDAT is not available through the mail gateway; use DATA\r\n"))
        elif verb == b"BURL":
            self._queue.append(_Pending("other", synthetic=b"502 5.5.1 BURL is not available through the mail gateway\r\n"))
        elif verb == b"STARTTLS":
            self._forward(line, _Pending("starttls"), out)
        elif verb == b"AUTH":
            self._forward(line, _Pending("auth"), out)
        elif verb in (b"RSET", b"HELO"):
            self.mail_from, self.rcpts = "", []
            self._forward(line, _Pending("other"), out)
        else:
            self._forward(line, _Pending("other"), out)

    def _forward(self, line: bytes, pending: _Pending, out: Output) -> None:
        self._queue.append(pending)
        out.to_server += line

    def _read_data(self, out: Output) -> bool:
        """Collect message lines up to the end-of-data dot. True when the message ended."""
        while True:
            line = self._client.line()
            if line is None:
                return False
            if line in (b".\r\n", b".\n"):
                break
            if len(self._data) + len(line) > self.max_message_bytes:
                self._data_too_big = True
            if not self._data_too_big:
                self._data += line
        self._mode = "command"
        self._end_of_data(out)
        return True

    def _end_of_data(self, out: Output) -> None:
        if not self._data_gate_open:
            return  # DATA was already refused (no valid recipients); the client sent data anyway
        if self._data_too_big:
            self._refuse(b"552 5.3.4 message too big for the mail gateway\r\n", out)
            return
        stuffed = bytes(self._data)
        raw = dot_unstuff(stuffed)
        context = MailContext("outbound", self.device, self.mail_from or None, tuple(self.rcpts))
        judgement = self.judge(raw, context)
        out.events.append({"kind": "message", "action": judgement.action, "mail_from": self.mail_from,
                           "rcpt_to": list(self.rcpts), "size": len(raw), "reason": judgement.reason})
        if judgement.data is None:
            reason = judgement.reason or "message refused by the mail gateway"
            self._refuse(reply_text(b"554", b"5.7.1", reason), out)
            return
        self._payload = stuffed if judgement.data == raw else dot_stuff(judgement.data)
        self._hold_client = True
        self._forward(b"DATA\r\n", _Pending("internal-data"), out)

    def _refuse(self, reply: bytes, out: Output) -> None:
        self._queue.append(_Pending("data-end", synthetic=reply))
        # The server holds an envelope (MAIL/RCPT accepted): clear it, swallow the answer.
        self._forward(b"RSET\r\n", _Pending("internal-rset"), out)
        self.mail_from, self.rcpts = "", []

    # -- server side ---------------------------------------------------------------------
    def from_server(self, data: bytes) -> Output:
        out = Output()
        if self._mode == "opaque":
            out.to_client += data
            out.opaque = True
            return out
        self._server.feed(data)
        try:
            while self._mode != "opaque":
                line = self._server.line()
                if line is None:
                    break
                m = _REPLY_LINE.match(line.rstrip(b"\r\n"))
                self._reply_lines.append(line)
                if m and m.group(2) == b"-":
                    continue
                reply, self._reply_lines = self._reply_lines, []
                self._reply(reply, out)
                self._drain(out)
                if not self._hold_client:
                    self._process_client(out)
            if self._mode == "opaque":
                out.to_client += self._server.take_all()
        except LineTooLong as exc:
            out.close = f"SMTP server: {exc}"
        self._drain(out)
        return out

    def _reply(self, lines: list[bytes], out: Output) -> None:
        code = lines[-1][:3]
        pending = self._queue.popleft() if self._queue and self._queue[0].synthetic is None \
            and self._queue[0].kind != "data-gate" else None
        if pending is None:
            out.to_client += b"".join(lines)  # unsolicited (e.g. 421 shutting down)
            return
        kind = pending.kind
        if kind == "ehlo":
            out.to_client += filter_ehlo(lines)
        elif kind == "rcpt":
            if code.startswith(b"2"):
                self.rcpts.append(pending.address)
            out.to_client += b"".join(lines)
        elif kind == "internal-data":
            if code.startswith(b"3") and self._payload is not None:
                out.to_server += self._payload + b".\r\n"
                self._payload = None
                self._queue.appendleft(_Pending("data-end"))
            else:
                out.to_client += b"".join(lines)   # the client's answer to its end-of-data
                self._message_done()
        elif kind == "data-end":
            out.to_client += b"".join(lines)
            self._message_done()
        elif kind == "internal-rset":
            pass
        elif kind == "starttls":
            out.to_client += b"".join(lines)
            if code == b"220":
                self._mode = "opaque"
                out.opaque = True
                out.to_server += self._client.take_all()
        elif kind == "auth":
            out.to_client += b"".join(lines)
            self._sasl_line = code == b"334"
        else:
            out.to_client += b"".join(lines)

    def _message_done(self) -> None:
        self._hold_client = False
        self.mail_from, self.rcpts = "", []

    def _drain(self, out: Output) -> None:
        """Send the answers the adapter gives itself once everything before them is answered."""
        while self._queue:
            head = self._queue[0]
            if head.kind == "data-gate":
                self._queue.popleft()
                if self.rcpts:
                    out.to_client += b"354 Start mail input; end with <CRLF>.<CRLF>\r\n"
                else:
                    self._data_gate_open = False
                    out.to_client += b"554 5.5.1 No valid recipients\r\n"
                continue
            if head.synthetic is None:
                return
            self._queue.popleft()
            out.to_client += head.synthetic
            if head.kind == "data-end":
                self._message_done()


def filter_ehlo(lines: list[bytes]) -> bytes:
    """An EHLO reply without the extensions a gateway that reads whole messages cannot allow."""
    kept = [lines[0]] + [ln for ln in lines[1:] if _keyword(ln) not in STRIPPED_EXTENSIONS]
    out = []
    for i, ln in enumerate(kept):
        sep = b" " if i == len(kept) - 1 else b"-"
        out.append(ln[:3] + sep + ln[4:] if ln[3:4] in (b" ", b"-") else ln)
    return b"".join(out)


def _keyword(line: bytes) -> str:
    words = line[4:].split(None, 1)
    return words[0].decode("ascii", "replace").upper() if words else ""


def _one_line(text: str) -> bytes:
    return " ".join(text.split()).encode("ascii", "replace")[:400]


# Bytes of reply text per line: RFC 5321 4.5.3.1.5 allows 512 octets with the code and CRLF.
_REPLY_TEXT_BYTES = 400


def reply_text(code: bytes, enhanced: bytes, reason: str) -> bytes:
    """A (multi-line) reply, one or more lines per line of ``reason`` (the bilingual
    explanation of a refused message: Japanese, then English), long lines wrapped to fit an
    SMTP reply line (nothing of the explanation is cut off).

    Non-ASCII text is sent as UTF-8. RFC 5321 reply text is ASCII; RFC 6531 (SMTPUTF8) lets
    a server send UTF-8 in replies, and the mail clients in use show the reply text to the
    sender as UTF-8. A reply is never parsed for its text, so a client that does not decode
    it still gets the code and the English line, which is ASCII."""
    lines: list[bytes] = []
    for text in reason.splitlines():
        text = " ".join("".join(ch if ch.isprintable() else "?" for ch in text).split())
        lines += _wrap_utf8(text)
    lines = lines or [b"refused"]
    out = bytearray()
    for i, line in enumerate(lines):
        sep = b" " if i == len(lines) - 1 else b"-"
        out += code + sep + enhanced + b" " + line + b"\r\n"
    return bytes(out)


def _wrap_utf8(text: str) -> list[bytes]:
    """``text`` as UTF-8 lines of at most _REPLY_TEXT_BYTES, broken after a blank or a
    Japanese full stop when one is near, else between two characters."""
    out: list[bytes] = []
    while text:
        data = text.encode("utf-8", "replace")
        if len(data) <= _REPLY_TEXT_BYTES:
            out.append(data)
            break
        head = data[:_REPLY_TEXT_BYTES].decode("utf-8", "ignore")
        cut = max(head.rfind(" "), head.rfind("。"), head.rfind(";"))
        if cut < len(head) // 2:
            cut = len(head) - 1
        out.append(head[:cut + 1].rstrip().encode("utf-8"))
        text = text[cut + 1:].lstrip()
    return out
