"""Per-device resource limits in the data path (issue #14: one device cannot stall the rest).

* Connections: a device's TCP connection over its cap (`connections_per_device`) or its rate
  (`new_connections_per_second`, token bucket) is refused in `client_connected` -- mitmproxy
  then closes the socket before any layer, TLS handshake or upstream connection exists. Never
  queued. Placed right after the identity addon, so the device is known.
* DNS: each device's queries pass a token bucket (`dns_queries_per_second`). Over UDP the
  check runs in the datagram listener (gateway/proxy/dnslistener.py) before a datagram is queued or
  a stream made, and the excess is dropped (see there why); over TCP the query is answered
  REFUSED in `dns_request` (a TCP client would otherwise wait for its timeout).
* HTTP/1 headers: mitmproxy 12.2.3 reads a request head without bound (`# FIXME: protect
  against header size DoS` in proxy/layers/http/_http1.py), so `install_header_limits` puts
  subclasses of its HTTP/1 connection layers in its place that count while reading: a head
  over `request_header_bytes`, or with more than `request_header_count` fields, gets 431 and the
  connection is closed before any hook sees the request -- the upstream never receives it.
  A server's response head gets the same caps (502 to the device). HTTP/2 is bounded by h2
  itself (64 KiB decoded header list, at most 64 CONTINUATION frames). A TLS ClientHello,
  which mitmproxy also buffers until complete (up to 16 MiB), is cut at MAX_CLIENTHELLO_BYTES.

When a limit bites, `kanmon_device_limited_total{limit}` counts every bite, and one `conn`
log record (event.action `device-limited`) per device, limit and `log_interval_seconds` says
how many there were (gateway/limits.py: LimitReporter), so a flood cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from h11._receivebuffer import ReceiveBuffer
from mitmproxy import connection, dns
from mitmproxy.addons import next_layer
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestHeaders, ResponseHeaders, ResponseProtocolError

from addons.flowverdict import record_verdict
from gateway.proxy import dnslistener
from gateway.proxy.connections import LiveConnections
from gateway.i18n import Text
from gateway.net.limitsnft import KERNEL_LIMITS
from gateway.limits import (LIMIT_CLIENTHELLO, LIMIT_CONNECTION_RATE, LIMIT_CONNECTIONS, LIMIT_DNS_RATE,
                            LIMIT_HEADER_BYTES, LIMIT_HEADER_COUNT, LIMIT_NAMES, LIMIT_RESPONSE_HEADER,
                            MAX_CLIENTHELLO_BYTES, RULE_DEVICE_LIMIT, DeviceLimiter, LimitReporter, LimitSettings)
from gateway.metrics import GatewayMetrics
from gateway.registry.model import DeviceRecord
from gateway.verdict import Action, Stage, Verdict

log = logging.getLogger("kanmon.limits")

HEADER_TOO_LARGE = Text(
    "要求ヘッダーが大きすぎるため、関門 (Kanmon) がこの要求を拒否しました（上限 {bytes} バイト・{count} 項目）。",
    "The gateway (Kanmon) refused this request: its header is too large (limit {bytes} bytes, {count} fields).")
LIMITED_REASON = Text("端末ごとの上限 ({limit}) を超えました: {detail}",
                      "the device went over its per-device limit ({limit}): {detail}")


# -- HTTP/1 header caps (inside mitmproxy's HTTP/1 layers) ------------------------------------

@dataclass(frozen=True)
class HeaderLimits:
    max_bytes: int
    max_count: int
    # Called with the client connection, the limit's name and the size (bytes or fields).
    on_refused: Callable[[connection.Client, str, int], None] | None = None


_header_limits: HeaderLimits | None = None


def header_overrun(head_bytes: int, fields: int, limits: HeaderLimits) -> str | None:
    """Which header cap a complete head of `head_bytes` bytes and `fields` fields breaks."""
    if head_bytes > limits.max_bytes:
        return LIMIT_HEADER_BYTES
    if fields > limits.max_count:
        return LIMIT_HEADER_COUNT
    return None


def too_large_response(limits: HeaderLimits) -> bytes:
    body = (HEADER_TOO_LARGE.format(bytes=limits.max_bytes, count=limits.max_count).render("both") + "\n").encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\nX-Kanmon-Rule: " +
            RULE_DEVICE_LIMIT.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _capped_read_headers(conn, event, head_type: type, refuse):
    """Run mitmproxy's `read_headers` for one event, checking the head it parses (size and
    field count) before it is passed on, and the unparsed buffer when no head is complete yet:
    the cap bites while reading, so at most one read (64 KiB) past it is ever buffered."""
    limits = _header_limits
    parent_read = _PARENT_READ[head_type]
    if limits is None or not isinstance(event, events.DataReceived):
        yield from parent_read(conn, event)
        return
    before = len(conn.buf)
    inner = parent_read(conn, event)
    sent = None
    while True:
        try:
            command = inner.send(sent)
        except StopIteration:
            break
        if isinstance(command, ReceiveHttp) and isinstance(command.event, head_type):
            message = command.event.request if head_type is RequestHeaders else command.event.response
            head_bytes, fields = before - len(conn.buf), len(message.headers.fields)
            over = header_overrun(head_bytes, fields, limits)
            if over is not None:
                inner.close()
                yield from refuse(limits, over, head_bytes if over == LIMIT_HEADER_BYTES else fields)
                return
        sent = yield command
    if conn.state == conn.read_headers and len(conn.buf) > limits.max_bytes:
        yield from refuse(limits, LIMIT_HEADER_BYTES, len(conn.buf))


def _refused_state(conn, event):
    """A refused connection's state until it is closed: whatever still arrives is dropped."""
    conn.buf = ReceiveBuffer()
    yield from ()


