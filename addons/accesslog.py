"""Action -> log. One record per HTTP request (`proxy`), raw TCP flow and refused
connection (`conn`), and DNS query (`dns`), with Elastic Common Schema field names
(documented in gateway/logstore/FIELDS.md).

A record is written in the `response` hook, before the response is sent, so every completed
request has its record. If the write fails and `on_log_failure` is "block" (the default),
the exception propagates: the fail-closed guard then blocks the request instead of serving
it unlogged.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from mitmproxy import connection, dns, http, tcp

from addons.enforce import METADATA_REQUEST_ID
from addons.hostrules import METADATA_VERDICT
from addons.identity import METADATA_DEVICE
from gateway.logstore import verdict_fields
from gateway.registry import DeviceRecord
from gateway.verdict import RULE_UNKNOWN_DEVICE, Verdict

log = logging.getLogger("kanmon.accesslog")


class RecordSink(Protocol):
    def append(self, stream: str, record: dict[str, Any]) -> None: ...


def _device_fields(device: DeviceRecord | None, client: connection.Client) -> dict[str, Any]:
    out: dict[str, Any] = {"source.ip": client.peername[0], "source.port": client.peername[1]}
    if device is not None:
        out["device.id"] = device.device_id
        out["user.name"] = device.owner or None
        out["device.groups"] = sorted(device.groups)
        out["device.ownership"] = str(device.ownership)
    else:
        out["device.id"] = None
    return out


def _verdict_fields(verdict: Verdict | None) -> dict[str, Any]:
    if verdict is None:  # cannot happen after the enforcer; logged as such if it does
        return {"kanmon.verdict": "undecided", "rule.id": None}
    return verdict_fields(verdict)


class AccessLog:
    name = "kanmon-accesslog"

    def __init__(self, sink: RecordSink, redact_url=lambda url: url, on_log_failure: str = "block"):
        self.sink = sink
        self.redact_url = redact_url
        self.on_log_failure = on_log_failure

    def _write(self, stream: str, record: dict[str, Any]) -> None:
        try:
            self.sink.append(stream, record)
        except Exception:
            if self.on_log_failure == "block":
                raise
            log.exception("log write failed (configured to continue)")

    def _http_record(self, flow: http.HTTPFlow) -> dict[str, Any]:
        rec = _device_fields(flow.metadata.get(METADATA_DEVICE), flow.client_conn)
        rec.update(_verdict_fields(flow.metadata.get(METADATA_VERDICT)))
        server = flow.server_conn.address
        rec.update({
            "event.dataset": "kanmon.proxy",
            "url.full": self.redact_url(flow.request.pretty_url),
            "url.domain": flow.request.pretty_host,
            "url.scheme": flow.request.scheme,
            "http.request.method": flow.request.method,
            "destination.ip": str(server[0]) if server else None,
            "destination.port": server[1] if server else None,
            "tls.client.server_name": flow.client_conn.sni,
            "kanmon.request_id": flow.metadata.get(METADATA_REQUEST_ID),
        })
        return rec

    def response(self, flow: http.HTTPFlow) -> None:
        rec = self._http_record(flow)
        rec["http.response.status_code"] = flow.response.status_code if flow.response else None
        self._write("proxy", rec)

    def error(self, flow: http.HTTPFlow) -> None:
        rec = self._http_record(flow)
        rec["error.message"] = flow.error.msg if flow.error else None
        self._write("proxy", rec)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        rec = _device_fields(flow.metadata.get(METADATA_DEVICE), flow.client_conn)
        rec.update(_verdict_fields(flow.metadata.get(METADATA_VERDICT)))
        server = flow.server_conn.address
        rec.update({
            "event.dataset": "kanmon.conn",
            "network.transport": "tcp",
            "destination.ip": str(server[0]) if server else None,
            "destination.port": server[1] if server else None,
            "tls.client.server_name": flow.client_conn.sni,
        })
        self._write("conn", rec)

    def dns_request(self, flow: dns.DNSFlow) -> None:
        # Runs after the enforcer: blocked queries already carry their (NXDOMAIN) response.
        q = flow.request.question
        rec = _device_fields(flow.metadata.get(METADATA_DEVICE), flow.client_conn)
        rec.update(_verdict_fields(flow.metadata.get(METADATA_VERDICT)))
        rec.update({
            "event.dataset": "kanmon.dns",
            "dns.question.name": q.name if q else None,
            "dns.question.type": dns.types.to_str(q.type) if q else None,
            "dns.response_code": dns.response_codes.to_str(flow.response.response_code) if flow.response else None,
        })
        self._write("dns", rec)

    def refused_client(self, client: connection.Client, reason: str) -> None:
        rec = _device_fields(None, client)
        rec.update({
            "event.dataset": "kanmon.conn",
            "kanmon.verdict": "block",
            "event.type": ["denied"],
            "event.reason": reason,
            "rule.id": RULE_UNKNOWN_DEVICE,
            "network.transport": client.transport_protocol,
        })
        self._write("conn", rec)
