"""DNS stays with the gateway's resolver (issue #14):

* ``NoInspectBinding`` lets a ``no-inspect`` TLS connection pass untouched only to an
  address the gateway's resolver returned for its SNI to that device
  (gateway/proxy/dnsbinding.py); otherwise the connection is intercepted and refused
  (``kanmon:no-inspect-unresolved``).
* ``DnsBypassGuard`` refuses DNS over TLS (TCP 853) except to configured resolvers, and DNS
  over HTTPS: requests or responses carrying DNS messages (``application/dns-message``,
  ``application/dns-json``), unless the policy rule that allowed the request names that
  content type (``RuleInfo.allows_dns_messages``). Rule id ``kanmon:dns-bypass``.

Both run after the policy decision and before the enforcer; their blocks combine with the
policy's verdict by the strictest-wins rule (addons/flowverdict.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from mitmproxy import dns, http, tcp, tls

from addons.flowverdict import record_tls_verdict, record_verdict
from gateway.proxy.flowstate import METADATA_VERDICT
from gateway.proxy.connections import LiveConnections
from gateway.hostname import canonical_address
from gateway.proxy.dnsbinding import DnsBindings
from gateway.hostname import normalize_host
from gateway.verdict import RULE_DNS_BYPASS, RULE_NO_INSPECT_UNRESOLVED, Action, Stage, Verdict

DOT_PORT = 853
DNS_MESSAGE_TYPES = frozenset({"application/dns-message", "application/dns-json"})


class NoInspectBinding:
    name = "kanmon-no-inspect-binding"

    def __init__(self, connections: LiveConnections, bindings: DnsBindings | None = None):
        self.connections = connections
        self.bindings = bindings if bindings is not None else DnsBindings()

    def dns_response(self, flow: dns.DNSFlow) -> None:
        response, question = flow.response, flow.request.question
        device = canonical_address(flow.client_conn.peername[0] if flow.client_conn.peername else None)
        if response is None or question is None or device is None:
            return
        names = {normalize_host(question.name)}
        for answer in response.answers:
            names.add(normalize_host(answer.name))
        names.discard(None)
        for answer in response.answers:
            if answer.type == dns.types.A:
                address = canonical_address(str(answer.ipv4_address))
            elif answer.type == dns.types.AAAA:
                address = canonical_address(str(answer.ipv6_address))
            else:
                continue
            for name in names:
                self.bindings.bind(device, name, address, answer.ttl)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if not data.ignore_connection:
            return
        client = data.context.client
        state = self.connections.get(client.id)
        verdict = state.tls_verdict if state is not None else None
        if state is None or not isinstance(verdict, Verdict) or verdict.action is not Action.NO_INSPECT:
            return
        device = canonical_address(client.peername[0] if client.peername else None)
        server = data.context.server.address
        address = canonical_address(server[0] if server else None)
        sni = normalize_host(data.client_hello.sni)
        if device is not None and address is not None and sni and self.bindings.resolved(device, sni, address):
            return
        data.ignore_connection = False   # intercept instead: the request then gets the block page
        record_tls_verdict(state, Verdict(
            Action.BLOCK, RULE_NO_INSPECT_UNRESOLVED,
            f"検査除外の宛先がゲートウェイの DNS 応答と一致しません / no-inspect {sni or 'connection'} to "
            f"{address}: the gateway's resolver did not give this address for this name", Stage.TLS))


class DnsBypassGuard:
    name = "kanmon-dns-bypass"

    def __init__(self, connections: LiveConnections, dot_resolvers: Iterable[str] = (),
                 rule_info: Callable[[str], object | None] | None = None):
        self.connections = connections
        self.dot_resolvers = frozenset(a for a in (canonical_address(r) for r in dot_resolvers) if a is not None)
        self.rule_info = rule_info   # rule id -> RuleInfo of the policy in force (None: no policy)

    def _dot_refused(self, address: tuple | None) -> bool:
        return bool(address) and address[1] == DOT_PORT and canonical_address(address[0]) not in self.dot_resolvers

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        state = self.connections.get(data.context.client.id)
        if state is None or not self._dot_refused(data.context.server.address):
            return
        data.ignore_connection = False
        record_tls_verdict(state, self._verdict("DNS over TLS (port 853) to a resolver that is not configured", Stage.TLS))

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        if self._dot_refused(flow.server_conn.address):
            record_verdict(flow, self._verdict("DNS over TLS (port 853) to a resolver that is not configured",
                                               Stage.TCP), self.connections)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        headers = flow.request.headers
        carried = {_media_type(headers.get("content-type")), *(_media_type(v) for v in headers.get("accept", "").split(","))}
        if not (carried & DNS_MESSAGE_TYPES or _dns_query_parameter(flow.request)) or self._allowed(flow):
            return
        record_verdict(flow, self._verdict("DNS over HTTPS request (DNS message content type)", Stage.REQUEST),
                       self.connections)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or _media_type(flow.response.headers.get("content-type")) not in DNS_MESSAGE_TYPES:
            return
        if self._allowed(flow):
            return
        record_verdict(flow, self._verdict("DNS over HTTPS response (DNS message content type)", Stage.RESPONSE),
                       self.connections)

    def _allowed(self, flow) -> bool:
        verdict = flow.metadata.get(METADATA_VERDICT)
        if self.rule_info is None or not isinstance(verdict, Verdict) or not verdict.passes or not verdict.rule_id:
            return False
        info = self.rule_info(verdict.rule_id)
        return bool(getattr(info, "allows_dns_messages", False))

    @staticmethod
    def _verdict(what: str, stage: Stage) -> Verdict:
        return Verdict(Action.BLOCK, RULE_DNS_BYPASS,
                       f"ゲートウェイの DNS を迂回する通信 / {what}: DNS goes through the gateway's resolver", stage,
                       category="dns-bypass")


def _media_type(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


_BASE64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


def _dns_query_parameter(request: http.Request) -> bool:
    """RFC 8484 GET: the DNS message itself in ``?dns=`` (base64url, at least a header's
    worth). Clients should also send ``Accept: application/dns-message``, but need not."""
    if request.method != "GET" or b"dns=" not in request.data.path:
        return False
    for name, value in request.query.items(multi=True):
        if name == "dns" and len(value) >= 16 and set(value.encode()) <= _BASE64URL:
            return True
    return False
