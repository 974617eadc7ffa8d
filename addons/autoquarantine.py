"""Automatic quarantine's eyes on the data path (issue #18): every block verdict that carries a
category (a policy rule's ``category:``) is reported to the trigger engine with the device and
the destination — at DNS, at the TLS ClientHello, per HTTP request, per raw TCP flow — once per
query, connection or request. Runs after the enforcer, so it sees the verdict that stood. It
only reports (gateway/autoquarantine/service.py decides and acts off the event loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mitmproxy import dns, http, tcp, tls

from addons.requesttarget import request_target
from gateway.proxy.connections import LiveConnections
from gateway.proxy.flowstate import METADATA_DEVICE, METADATA_VERDICT
from gateway.verdict import Stage, Verdict


class BlockObserver:
    name = "kanmon-autoquarantine"

    def __init__(self, connections: LiveConnections, report: Callable[[Any, str | None, str, dict], Any],
                 user_of: Callable[[Any], str | None] | None = None):
        self.connections = connections
        self.report = report          # AutoQuarantiner.blocked(device, user, category, evidence)
        self.user_of = user_of

    def _see(self, device, verdict: Any, destination: str | None, stage: str) -> None:
        if device is None or not isinstance(verdict, Verdict) or verdict.passes or not verdict.category:
            return
        user = self.user_of(device) if self.user_of is not None else (device.owner or None)
        self.report(device, user, verdict.category, {"destination": destination, "rule.id": verdict.rule_id,
                                                     "kanmon.stage": stage})

    def _device(self, flow) -> Any:
        device = flow.metadata.get(METADATA_DEVICE)
        if device is None:
            state = self.connections.get(flow.client_conn.id)
            device = state.device if state is not None else None
        return device

    def dns_request(self, flow: dns.DNSFlow) -> None:
        q = flow.request.question
        self._see(self._device(flow), flow.metadata.get(METADATA_VERDICT), q.name if q else None, "dns")

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        state = self.connections.get(data.context.client.id)
        if state is None or state.reported_block is not None:
            return
        verdict = state.tls_verdict
        if isinstance(verdict, Verdict) and not verdict.passes:
            state.reported_block = verdict
            self._see(state.device, verdict, data.client_hello.sni, "tls")

    def _connection_counted(self, flow, verdict: Any) -> bool:
        """The connection's block was reported at its ClientHello already."""
        state = self.connections.get(flow.client_conn.id)
        return state is not None and state.reported_block is verdict

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        verdict = flow.metadata.get(METADATA_VERDICT)
        if not self._connection_counted(flow, verdict):
            self._see(self._device(flow), verdict, request_target(flow)[1], "http-request")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A block that needed the response (its content type, e.g. an app package)."""
        verdict = flow.metadata.get(METADATA_VERDICT)
        if isinstance(verdict, Verdict) and verdict.stage is Stage.RESPONSE:
            self._see(self._device(flow), verdict, request_target(flow)[1], "http-response")

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        verdict = flow.metadata.get(METADATA_VERDICT)
        if not self._connection_counted(flow, verdict):
            address = flow.server_conn.address
            self._see(self._device(flow), verdict, flow.client_conn.sni or (str(address[0]) if address else None), "tcp")
