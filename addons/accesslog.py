"""Action -> log, with Elastic Common Schema field names (gateway/logstore/FIELDS.md):

* `proxy`: one record per HTTP request, written in the `response` hook, before the response
  is sent, so every completed request has its record;
* `conn` (the firewall log, IPA 技術的対策 3.8.3 日時・送信元/送信先): a raw TCP flow's start
  (`connection-opened`/`connection-blocked`) and end (`connection-closed`, with the bytes
  each side sent); a TLS connection blocked at its SNI (`connection-blocked`); a no-inspect
  connection passed through untouched (`connection-opened`, then `connection-closed`); a
  client refused because its address belongs to no device;
* `dns`: one record per answered query, written when the answer is known (our block answer,
  or the upstream resolver's) so the record holds the response code and addresses.

If a write fails and `on_log_failure` is "block" (the default), the exception propagates:
the fail-closed guard then blocks the request, query or connection instead of serving it
unlogged.

When every append waits for the disk (`fsync: always`, `LogStore.writes_block`), a hook
returns the write as an awaitable run in a worker thread: mitmproxy awaits it, so the flow
still waits for its record (and a failed write still blocks it), but the event loop serves
other connections meanwhile. The live connection table is injected (addons/chain.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from mitmproxy import connection, dns, http, tcp, tls

from gateway.proxy.flowstate import METADATA_DEVICE, METADATA_REQUEST_ID, METADATA_VERDICT
from addons.requesttarget import request_target
from gateway.proxy.connections import LiveConnections
from gateway.logstore import verdict_fields
from gateway.registry.model import DeviceRecord
from gateway.verdict import RULE_UNKNOWN_DEVICE, Action, Verdict

log = logging.getLogger("kanmon.accesslog")


class RecordSink(Protocol):
    def append(self, stream: str, record: dict[str, Any]) -> None: ...


def _device_fields(device: DeviceRecord | None, client: connection.Client,
                   user_of: Callable[[DeviceRecord], str | None] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"source.ip": client.peername[0], "source.port": client.peername[1]}
    if device is not None:
        out["device.id"] = device.device_id
        # With user sign-in (issue #9) the signed-in user (None before sign-in); else the owner.
        out["user.name"] = user_of(device) if user_of is not None else (device.owner or None)
        out["device.groups"] = sorted(device.groups)
        out["device.ownership"] = str(device.ownership)
    else:
        # Required fields stay present (null) for an unknown device: FIELDS.md, REQUIRED_FIELDS.
        out["device.id"] = None
        out["user.name"] = None
    return out


def _address_fields(address: tuple | None) -> dict[str, Any]:
    return {"destination.ip": str(address[0]) if address else None,
            "destination.port": address[1] if address else None}


def _tcp_bytes(flow: tcp.TCPFlow) -> tuple[int, int]:
    """Bytes the client and the server sent on a raw TCP flow (sizes only, never content)."""
    sent = received = 0
    for message in flow.messages:
        if message.from_client:
            sent += len(message.content)
        else:
            received += len(message.content)
    return sent, received


def _body_size(message) -> int | None:
    """Bytes of a message body as on the wire (None when it was streamed, not buffered)."""
    raw = message.raw_content
    return len(raw) if raw is not None else None


def _verdict_fields(verdict: Verdict | None) -> dict[str, Any]:
    if verdict is None:  # cannot happen after the enforcer; logged as such if it does
        return {"kanmon.verdict": "undecided", "rule.id": None}
    return verdict_fields(verdict)


class AccessLog:
    name = "kanmon-accesslog"

    def __init__(self, sink: RecordSink, redact_url=lambda url: url, on_log_failure: str = "block", *,
                 connections: LiveConnections,
                 user_of: Callable[[DeviceRecord], str | None] | None = None):
        """``connections`` (the gateway's live connection table) lets the log see TLS-stage
        verdicts: SNI blocks and no-inspect connections get their `conn` record from it."""
        self.sink = sink
        self.redact_url = redact_url
        self.on_log_failure = on_log_failure
        self.connections = connections
        self.user_of = user_of
        self.off_loop = bool(getattr(sink, "writes_block", False))
        # A sink that answers on this event loop (the inspection workers' RemoteLogStore,
        # gateway/runtime/workers.py): awaited here, no thread per record.
        self._append_later = getattr(sink, "append_later", None)
        # No-inspect connections (no flow object exists for them) awaiting their end record.
        self._passed_through: dict[str, dict[str, Any]] = {}

    @contextmanager
    def _failure_policy(self) -> Iterator[None]:
        """A failed write raises (the flow is blocked) unless configured to continue."""
        try:
            yield
        except Exception:
            if self.on_log_failure == "block":
                raise
            log.exception("log write failed (configured to continue)")

    def _append(self, stream: str, record: dict[str, Any]) -> None:
        with self._failure_policy():
            self.sink.append(stream, record)

    def _write(self, stream: str, record: dict[str, Any]) -> Awaitable[None] | None:
        """Write now, or (blocking sink) return the write to await, run in a worker thread.
        A hook returns what this returns, so mitmproxy waits for the record either way."""
        if self._append_later is not None:
            return self._appended_later(stream, record)
        if self.off_loop:
            return asyncio.to_thread(self._append, stream, record)
        self._append(stream, record)
        return None

    async def _appended_later(self, stream: str, record: dict[str, Any]) -> None:
        with self._failure_policy():
            await self._append_later(stream, record)

    def _http_record(self, flow: http.HTTPFlow) -> dict[str, Any]:
        rec = _device_fields(flow.metadata.get(METADATA_DEVICE), flow.client_conn, self.user_of)
        rec.update(_verdict_fields(flow.metadata.get(METADATA_VERDICT)))
        server = flow.server_conn.address
        host, url = request_target(flow)
        rec.update({
            "event.dataset": "kanmon.proxy",
            "url.full": self.redact_url(url),
            "url.domain": host,
            "url.scheme": flow.request.scheme,
            "http.request.method": flow.request.method,
            "destination.ip": str(server[0]) if server else None,
            "destination.port": server[1] if server else None,
            "tls.client.server_name": flow.client_conn.sni,
            "kanmon.request_id": flow.metadata.get(METADATA_REQUEST_ID),
            # sizes only (issue #18: bytes sent per registered domain in the incident report)
            "http.request.body.bytes": _body_size(flow.request),
        })
        return rec

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        rec = self._http_record(flow)
        rec["http.response.status_code"] = flow.response.status_code if flow.response else None
        rec["http.response.body.bytes"] = _body_size(flow.response) if flow.response else None
        return self._write("proxy", rec)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        rec = self._http_record(flow)
        rec["error.message"] = flow.error.msg if flow.error else None
        return self._write("proxy", rec)

    def _tcp_record(self, flow: tcp.TCPFlow) -> dict[str, Any]:
        rec = _device_fields(flow.metadata.get(METADATA_DEVICE), flow.client_conn, self.user_of)
        verdict = flow.metadata.get(METADATA_VERDICT)
        rec.update(_verdict_fields(verdict))
        rec.update({
            "event.dataset": "kanmon.conn",
            "network.transport": "tcp",
            **_address_fields(flow.server_conn.address),
            "tls.client.server_name": flow.client_conn.sni,
        })
        if flow.client_conn.sni:
            rec["destination.domain"] = flow.client_conn.sni
        state = self.connections.get(flow.client_conn.id)
        if state is not None and state.protocol:
            # What the first bytes were identified as ("unidentified": neither TLS nor HTTP).
            rec["network.protocol"] = state.protocol
        return rec

    def tcp_start(self, flow: tcp.TCPFlow) -> Awaitable[None] | None:
        rec = self._tcp_record(flow)
        verdict = flow.metadata.get(METADATA_VERDICT)
        passes = isinstance(verdict, Verdict) and verdict.passes
        rec["event.action"] = "connection-opened" if passes else "connection-blocked"
        return self._write("conn", rec)

    def tcp_end(self, flow: tcp.TCPFlow) -> Awaitable[None] | None:
        rec = self._tcp_record(flow)
        sent, received = _tcp_bytes(flow)
        rec.update({"event.action": "connection-closed", "source.bytes": sent, "destination.bytes": received})
        if started := flow.client_conn.timestamp_start:
            # The hook runs as the flow ends, before mitmproxy stamps the connection's end.
            rec["event.duration"] = int((time.time() - started) * 1e9)
        if flow.error is not None:
            rec["error.message"] = flow.error.msg
        return self._write("conn", rec)

    tcp_error = tcp_end

    def tls_clienthello(self, data: tls.ClientHelloData) -> Awaitable[None] | None:
        """A TLS connection blocked at its SNI, or passed through uninspected: the proxy log
        will never see its requests, so the firewall log must."""
        client = data.context.client
        state = self.connections.get(client.id)
        verdict = state.tls_verdict if state is not None else None
        if not isinstance(verdict, Verdict):
            return
        no_inspect = data.ignore_connection or verdict.action == Action.NO_INSPECT
        if verdict.passes and not no_inspect:
            return      # intercepted: each request gets its proxy record
        rec = _device_fields(state.device, client, self.user_of)
        rec.update(_verdict_fields(verdict))
        sni = data.client_hello.sni
        rec.update({
            "event.dataset": "kanmon.conn",
            "event.action": "connection-opened" if verdict.passes else "connection-blocked",
            "network.transport": "tcp",
            "network.protocol": "tls",
            **_address_fields(data.context.server.address or client.sockname),
            "destination.domain": sni,
            "tls.client.server_name": sni,
        })
        if verdict.passes:
            self._passed_through[client.id] = rec
        return self._write("conn", rec)

    def client_disconnected(self, client: connection.Client) -> Awaitable[None] | None:
        rec = self._passed_through.pop(client.id, None)
        if rec is None:
            return
        rec = {**rec, "event.action": "connection-closed"}
        rec.pop("@timestamp", None)
        if client.timestamp_start:
            ended = client.timestamp_end or time.time()
            rec["event.duration"] = int((ended - client.timestamp_start) * 1e9)
        return self._write("conn", rec)

    def _dns_record(self, flow: dns.DNSFlow) -> dict[str, Any]:
        q = flow.request.question
        rec = _device_fields(flow.metadata.get(METADATA_DEVICE), flow.client_conn, self.user_of)
        rec.update(_verdict_fields(flow.metadata.get(METADATA_VERDICT)))
        rec.update({
            "event.dataset": "kanmon.dns",
            "dns.question.name": q.name if q else None,
            "dns.question.type": dns.types.to_str(q.type) if q else None,
        })
        if flow.server_conn.address:   # DNS mode resolves itself: usually no upstream address
            rec.update(_address_fields(flow.server_conn.address))
        return rec

    def dns_response(self, flow: dns.DNSFlow) -> Awaitable[None] | None:
        # Runs for our own answers (blocks, sinkhole) and the upstream resolver's alike.
        rec = self._dns_record(flow)
        response = flow.response
        if response is not None:
            rec["dns.response_code"] = dns.response_codes.to_str(response.response_code)
            resolved = []
            for answer in response.answers:
                if answer.type == dns.types.A:
                    resolved.append(str(answer.ipv4_address))
                elif answer.type == dns.types.AAAA:
                    resolved.append(str(answer.ipv6_address))
            rec["dns.resolved_ip"] = resolved
        return self._write("dns", rec)

    def dns_error(self, flow: dns.DNSFlow) -> Awaitable[None] | None:
        # The client gets SERVFAIL from mitmproxy after this hook.
        rec = self._dns_record(flow)
        rec["dns.response_code"] = "SERVFAIL"
        rec["error.message"] = flow.error.msg if flow.error else None
        return self._write("dns", rec)

    def refused_client(self, client: connection.Client, reason: str) -> None:
        rec = _device_fields(None, client, self.user_of)
        rec.update({
            "event.dataset": "kanmon.conn",
            "kanmon.verdict": "block",
            "event.type": ["denied"],
            "event.reason": reason,
            "rule.id": RULE_UNKNOWN_DEVICE,
            "event.action": "connection-blocked",
            "network.transport": client.transport_protocol,
            # Transparent mode: the client's socket name is the original destination.
            **_address_fields(client.sockname),
        })
        # Called from the identity addon's hook, which does not await: written here, on the
        # loop even with `fsync: always` (an address of no device: rare, and refused anyway).
        self._append("conn", rec)