class LimitedHttp1Server(_http1.Http1Server):
    """mitmproxy's HTTP/1 server side with the request header caps."""

    _refused = _refused_state

    def read_headers(self, event):
        return _capped_read_headers(self, event, RequestHeaders, self._refuse)

    def _refuse(self, limits: HeaderLimits, limit: str, size: int):
        yield commands.SendData(self.conn, too_large_response(limits))
        yield commands.CloseConnection(self.conn)
        self.state = self._refused
        self.buf = ReceiveBuffer()   # free what was read at once
        if limits.on_refused is not None:
            limits.on_refused(self.context.client, limit, size)


class LimitedHttp1Client(_http1.Http1Client):
    """mitmproxy's HTTP/1 client side (towards the server) with the same caps on the response head."""

    _refused = _refused_state

    def read_headers(self, event):
        return _capped_read_headers(self, event, ResponseHeaders, self._refuse)

    def _refuse(self, limits: HeaderLimits, limit: str, size: int):
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(ResponseProtocolError(
            self.stream_id, f"response header from the server too large ({limit}: {size})",
            ErrorCode.GENERIC_SERVER_ERROR))
        self.state = self._refused
        self.buf = ReceiveBuffer()
        if limits.on_refused is not None:
            limits.on_refused(self.context.client, LIMIT_RESPONSE_HEADER, size)


class LimitedClientTLSLayer(tls_layers.ClientTLSLayer):
    """mitmproxy's client-side TLS layer with a bound on the ClientHello it buffers."""

    def receive_handshake_data(self, data: bytes):
        limits = _header_limits
        if limits is not None and not self.client_hello_parsed:
            size = len(self.recv_buffer) + len(data)
            if size > MAX_CLIENTHELLO_BYTES:
                self.recv_buffer = bytearray()
                if limits.on_refused is not None:
                    limits.on_refused(self.context.client, LIMIT_CLIENTHELLO, size)
                return False, f"kanmon: ClientHello still incomplete after {size} bytes"
        return (yield from super().receive_handshake_data(data))


_PARENT_READ = {RequestHeaders: _http1.Http1Server.read_headers, ResponseHeaders: _http1.Http1Client.read_headers}


def install_header_limits(limits: HeaderLimits | None) -> None:
    """Make mitmproxy's HTTP layer use the capped HTTP/1 layers (None: back to mitmproxy's own).
    The HTTP layer looks the class names up in its module at each new connection."""
    global _header_limits
    _header_limits = limits
    http_layers.Http1Server = LimitedHttp1Server if limits is not None else _http1.Http1Server
    http_layers.Http1Client = LimitedHttp1Client if limits is not None else _http1.Http1Client
    # The transparent mode's TLS layer is made by the next_layer addon under this name.
    next_layer.ClientTLSLayer = LimitedClientTLSLayer if limits is not None else tls_layers.ClientTLSLayer


