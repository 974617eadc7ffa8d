"""Protocol identification: the layer a connection gets, decided from its first bytes.

It replaces mitmproxy's ``NextLayer`` addon for the transparent listener (the DNS listener
and every other stack keep mitmproxy's own decision). mitmproxy's decision is made for a
debugging proxy: whatever does not look like TLS or HTTP at a glance — a ClientHello split
into one-byte segments, a request after an empty line, a lone ``GET`` in the first segment —
falls back to raw TCP, which a policy can judge only by its destination. Here
(gateway/proxy/firstbytes.py) the layer is chosen only once the bytes are complete, and what is
neither TLS nor HTTP is marked *unidentified* on the connection's state: it still becomes a
raw TCP flow, so that the decision stage and the access log see it, but the enforcer refuses
its upstream connection unless the policy explicitly allowed unidentified traffic to that
destination (``ConnectionState.unidentified_allowed_by``).

Mail ports are identified by the mail filter (addons/mail.py), which handles those flows
as IMAP, POP3 or SMTP.
"""

from __future__ import annotations

import logging
import time

from mitmproxy.addons import next_layer
from mitmproxy.proxy import events, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers import ClientTLSLayer, ServerTLSLayer, modes
from mitmproxy.proxy.layers.http import HTTPMode

from gateway.proxy.connections import PROTOCOL_MAIL, PROTOCOL_UNIDENTIFIED, LiveConnections
from gateway.proxy.firstbytes import Kind, classify, normalized_record_versions

log = logging.getLogger("kanmon.protocol")

# Web ports: only HTTP and TLS are accepted there, whatever a rule says (issue #14).
WEB_PORTS = frozenset({80, 443, 8080, 8443})
# Ports whose raw-TCP flows the mail filter takes over (addons/mail.py MAIL_PORTS).
MAIL_PORTS = frozenset({25, 465, 587, 110, 995, 143, 993})
# A connection that has not sent enough bytes to be identified after this long is
# unidentified (a client that trickles a request line byte by byte does not hold a slot).
IDENTIFY_SECONDS = 10.0


class ProtocolIdentifier(next_layer.NextLayer):
    name = "nextlayer"   # mitmproxy finds the layer decision under this name

    def __init__(self, connections: LiveConnections, mail_ports: frozenset[int] = MAIL_PORTS,
                 identify_seconds: float = IDENTIFY_SECONDS):
        super().__init__()
        self.connections = connections
        self.mail_ports = mail_ports
        self.identify_seconds = identify_seconds

    def next_layer(self, nextlayer) -> None:
        try:
            if not nextlayer.layer and next_layer.stack_match(nextlayer.context, [modes.TransparentProxy]):
                _normalize_record_versions(nextlayer)
            super().next_layer(nextlayer)
        except Exception:
            # Fail closed: a connection we could not classify is unidentified (its upstream
            # connection is then refused), never left to mitmproxy's lenient fallback.
            log.exception("protocol identification failed; treating the connection as unidentified")
            state = self.connections.get(nextlayer.context.client.id)
            nextlayer.layer = self._unidentified(nextlayer.context, state, "identification failed")

    def _next_layer(self, context: Context, data_client: bytes, data_server: bytes) -> Layer | None:
        top = next_layer.stack_match(context, [modes.TransparentProxy])
        in_tls = next_layer.stack_match(context, [modes.TransparentProxy, ServerTLSLayer, ClientTLSLayer])
        if context.client.transport_protocol != "tcp" or not (top or in_tls):
            return super()._next_layer(context, data_client, data_server)
        state = self.connections.get(context.client.id)
        port = context.server.address[1] if context.server.address else None
        if port in self.mail_ports:
            if top and classify(data_client) in (Kind.TLS, Kind.NEED_MORE) and data_client[:1] == b"\x16":
                return self._tls(context, data_client, state)
            self._mark(state, PROTOCOL_MAIL)
            return layers.TCPLayer(context)
        if in_tls and context.client.alpn in next_layer.HTTP_ALPNS:
            self._mark(state, "http")
            return layers.HttpLayer(context, HTTPMode.transparent)
        if data_server and not data_client:
            # The server spoke first (a greeting): nothing web-like does that.
            return self._unidentified(context, state, "the server spoke first")
        kind = classify(data_client)
        if kind is Kind.NEED_MORE:
            started = context.client.timestamp_start or time.time()
            if time.time() - started <= self.identify_seconds:
                raise next_layer.NeedsMoreData
            return self._unidentified(context, state, f"not identified within {self.identify_seconds:g} s")
        if kind is Kind.TLS:
            if in_tls:
                return self._unidentified(context, state, "TLS inside TLS")
            return self._tls(context, data_client, state)
        if kind in (Kind.HTTP, Kind.HTTP2):
            self._mark(state, "http")
            return layers.HttpLayer(context, HTTPMode.transparent)
        return self._unidentified(context, state, "neither TLS nor HTTP")

    def _tls(self, context: Context, data_client: bytes, state) -> Layer:
        if classify(data_client) is Kind.NEED_MORE:
            raise next_layer.NeedsMoreData
        self._mark(state, "tls")
        server_tls = ServerTLSLayer(context)
        server_tls.child_layer = ClientTLSLayer(context)
        return server_tls

    def _unidentified(self, context: Context, state, why: str) -> Layer:
        self._mark(state, PROTOCOL_UNIDENTIFIED)
        if state is not None:
            state.unidentified_why = why
        return layers.TCPLayer(context)

    @staticmethod
    def _mark(state, protocol: str) -> None:
        if state is not None:
            # Inside intercepted TLS the inner protocol is what counts ("tls" then "http").
            state.protocol = protocol


def _normalize_record_versions(nextlayer) -> None:
    """Replace the client's buffered bytes by the same bytes with an unusual TLS record
    version (0x0304+) set to 0x0301, so that mitmproxy's TLS layer, which reads these
    bytes next and accepts only 3.0-3.3, intercepts such a ClientHello like any other
    instead of failing (the record version is not negotiated; servers ignore it)."""
    client = nextlayer.context.client
    received = [e for e in nextlayer.events if isinstance(e, events.DataReceived) and e.connection == client]
    if not received:
        return
    fixed = normalized_record_versions(b"".join(e.data for e in received))
    if fixed is None:
        return
    first = received[0]
    rewritten = []
    for e in nextlayer.events:
        if e is first:
            rewritten.append(events.DataReceived(client, fixed))
        elif not (isinstance(e, events.DataReceived) and e.connection == client):
            rewritten.append(e)
    nextlayer.events[:] = rewritten
