"""Built-in minimal filter: allow/block by host name from the gateway config.

A placeholder decision stage until a policy snapshot is configured (see gateway/policy):
first matching rule in file order wins, else the configured default action.
"""

from __future__ import annotations

from mitmproxy import dns, http, tcp, tls

from addons.flowverdict import record_tls_verdict, record_verdict
from addons.requesttarget import request_target
from gateway.config import HostRule
from gateway.hostname import normalize_host as _normalize_host
from gateway.proxy.connections import PROTOCOL_UNIDENTIFIED, LiveConnections
from gateway.verdict import RULE_UNIDENTIFIED_PROTOCOL, Action, Stage, Verdict

__all__ = ["HostRuleDecider", "normalize_host"]


def normalize_host(host: str) -> str:
    """gateway.hostname's normalization (IDNA UTS 46), "" for a name that does not map."""
    return _normalize_host(host) or ""


class HostRuleDecider:
    name = "kanmon-hostrules"

    def __init__(self, rules: tuple[HostRule, ...], default_action: Action, connections: LiveConnections,
                 no_sni: str = "block"):
        self.rules = rules
        self.default_action = default_action
        self.connections = connections
        self.no_sni = no_sni

    def decide_host(self, host: str | None, stage: Stage) -> Verdict:
        if host:
            h = normalize_host(host)
            for rule in self.rules:
                if rule.matches(h):
                    return Verdict(rule.action, rule.rule_id, rule.reason or f"{h} matches rule {rule.rule_id}", stage)
        return Verdict(self.default_action, None, f"no rule matched {host or 'the connection'}; default {self.default_action}", stage)

    def _record(self, flow, verdict: Verdict) -> None:
        record_verdict(flow, verdict, self.connections)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        state = self.connections.get(data.context.client.id)
        if state is None:
            return
        sni = data.client_hello.sni
        if sni:
            verdict = self.decide_host(sni, Stage.TLS)
        elif self.no_sni == "block":
            verdict = Verdict(Action.BLOCK, "kanmon:no-sni", "TLS without server name indication", Stage.TLS)
        else:
            verdict = Verdict(self.default_action, None, "TLS without SNI; default action", Stage.TLS)
        record_tls_verdict(state, verdict)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        verdict = self.decide_host(request_target(flow)[0], Stage.REQUEST)
        state = self.connections.get(flow.client_conn.id)
        tls_verdict = state.tls_verdict if state is not None else None
        if verdict.passes and tls_verdict is not None and not tls_verdict.passes:
            verdict = tls_verdict  # a blocked SNI is not unblocked by a different Host header
        self._record(flow, verdict)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        state = self.connections.get(flow.client_conn.id)
        if state is not None and state.protocol == PROTOCOL_UNIDENTIFIED:
            # Host rules name hosts, never destinations: unidentified traffic has no rule
            # that could allow it (a policy can, with dst_port / dst_cidr).
            self._record(flow, Verdict(Action.BLOCK, RULE_UNIDENTIFIED_PROTOCOL,
                                       "protocol not identified (neither TLS nor HTTP)", Stage.TCP))
            return
        host = flow.client_conn.sni or None
        self._record(flow, self.decide_host(host, Stage.TCP))

    def dns_request(self, flow: dns.DNSFlow) -> None:
        # Host rules are enforced where a block page can be shown (HTTP, TLS); names
        # resolve normally so the user sees why instead of a resolver error.
        q = flow.request.question
        name = q.name if q else "?"
        self._record(flow, Verdict(Action.ALLOW, None, f"DNS query for {name}: host rules apply at HTTP/TLS", Stage.DNS))
