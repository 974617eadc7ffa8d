"""clamd client: the I/O edge for virus scanning. Speaks clamd's INSTREAM command (see
clamd(8)) over a unix or TCP socket:

    client: "zINSTREAM\\0", then chunks <uint32 big-endian length><bytes>, then <0x00000000>
    clamd:  "stream: OK\\0" | "stream: <signature> FOUND\\0" | "<reason> ERROR\\0"

ClamAV parses the MIME structure of a mail itself (ScanMail, on by default), so the whole
message is streamed once. Every failure becomes ScannerUnavailable, which the engine turns
into the policy's scanner_unavailable action (fail-closed by default).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from gateway.mail.scanner import ScannerUnavailable, ScanResult
from gateway.mail.clamdproto import PING, ReplyReader, instream_frames, parse_scan_reply


@dataclass(frozen=True)
class ClamdScanner:
    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    timeout: float = 30.0

    @classmethod
    def unix(cls, path: str, timeout: float = 30.0) -> "ClamdScanner":
        return cls(socket_path=path, timeout=timeout)

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float = 30.0) -> "ClamdScanner":
        return cls(host=host, port=port, timeout=timeout)

    @property
    def address(self) -> str:
        return self.socket_path if self.socket_path else f"{self.host}:{self.port}"

    def _connect(self) -> socket.socket:
        try:
            if self.socket_path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
            elif self.host and self.port:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            else:
                raise ScannerUnavailable("clamd address not configured")
        except OSError as exc:
            raise ScannerUnavailable(f"cannot connect to clamd at {self.address}: {exc}") from None
        return sock

    def _command(self, frames) -> str:
        """One exchange; the framing and the reply parsing are gateway/mail/clamdproto.py."""
        sock = self._connect()
        try:
            with sock:
                try:
                    for frame in frames:
                        sock.sendall(frame)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # clamd closes early on a size limit; its reason is in the reply
                replies = ReplyReader()
                while replies.reply is None:
                    data = sock.recv(4096)
                    if not data:
                        return replies.closed()
                    replies.feed(data)
                return replies.reply
        except ScannerUnavailable as exc:
            raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None
        except OSError as exc:
            raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None

    def ping(self) -> bool:
        try:
            return self._command([PING]) == "PONG"
        except ScannerUnavailable:
            return False

    def scan(self, data: bytes) -> ScanResult:
        return parse_scan_reply(self._command(instream_frames(data)))
