"""Firewall log, I/O edge: read the table's NFLOG group and write aggregated `conn` records.

Why a netlink socket of our own rather than ulogd2 (Debian 2.0.8) writing JSON that we tail:
* one process fewer to install, configure, supervise and alert on -- and no file between the
  kernel and the tamper-evident store that someone could edit before the gateway reads it;
* the device id is resolved here, from the gateway's own device directory (and the last
  known record of revoked devices, which ulogd cannot know);
* aggregation (one record per device/destination/reason per interval) needs a program
  anyway: ulogd's JSON output writes one line per packet, so a flood would still hit the
  disk once before we could fold it;
* the protocol part is small and stable (nfnetlink_log since Linux 2.6.14), and pyroute2
  (already a dependency) has no nfnetlink_log family to reuse. The byte parsing is pure and
  unit-tested in gateway/net/firewalllog.py; this module only owns the socket and the thread.

Bounds: the kernel logs at most `steering.LOG_RATE_PER_SECOND` packets per drop rule
(`limit rate` on the log rules); the socket has a large receive buffer, and when the kernel
still cannot deliver (ENOBUFS) the loss is counted (`kanmon_firewall_log_errors_total{kind=
"overrun"}`), never blocking the data path; the aggregator keeps at most `max_keys` keys.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.net import firewalllog
from gateway.net.firewalllog import FirewallAggregator, FirewallLogError

log = logging.getLogger("kanmon.firewalllog")

RECEIVE_BUFFER = 4 * 1024 * 1024


class FirewallLogReaderError(Exception):
    pass


class FirewallLogReader:
    """Owns the NFLOG socket; ``start()`` binds (raises when the group cannot be bound) and
    runs the read loop in a daemon thread; ``stop()`` flushes what is pending."""

    def __init__(self, group: int, write: Callable[[dict[str, Any]], None],
                 device_of: Callable[[str], tuple[str | None, str | None, tuple[str, ...]] | None],
                 metrics=None, interval: float = 10.0):
        self.group = group
        self.write = write
        self.metrics = metrics
        self.aggregator = FirewallAggregator(device_of, interval=interval)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, firewalllog.NETLINK_NETFILTER)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)   # SO_RCVBUFFORCE (root)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((0, 0))
            sock.settimeout(5)
            for message in firewalllog.bind_messages(self.group):
                sock.send(message)
                while True:   # packets of the group may already arrive before the ack
                    reply = sock.recv(65536)
                    code = firewalllog.ack_error(reply)
                    if code is None:
                        continue
                    if code != 0:
                        raise FirewallLogReaderError(
                            f"cannot bind NFLOG group {self.group}: {errno.errorcode.get(-code, code)} "
                            "(another process bound it? kernel without nfnetlink_log?)")
                    break
            sock.settimeout(1.0)
            return sock
        except BaseException:
            sock.close()
            raise

    def start(self) -> FirewallLogReader:
        try:
            self._sock = self._bind()
        except OSError as exc:
            raise FirewallLogReaderError(f"cannot open the NFLOG socket for group {self.group}: {exc}") from None
        self._set_up(1)
        self._thread = threading.Thread(target=self._run, name="firewall-log", daemon=True)
        self._thread.start()
        log.info("firewall log: reading NFLOG group %d", self.group)
        return self

    def _set_up(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.firewall_log_up.set(value)

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.firewall_log_errors.labels(kind).inc()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.metrics is not None:
                self.metrics.firewall_log_heartbeat.set(time.time())
            try:
                datagram = self._sock.recv(262144)
            except TimeoutError:
                datagram = b""
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:   # the kernel dropped log messages: count, go on
                    self._count_error("overrun")
                    continue
                if self._stop.is_set():
                    break
                self._count_error("socket")
                log.exception("firewall log socket failed; re-binding")
                self._set_up(0)
                self._rebind()
                continue
            if datagram:
                self.feed(datagram, datetime.now(UTC), time.monotonic())
            if self.aggregator.due(time.monotonic()):
                self.flush()
        self.flush()

    def _rebind(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
        while not self._stop.is_set():
            try:
                self._sock = self._bind()
                self._set_up(1)
                return
            except (OSError, FirewallLogReaderError) as exc:
                log.error("firewall log: re-binding NFLOG group %d failed: %s", self.group, exc)
                self._stop.wait(5)

    def feed(self, datagram: bytes, now: datetime, monotonic: float) -> None:
        try:
            packets = list(firewalllog.parse_messages(datagram))
        except FirewallLogError as exc:
            self._count_error("parse")
            log.warning("firewall log: unreadable netlink message (%s); skipped", exc)
            return
        for packet in packets:
            self.aggregator.add(packet, now, monotonic)
            if self.metrics is not None:
                self.metrics.firewall_log_packets.labels(packet.reason.split(":", 1)[0]).inc()

    def flush(self) -> None:
        for record in self.aggregator.flush():
            try:
                self.write(record)
            except Exception:   # the store counts and alerts its own failures
                log.exception("firewall log: writing a record failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._set_up(0)
