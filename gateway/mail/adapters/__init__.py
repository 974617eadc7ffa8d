"""Protocol adapters: pure state machines that sit in a mail connection (SMTP submission,
IMAP, POP3) between a device and a mail server.

Each adapter is fed the bytes one side sent, in whatever chunks TCP delivered them, and
answers with the bytes to send on to each side (``Output``). Whole messages are held until
complete and handed to the injected ``judge`` function; the adapter knows nothing of the
verdict engine, the quarantine store or sockets, so it can be tested with any chunking and
any judge. The mitmproxy addon (addons/mail.py) is the I/O edge that drives them.

Guidelines: IPA SME sample 7.3 (virus check at the mail gateway, HTML as text, no private
mail) and 7.4 (targeted-attack mail) apply to every message a device sends or receives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.mail.engine import MailContext


@dataclass(frozen=True)
class Judgement:
    """What to do with one held message.

    ``data`` is what to hand on: the very same bytes (deliver), a rewrite (tag/neutralize)
    or, for a device that fetches mail, a notice standing in for a quarantined/rejected
    message. ``data=None`` refuses the message (SMTP: a 5xx reply with ``reason``).
    """

    action: str
    data: bytes | None
    reason: str = ""


Judge = Callable[[bytes, MailContext], Judgement]


@dataclass
class Output:
    """Bytes to send on, per direction, after one chunk was fed in.

    ``opaque``: the connection switched to TLS inside the stream (STARTTLS/STLS accepted),
    so nothing after this point can be inspected; ``close``: a protocol error that must end
    the connection (fail closed), with the reason."""

    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    opaque: bool = False
    close: str | None = None
    events: list[dict] = field(default_factory=list)   # one per judged message / refused recipient

    def merge(self, other: "Output") -> None:
        self.to_server += other.to_server
        self.to_client += other.to_client
        self.opaque = self.opaque or other.opaque
        self.close = self.close or other.close
        self.events += other.events


class ByteQueue:
    """Bytes received but not yet parsed, with line and fixed-length reads.

    Hand-written rather than a library: asyncio.StreamReader needs an event loop and a
    transport, and the adapters must stay pure and synchronous."""

    def __init__(self, max_line: int = 64 * 1024):
        self._buf = bytearray()
        self._max_line = max_line

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def line(self) -> bytes | None:
        """One line including its LF (CRLF on the wire), or None when none is complete.
        Raises LineTooLong when more than max_line bytes hold no line end."""
        pos = self._buf.find(b"\n")
        if pos < 0:
            if len(self._buf) > self._max_line:
                raise LineTooLong(f"line longer than {self._max_line} bytes")
            return None
        out = bytes(self._buf[:pos + 1])
        del self._buf[:pos + 1]
        return out

    def take(self, n: int) -> bytes:
        """Up to n bytes (fewer when fewer are buffered)."""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def take_all(self) -> bytes:
        return self.take(len(self._buf))


class LineTooLong(Exception):
    pass


def dot_unstuff(lines: bytes) -> bytes:
    """SMTP/POP3 transparency (RFC 5321 4.5.2, RFC 1939 3): a leading '.' was doubled."""
    out = bytearray()
    for line in _wire_lines(lines):
        out += line[1:] if line.startswith(b".") else line
    return bytes(out)


def _wire_lines(data: bytes) -> list[bytes]:
    """Split after each LF only (a bare CR inside a line is content, not a line end)."""
    lines: list[bytes] = []
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        lines.append(data[start:end])
        start = end
    return lines


def dot_stuff(message: bytes) -> bytes:
    """The message as it goes on the wire before the terminating '.': CRLF line ends, every
    line starting with '.' doubled, always ending in CRLF."""
    out = bytearray()
    for line in message.splitlines():
        if line.startswith(b"."):
            out += b"."
        out += line + b"\r\n"
    return bytes(out)
