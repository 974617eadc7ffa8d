"""clamd's INSTREAM protocol without I/O (bytes in, bytes out), shared by the mail filter's
blocking client (gateway/mail/clamd.py) and the download scanner's asyncio client
(gateway/scan/clamdclient.py). See clamd(8):

    client: "zINSTREAM\\0", then chunks <uint32 big-endian length><bytes>, then <0x00000000>
    clamd:  "stream: OK\\0" | "stream: <signature> FOUND\\0" | "<reason> ERROR\\0"

ClamAV scans what it is given as it scans a file: archives are unpacked and mail is parsed
inside clamd, with clamd's own limits (StreamMaxLength, MaxScanSize, MaxRecursion, ...); an
archive beyond them is reported by clamd (an ERROR reply or, with AlertExceedsMax, a
``Heuristics.Limits.Exceeded`` signature), never silently passed here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from gateway.mail.scanner import ScannerUnavailable, ScanResult

CHUNK = 64 * 1024
MAX_REPLY = 64 * 1024
INSTREAM = b"zINSTREAM\0"
PING = b"zPING\0"
END = struct.pack("!I", 0)
# clamd's answer when the stream is longer than its StreamMaxLength.
SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"


class ClamdSizeLimit(ScannerUnavailable):
    """clamd refused the stream: longer than its StreamMaxLength."""


def instream_frames(data: bytes | bytearray | memoryview, chunk: int = CHUNK) -> Iterator[bytes | memoryview]:
    """Everything the client sends for one INSTREAM scan of ``data``, frame by frame."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    yield INSTREAM
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        part = view[start:start + chunk]
        yield struct.pack("!I", len(part))
        yield part
    yield END


class ReplyReader:
    """Collects clamd's NUL-terminated reply from whatever pieces the socket gives."""

    def __init__(self, limit: int = MAX_REPLY):
        self._buf = bytearray()
        self._limit = limit
        self.reply: str | None = None

    def feed(self, data: bytes) -> str | None:
        """Add received bytes; the reply text once its terminating NUL has arrived."""
        if self.reply is not None:
            return self.reply
        self._buf += data
        end = self._buf.find(b"\0")
        if end >= 0:
            self.reply = self._buf[:end].decode("utf-8", "replace").strip()
        elif len(self._buf) > self._limit:
            raise ScannerUnavailable(f"clamd reply longer than {self._limit} bytes")
        return self.reply

    def closed(self) -> str:
        """The peer closed the connection: the reply, even without its NUL, or an error."""
        if self.reply is None:
            text = self._buf.decode("utf-8", "replace").strip()
            if not text:
                raise ScannerUnavailable("clamd closed the connection without a reply")
            self.reply = text
        return self.reply


def parse_scan_reply(reply: str) -> ScanResult:
    """clamd's answer to INSTREAM as a result; anything but OK / FOUND raises."""
    status = reply.partition(": ")[2] if reply.startswith("stream:") else reply
    if status == "OK":
        return ScanResult(infected=False)
    if status.endswith(" FOUND") and len(status) > len(" FOUND"):
        return ScanResult(infected=True, signature=status[: -len(" FOUND")])
    if status.startswith(SIZE_LIMIT_REPLY):
        raise ClamdSizeLimit(f"clamd: {status}")
    raise ScannerUnavailable(f"clamd answered: {reply!r}")
