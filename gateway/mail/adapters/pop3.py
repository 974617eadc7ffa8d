"""POP3 adapter (RFC 1939, CAPA/pipelining RFC 2449), device = client.

* RETR: the multi-line answer is held until its terminating dot, judged, and the bytes
  ``judge`` returns (the message, a rewrite, or a notice standing in for a quarantined one)
  are sent dot-stuffed with a corrected "+OK <n> octets" line.
* TOP msg n: sent to the server as RETR msg, so the whole message is judged; the device gets
  the header and the first n body lines *of the judged version*. A neutralized message thus
  looks the same whether a client previews it with TOP or downloads it with RETR. The price
  is that a preview transfers the whole message from the server to the gateway.
* STLS is never removed from CAPA; if the server accepts it the adapter reports ``opaque``.
* Commands may be pipelined; answers are matched to commands in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gateway.mail.adapters import ByteQueue, Judge, LineTooLong, Output, dot_stuff, dot_unstuff
from gateway.mail.engine import MailContext

_MULTI_ALWAYS = {b"CAPA"}
_MULTI_WITHOUT_ARG = {b"LIST", b"UIDL", b"AUTH"}


@dataclass
class _Pending:
    kind: str              # single multi retr top auth stls
    top_lines: int = 0
    number: str = ""


class Pop3Adapter:
    def __init__(self, judge: Judge, *, device: str | None = None, max_message_bytes: int = 50 * 1024 * 1024):
        self.judge = judge
        self.device = device
        self.max_message_bytes = max_message_bytes
        self._client = ByteQueue()
        self._server = ByteQueue()
        self._queue: deque[_Pending] = deque([_Pending("single")])   # the greeting
        self._sasl_line = False
        self._opaque = False
        self._in_multi: _Pending | None = None   # reading a multi-line answer for this command
        self._first_line = b""
        self._held = bytearray()
        self._too_big = False

    def from_client(self, data: bytes) -> Output:
        out = Output()
        if self._opaque:
            out.to_server += data
            out.opaque = True
            return out
        self._client.feed(data)
        try:
            while (line := self._client.line()) is not None:
                self._command(line, out)
        except LineTooLong as exc:
            out.close = f"POP3 client: {exc}"
        return out

    def _command(self, line: bytes, out: Output) -> None:
        if self._sasl_line:
            self._sasl_line = False
            self._queue.append(_Pending("auth"))
            out.to_server += line
            return
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"RETR":
            self._queue.append(_Pending("retr", number=_word(words, 1)))
            out.to_server += line
        elif verb == b"TOP" and len(words) >= 3 and words[2].isdigit():
            self._queue.append(_Pending("top", int(words[2]), _word(words, 1)))
            out.to_server += b"RETR " + words[1] + b"\r\n"
        elif verb == b"STLS":
            self._queue.append(_Pending("stls"))
            out.to_server += line
        elif verb == b"AUTH" and len(words) >= 2:
            self._queue.append(_Pending("auth"))
            out.to_server += line
        elif verb in _MULTI_ALWAYS or (verb in _MULTI_WITHOUT_ARG and len(words) == 1):
            self._queue.append(_Pending("multi"))
            out.to_server += line
        else:
            self._queue.append(_Pending("single"))
            out.to_server += line

    def from_server(self, data: bytes) -> Output:
        out = Output()
        if self._opaque:
            out.to_client += data
            out.opaque = True
            return out
        self._server.feed(data)
        try:
            while not self._opaque and (line := self._server.line()) is not None:
                self._answer_line(line, out)
            if self._opaque:
                out.to_client += self._server.take_all()
        except LineTooLong as exc:
            out.close = f"POP3 server: {exc}"
        return out

    def _answer_line(self, line: bytes, out: Output) -> None:
        if self._in_multi is not None:
            pending = self._in_multi
            if line in (b".\r\n", b".\n"):
                self._in_multi = None
                if pending.kind in ("retr", "top"):
                    self._release(pending, out)
                else:
                    out.to_client += line
                return
            if pending.kind in ("retr", "top"):
                if len(self._held) + len(line) > self.max_message_bytes:
                    self._too_big = True
                if not self._too_big:
                    self._held += line
            else:
                out.to_client += line
            return
        pending = self._queue.popleft() if self._queue else _Pending("single")
        ok = line.startswith(b"+OK")
        if pending.kind in ("retr", "top", "multi") and ok:
            self._in_multi = pending
            self._first_line = line
            self._held = bytearray()
            self._too_big = False
            if pending.kind == "multi":
                out.to_client += line
            return
        out.to_client += line
        if pending.kind == "stls" and ok:
            self._opaque = True
            out.opaque = True
        elif pending.kind == "auth" and line.startswith(b"+ "):
            self._sasl_line = True

    def _release(self, pending: _Pending, out: Output) -> None:
        if self._too_big:
            # Cannot be judged whole: fail closed with an error the client shows.
            out.to_client += b"-ERR [SYS/PERM] message too big for the mail gateway's filter\r\n"
            out.events.append({"kind": "message", "action": "refused", "reason": "too big", "number": pending.number})
            return
        raw = dot_unstuff(bytes(self._held))
        judgement = self.judge(raw, MailContext("inbound", self.device))
        out.events.append({"kind": "message", "action": judgement.action, "size": len(raw),
                           "number": pending.number, "reason": judgement.reason})
        served = judgement.data if judgement.data is not None else b""
        if pending.kind == "top":
            served = top_of(served, pending.top_lines)
        if served == raw:
            body = bytes(self._held)
            first = self._first_line
        else:
            body = dot_stuff(served)
            first = b"+OK %d octets\r\n" % len(served)
        if pending.kind == "top":
            first = b"+OK top of message follows\r\n"
        out.to_client += first + body + b".\r\n"


def top_of(message: bytes, lines: int) -> bytes:
    """RFC 1939 TOP: the header, the blank line, and the first ``lines`` body lines."""
    sep = message.find(b"\r\n\r\n")
    width = 4
    if sep < 0 or (0 <= message.find(b"\n\n") < sep):
        sep, width = message.find(b"\n\n"), 2
    if sep < 0:
        return message
    head, body = message[:sep + width], message[sep + width:]
    kept = body.splitlines(keepends=True)[:lines]
    return head + b"".join(kept)


def _word(words: list[bytes], i: int) -> str:
    return words[i].decode("ascii", "replace") if len(words) > i else ""
