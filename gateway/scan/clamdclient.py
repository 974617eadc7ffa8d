"""The asyncio edge of the clamd client (the protocol is gateway/mail/clamdproto.py): scans
from the proxy's event loop without blocking it. At most ``max_concurrent`` scans run at
once (each holds a buffered download); the others wait for a slot within the same deadline.
Every failure — no socket, refused, timeout, protocol error — is ScannerUnavailable."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.mail.scanner import ScannerUnavailable, ScanResult
from gateway.mail.clamdproto import PING, ReplyReader, instream_frames, parse_scan_reply


@dataclass
class AsyncClamd:
    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    timeout: float = 30.0
    max_concurrent: int = 8
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return self.socket_path if self.socket_path else f"{self.host}:{self.port}"

    async def _open(self):
        if self.socket_path:
            return await asyncio.open_unix_connection(self.socket_path)
        if self.host and self.port:
            return await asyncio.open_connection(self.host, self.port)
        raise ScannerUnavailable("clamd address not configured")

    async def _exchange(self, frames) -> str:
        reader, writer = await self._open()
        try:
            try:
                for frame in frames:
                    writer.write(frame)
                    await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass   # clamd closes early on its size limit; the reason is in its reply
            replies = ReplyReader()
            while replies.reply is None:
                data = await reader.read(4096)
                if not data:
                    return replies.closed()
                replies.feed(data)
            return replies.reply
        finally:
            writer.close()

    async def _run(self, frames) -> str:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    return await self._exchange(frames)
        except TimeoutError:
            raise ScannerUnavailable(f"clamd at {self.address} did not answer within {self.timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            # asyncio drops a reply that came before the write failed; clamd closes early when the
            # stream is longer than its StreamMaxLength (keep that >= scan.max_bytes)
            raise ScannerUnavailable(f"clamd at {self.address} closed the stream ({exc}); "
                                     "is its StreamMaxLength below scan.max_bytes?") from None
        except OSError as exc:
            raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None

    async def scan(self, data: bytes) -> ScanResult:
        return parse_scan_reply(await self._run(instream_frames(data)))

    async def ping(self) -> bool:
        try:
            return await self._run([PING]) == "PONG"
        except ScannerUnavailable:
            return False
