"""Quarantine: a quarantined device stays connected but reaches only the remediation
destinations named in the config (MDM, OS and anti-virus updates); everything else is
blocked with the quarantine page. Runs after the decision stage and before the enforcer,
so it overrides whatever the policy said. (NISC booklet 4-5: cut an infected device off.)"""

from __future__ import annotations

from mitmproxy import dns, http, tcp, tls

from addons.flowverdict import record_verdict
from gateway.hostname import host_in, normalize_host, split_host_entries
from addons.requesttarget import request_target
from gateway.proxy.connections import LiveConnections
from gateway.registry.model import DeviceStatus
from gateway.verdict import RULE_QUARANTINE, Action, Stage, Verdict

EXPLAIN = "端末は隔離中です。修復用の宛先のみ利用できます / device is quarantined: only remediation destinations are reachable"


class QuarantineGate:
    name = "kanmon-quarantine"

    def __init__(self, connections: LiveConnections, allow_hosts: tuple[str, ...]):
        self.connections = connections
        self.exact, self.suffixes = split_host_entries(allow_hosts)

    def allowed(self, host: str | None) -> bool:
        return host_in(normalize_host(host), self.exact, self.suffixes)

    def _quarantined(self, client) -> bool:
        state = self.connections.get(client.id)
        return state is not None and state.device is not None and state.device.status is DeviceStatus.QUARANTINED

    def _override(self, flow, host: str | None, stage: Stage) -> None:
        if not self._quarantined(flow.client_conn):
            return
        if self.allowed(host):
            verdict = Verdict(Action.ALLOW, RULE_QUARANTINE, f"remediation destination {host}", stage)
        else:
            verdict = Verdict(Action.BLOCK, RULE_QUARANTINE, EXPLAIN, stage)
        record_verdict(flow, verdict, self.connections)

    def dns_request(self, flow: dns.DNSFlow) -> None:
        # Names resolve (so the device reaches remediation hosts and sees the page for others).
        pass

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self._quarantined(data.context.client):
            data.ignore_connection = False  # never pass a quarantined device's TLS through uninspected

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._override(flow, request_target(flow)[0], Stage.REQUEST)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._override(flow, flow.client_conn.sni, Stage.TCP)
