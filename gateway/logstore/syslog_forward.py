"""Forwarding records to a SIEM as RFC 5424 syslog messages.

``format_rfc5424`` is pure. ``SyslogForwarder`` is the I/O edge: UDP (RFC 5426, one
message per datagram) is sent inline without blocking; TCP (RFC 6587 octet counting) goes
through a bounded queue drained by a background thread, so a slow or absent collector
never stalls the proxy -- messages that do not fit are dropped and counted in
``dropped``. Forward seal records and signed checkpoints too (``LogStore(on_checkpoint=...)``):
a chain head kept outside the gateway is what catches someone who rewrote a whole chain or
cut its end (see chain.py, anchor.py).

Hand-written: the stdlib ``logging.handlers.SysLogHandler`` emits RFC 3164-style
messages without the RFC 5424 header, and a SIEM forwarder library would be a heavy
dependency for a few lines of formatting.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from datetime import UTC, datetime

FACILITY_LOCAL0 = 16
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
SEVERITY_INFO = 6
_NILVALUE = "-"
_MAX_UDP = 65_000
_BOM = "\ufeff"


def _header_token(value: str, limit: int) -> str:
    # PRINTUSASCII (33..126) only, bounded length, "-" when empty (RFC 5424 section 6).
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or _NILVALUE


def severity_for(stream: str, line: str) -> int:
    """Blocks and audit changes are notices, failed/denied events warnings, else info."""
    if '"kanmon.verdict":"block"' in line or '"event.outcome":"failure"' in line:
        return SEVERITY_WARNING
    if stream == "audit" or '"event.action":"log-sealed"' in line or '"event.action":"log-checkpoint"' in line:
        return SEVERITY_NOTICE
    return SEVERITY_INFO


def format_rfc5424(stream: str, line: str, *, hostname: str, app_name: str = "kanmon",
                   procid: str | None = None, facility: int = FACILITY_LOCAL0,
                   severity: int | None = None, now: datetime | None = None) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM+JSON``; MSGID is the
    stream name, the message is the JSON record as written to the log file."""
    severity = severity_for(stream, line) if severity is None else severity
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    header = (f"<{facility * 8 + severity}>1 {stamp} {_header_token(hostname, 255)} "
              f"{_header_token(app_name, 48)} {_header_token(procid or str(os.getpid()), 128)} "
              f"{_header_token(stream, 32)} {_NILVALUE} ")
    return (header + _BOM + line).encode("utf-8")


class SyslogForwarder:
    """Callable as ``LogStore(on_record=SyslogForwarder(...))``."""

    def __init__(self, host: str, port: int = 514, *, transport: str = "udp",
                 hostname: str | None = None, facility: int = FACILITY_LOCAL0,
                 queue_size: int = 10_000, connect_timeout: float = 5.0):
        if transport not in ("udp", "tcp"):
            raise ValueError("transport must be 'udp' or 'tcp'")
        self.address = (host, port)
        self.transport = transport
        self.hostname = hostname or socket.gethostname()
        self.facility = facility
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self._connect_timeout = connect_timeout
        self._closed = threading.Event()
        if transport == "udp":
            family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
            self._udp = socket.socket(family, socket.SOCK_DGRAM)
            self._udp.setblocking(False)
        else:
            self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
            self._thread = threading.Thread(target=self._drain, name="kanmon-syslog", daemon=True)
            self._thread.start()

    def __call__(self, stream: str, line: str) -> None:
        message = format_rfc5424(stream, line, hostname=self.hostname, facility=self.facility)
        if self.transport == "udp":
            try:
                self._udp.sendto(message[:_MAX_UDP], self.address)
                self.sent += 1
            except OSError:
                self.errors += 1
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        conn: socket.socket | None = None
        while not self._closed.is_set():
            try:
                message = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            framed = f"{len(message)} ".encode("ascii") + message      # RFC 6587 octet counting
            for _attempt in range(2):
                try:
                    if conn is None:
                        conn = socket.create_connection(self.address, timeout=self._connect_timeout)
                    conn.sendall(framed)
                    self.sent += 1
                    break
                except OSError:
                    self.errors += 1
                    if conn is not None:
                        conn.close()
                    conn = None
            else:
                self.dropped += 1
            self._queue.task_done()
        if conn is not None:
            conn.close()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) until queued TCP messages were handed to the socket."""
        if self.transport == "tcp":
            deadline = threading.Event()
            waiter = threading.Thread(target=lambda: (self._queue.join(), deadline.set()), daemon=True)
            waiter.start()
            deadline.wait(timeout)

    def close(self) -> None:
        self._closed.set()
        if self.transport == "udp":
            self._udp.close()
        else:
            self._thread.join(timeout=2)