# -- the addon ------------------------------------------------------------------------------

class DeviceLimits:
    name = "kanmon-limits"

    def __init__(self, settings: LimitSettings, connections: LiveConnections, directory, metrics: GatewayMetrics,
                 sink: Any = None, clock: Callable[[], float] | None = None,
                 kernel_counters: Callable[[], dict[str, int]] | None = None):
        """``directory``: tunnel address -> device (addons.identity.DeviceDirectory), for DNS
        datagrams, which have no connection entry. ``sink``: the log store (``append``).
        ``kernel_counters``: reads the kernel backstop's counters (gateway/net/limitsnft.py; blocking,
        called off the event loop), added to the metric as ``kernel-*`` limits."""
        self.kernel_counters = kernel_counters
        self._kernel_seen: dict[str, int] = {}
        self.settings = settings
        self.connections = connections
        self.directory = directory
        self.metrics = metrics
        self.sink = sink
        kw = {"clock": clock} if clock is not None else {}
        self.limiter = DeviceLimiter(settings, **kw)
        self.reporter = LimitReporter(self._emit, settings.log_interval_seconds, **kw)
        self._bites = {limit: metrics.device_limited.labels(limit) for limit in LIMIT_NAMES}
        self._counted: dict[str, str] = {}   # client id -> device key of connections counted against a device
        self._devices: dict[str, DeviceRecord | None] = {}   # device key -> record, for the log record
        self._task: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def load(self, loader) -> None:
        install_header_limits(HeaderLimits(self.settings.request_header_bytes, self.settings.request_header_count,
                                           self.header_refused))
        dnslistener.set_admission(self.admit_dns)

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._housekeeping(), name="kanmon-limits")

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.reporter.flush(force=True)
        dnslistener.set_admission(None)
        install_header_limits(None)

    async def _housekeeping(self) -> None:
        interval = self.settings.log_interval_seconds
        while True:
            await asyncio.sleep(interval / 2)
            self.flush()
            if self.kernel_counters is not None:
                try:
                    self.count_kernel(await asyncio.to_thread(self.kernel_counters))
                except Exception:
                    log.exception("reading the kernel backstop's counters failed; will retry")

    def count_kernel(self, counters: dict[str, int]) -> None:
        """Add what the kernel backstop refused since the last read to the metric."""
        for name, packets in counters.items():
            seen = self._kernel_seen.get(name, 0)
            if packets > seen:
                self.metrics.device_limited.labels(KERNEL_LIMITS[name]).inc(packets - seen)
            self._kernel_seen[name] = packets   # a smaller value: the table was replaced

    def flush(self) -> None:
        self.reporter.flush()
        self.limiter.sweep()
        if len(self._devices) > 4 * len(self.limiter) + 1024:
            self._devices.clear()

    # -- connections ---------------------------------------------------------------------
    def _device_of(self, client: connection.Client) -> tuple[str, DeviceRecord | None]:
        state = self.connections.get(client.id)
        device = state.device if state is not None else None
        return (device.device_id if device is not None else client.peername[0]), device

    def client_connected(self, client: connection.Client) -> None:
        if client.error or client.transport_protocol != "tcp":
            return   # already refused (unknown device), or a DNS datagram stream (limited per query)
        key, device = self._device_of(client)
        limit = self.limiter.admit_connection(key)
        if limit is None:
            self._counted[client.id] = key
            return
        client.error = f"kanmon: the device went over its {limit} limit"
        self._bite(key, device, limit, {"source": client.peername, "destination": client.sockname,
                                        "transport": "tcp"})

    def client_disconnected(self, client: connection.Client) -> None:
        key = self._counted.pop(client.id, None)
        if key is not None:
            self.limiter.release_connection(key)

    def header_refused(self, client: connection.Client, limit: str, size: int) -> None:
        """From inside mitmproxy's HTTP/1 layer: never raise into it."""
        try:
            key, device = self._device_of(client)
            self._bite(key, device, limit, {"source": client.peername, "destination": client.sockname,
                                            "transport": "tcp", "protocol": "http", "size": size})
        except Exception:
            log.exception("counting a refused oversized header failed (the request was refused)")

    # -- DNS -----------------------------------------------------------------------------
    def admit_dns(self, ip: str) -> bool:
        """The DNS datagram listener's check (gateway/proxy/dnslistener.py), outside the addon guard:
        an error drops the datagram (fail closed) and is counted."""
        try:
            device = self.directory.by_ip(ip)
            key = device.device_id if device is not None else ip
            if self.limiter.admit_dns(key):
                return True
            self._bite(key, device, LIMIT_DNS_RATE, {"source": (ip, None), "transport": "udp", "protocol": "dns"})
        except Exception:
            self.metrics.addon_errors.labels(self.name, "admit_dns").inc()
            log.exception("DNS rate check failed: datagram dropped")
        return False

    def dns_request(self, flow: dns.DNSFlow) -> None:
        """DNS over TCP (UDP queries were checked in the listener)."""
        if flow.response is not None or flow.client_conn.transport_protocol != "tcp":
            return
        key, device = self._device_of(flow.client_conn)
        if self.limiter.admit_dns(key):
            return
        flow.response = flow.request.fail(dns.response_codes.REFUSED)
        record_verdict(flow, Verdict(Action.BLOCK, RULE_DEVICE_LIMIT, "per-device DNS rate", Stage.DNS), self.connections)
        self._bite(key, device, LIMIT_DNS_RATE, {"source": flow.client_conn.peername, "transport": "tcp",
                                                  "protocol": "dns"})

    # -- report --------------------------------------------------------------------------
    def _bite(self, key: str, device: DeviceRecord | None, limit: str, context: dict) -> None:
        self._bites[limit].inc()
        self._devices[key] = device
        self.reporter.hit(key, limit, context)

    def _limit_value(self, limit: str) -> float:
        s = self.settings
        return {LIMIT_CONNECTIONS: s.connections_per_device, LIMIT_CONNECTION_RATE: s.new_connections_per_second,
                LIMIT_DNS_RATE: s.dns_queries_per_second, LIMIT_HEADER_BYTES: s.request_header_bytes,
                LIMIT_HEADER_COUNT: s.request_header_count, LIMIT_RESPONSE_HEADER: s.request_header_bytes,
                LIMIT_CLIENTHELLO: MAX_CLIENTHELLO_BYTES}[limit]

    def _emit(self, key: str, limit: str, count: int, context: dict) -> None:
        device = self._devices.get(key)
        source = context.get("source") or (None, None)
        destination = context.get("destination") or (None, 53 if context.get("protocol") == "dns" else None)
        detail = f"{count} time(s) in {self.settings.log_interval_seconds:g} s" if count > 1 else "first time"
        reason = LIMITED_REASON.format(limit=limit, detail=detail)
        log.warning("device %s (%s) over its %s limit (%s): %s", key, source[0], limit, self._limit_value(limit), detail)
        if self.sink is None:
            return
        record = {
            "event.dataset": "kanmon.conn",
            "event.action": "device-limited",
            "event.type": ["denied"],
            "event.reason": f"{reason.ja} / {reason.en}",
            "kanmon.verdict": str(Action.BLOCK),
            "rule.id": RULE_DEVICE_LIMIT,
            "kanmon.limit.name": limit,
            "kanmon.limit.value": self._limit_value(limit),
            "kanmon.limit.count": count,
            "kanmon.limit.interval_s": self.settings.log_interval_seconds,
            "device.id": device.device_id if device is not None else None,
            "user.name": (device.owner or None) if device is not None else None,
            "source.ip": source[0],
            "source.port": source[1],
            "destination.ip": str(destination[0]) if destination[0] is not None else None,
            "destination.port": destination[1],
            "network.transport": context.get("transport"),
        }
        if context.get("protocol"):
            record["network.protocol"] = context["protocol"]
        if "size" in context:
            record["kanmon.limit.observed"] = context["size"]
        try:
            self.sink.append("conn", record)
        except Exception:
            # The limit has bitten already (nothing passed); the store counts its own failures.
            log.exception("could not write the device-limited record")
