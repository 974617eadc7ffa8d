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
import struct
from dataclasses import dataclass

from gateway.mail.scanner import ScannerUnavailable, ScanResult

_CHUNK = 64 * 1024
_MAX_REPLY = 64 * 1024


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

    def _command(self, command: bytes, payload: bytes | None = None) -> str:
        sock = self._connect()
        try:
            with sock:
                try:
                    sock.sendall(b"z" + command + b"\0")
                    if payload is not None:
                        view = memoryview(payload)
                        for start in range(0, len(view), _CHUNK):
                            chunk = view[start:start + _CHUNK]
                            sock.sendall(struct.pack("!I", len(chunk)) + chunk)
                        sock.sendall(struct.pack("!I", 0))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # clamd closes early on a size limit; its reason is in the reply
                reply = bytearray()
                while not reply.endswith(b"\0") and len(reply) < _MAX_REPLY:
                    data = sock.recv(4096)
                    if not data:
                        break
                    reply += data
        except OSError as exc:
            raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None
        text = reply.rstrip(b"\0").decode("utf-8", "replace").strip()
        if not text:
            raise ScannerUnavailable(f"clamd at {self.address} closed the connection without a reply")
        return text

    def ping(self) -> bool:
        try:
            return self._command(b"PING") == "PONG"
        except ScannerUnavailable:
            return False

    def scan(self, data: bytes) -> ScanResult:
        reply = self._command(b"INSTREAM", data)
        _, _, status = reply.partition(": ") if reply.startswith("stream:") else ("", "", reply)
        if status == "OK":
            return ScanResult(infected=False)
        if status.endswith(" FOUND"):
            return ScanResult(infected=True, signature=status[: -len(" FOUND")])
        raise ScannerUnavailable(f"clamd at {self.address} answered: {reply}")
