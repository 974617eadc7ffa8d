"""Policy snapshot -> verdict, at every stage: DNS, TLS ClientHello (SNI), HTTP request,
HTTP response, raw TCP.

The snapshot is compiled and immutable (gateway/policy); `PolicyHolder.swap` replaces it
and its connection table in one assignment, so a reload switches every new decision at one
point and never serves a half-built policy. Path-independent decisions are cached per
(device, host) in the snapshot's connection table.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from mitmproxy import dns, http, tcp, tls

from addons.flowverdict import record_tls_verdict, record_verdict
from addons.protocol import WEB_PORTS
from addons.requesttarget import request_target
from gateway.hostname import canonical_address
from gateway.proxy.connections import PROTOCOL_UNIDENTIFIED, LiveConnections
from gateway.policy import ALL_TENANT_HEADERS, ConnectionTable, DeviceContext, PolicyQuery, PolicySnapshot, is_deferred, normalize_host
from gateway.policy.query import request_query
from gateway.proxy.flowstate import METADATA_DEFERRED, METADATA_DNS_BLOCK
from gateway.registry.model import DeviceRecord
from gateway.verdict import RULE_UNIDENTIFIED_PROTOCOL, Action, Stage, Verdict

log = logging.getLogger("kanmon.policy")

# Header names as mitmproxy stores them (bytes), lower-case, for one pass over a request's
# header fields instead of one case-insensitive scan of every field per tenant header.
_TENANT_HEADER_KEYS = frozenset(name.encode() for name in ALL_TENANT_HEADERS)
# Addresses whose parsed form is remembered (a gateway talks to a bounded set of upstreams
# over a few minutes); the cache is simply emptied when it reaches this size.
_IP_CACHE_SIZE = 4096



@dataclass(frozen=True)
class LoadedPolicy:
    snapshot: PolicySnapshot
    table: ConnectionTable
    path: str


class PolicyHolder:
    """The policy in force. Read by the event loop, replaced by reloads."""

    def __init__(self, snapshot: PolicySnapshot, path: str):
        self.current = LoadedPolicy(snapshot, ConnectionTable.for_snapshot(snapshot), path)

    def swap(self, snapshot: PolicySnapshot) -> LoadedPolicy:
        previous = self.current
        self.current = LoadedPolicy(snapshot, ConnectionTable.for_snapshot(snapshot), previous.path)
        return previous

    def invalidate_device(self, device_id: str) -> None:
        self.current.table.invalidate(device_id)


def device_context(record: DeviceRecord, underlay_ip: str | None = None, session=None,
                   signin_configured: bool = False) -> DeviceContext:
    """The policy's view of a device. With user sign-in configured (issue #9) the user is
    the signed-in one (none before sign-in); without it, the registered owner."""
    ctx = DeviceContext(
        device_id=record.device_id, groups=record.groups, ownership=str(record.ownership),
        user=None if signin_configured else (record.owner or None), platform=record.platform,
        os_version=record.os_version, jailbroken=record.jailbroken, status=str(record.status),
        underlay_ip=ipaddress.ip_address(underlay_ip) if underlay_ip else None)
    if session is None:
        return ctx
    return replace(ctx, user=session.user, signed_in=True, user_groups=session.groups, amr=session.amr,
                   acr=session.acr, mfa=session.mfa, auth_time=session.auth_time)


def _ip(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    return canonical_address(address[0]) if address else None


class PolicyDecider:
    name = "kanmon-policy"

    def __init__(self, holder: PolicyHolder, connections: LiveConnections, underlay_of=lambda ip: None,
                 decision_seconds=None, session_of=None):
        self.session_of = session_of  # DeviceRecord -> its signed-in user's session or None (issue #9)
        self.holder = holder
        self.connections = connections
        self.decision_seconds = decision_seconds  # histogram by stage (kanmon_decision_duration_seconds)
        self.underlay_of = underlay_of  # tunnel address -> the peer's current outer address
        self._contexts: dict[str, tuple[tuple, DeviceContext]] = {}
        self._ips: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}
        self._histograms: dict[Stage, object] = {}  # the histogram's child per stage label

    # -- helpers -------------------------------------------------------------------------
    def _context(self, record: DeviceRecord, client_ip: str) -> DeviceContext:
        """The device's policy view, rebuilt when its record, its user session or its
        underlay address changes. One entry per device (the newest), so the cache is bounded
        by the number of devices."""
        session = self.session_of(record) if self.session_of is not None else None
        underlay = self.underlay_of(client_ip)
        version = (record.updated_at, session.session_id if session is not None else None, underlay)
        held = self._contexts.get(record.device_id)
        if held is not None and held[0] == version:
            return held[1]
        ctx = device_context(record, str(underlay) if underlay is not None else None, session,
                             signin_configured=self.session_of is not None)
        self._contexts[record.device_id] = (version, ctx)
        return ctx

    def _device(self, client) -> DeviceContext | None:
        state = self.connections.get(client.id)
        if state is None or state.device is None:
            return None
        return self._context(state.device, state.peer_ip)

    def _record(self, flow, verdict: Verdict) -> None:
        record_verdict(flow, verdict, self.connections)

    def _ip(self, address) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """``_ip(address)``, remembered per address text (parsing costs ~2 µs a request)."""
        if not address:
            return None
        key = address[0]
        if not isinstance(key, str):
            return _ip(address)
        try:
            return self._ips[key]
        except KeyError:
            pass
        if len(self._ips) >= _IP_CACHE_SIZE:
            self._ips.clear()
        ip = self._ips[key] = _ip(address)
        return ip

    def _decide(self, query: PolicyQuery) -> Verdict:
        if self.decision_seconds is None:
            return self._decide_uncounted(query)
        started = time.perf_counter()
        try:
            return self._decide_uncounted(query)
        finally:
            # labels() validates, locks and looks the child up on every call; the child for a
            # label value never changes (nothing removes it), so it is looked up once.
            child = self._histograms.get(query.stage)
            if child is None:
                child = self._histograms[query.stage] = self.decision_seconds.labels(str(query.stage))
            child.observe(time.perf_counter() - started)

    def _decide_uncounted(self, query: PolicyQuery) -> Verdict:
        loaded = self.holder.current
        if query.stage in (Stage.DNS, Stage.TLS) and query.host:
            cached = loaded.table.lookup(query.device, query.host, query.stage, query.now)
            if cached is not None:
                return cached
        return loaded.snapshot.decide(query)

    # -- stages --------------------------------------------------------------------------
    def dns_request(self, flow: dns.DNSFlow) -> None:
        device = self._device(flow.client_conn)
        q = flow.request.question
        if device is None or q is None:
            return  # no verdict: the enforcer refuses it
        verdict = self._decide(PolicyQuery(Stage.DNS, device, host=normalize_host(q.name), protocol="udp",
                                           now=datetime.now(UTC)))
        # A rule that needs facts DNS does not have (a path, a content type) decides later.
        if not verdict.passes:
            flow.metadata[METADATA_DNS_BLOCK] = self.holder.current.snapshot.dns_block_mode(verdict.rule_id)
        self._record(flow, verdict)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        client = data.context.client
        device = self._device(client)
        state = self.connections.get(client.id)
        if device is None or state is None:
            return
        server = data.context.server.address
        verdict = self._decide(PolicyQuery(Stage.TLS, device, host=normalize_host(data.client_hello.sni),
                                           dst_ip=self._ip(server), dst_port=server[1] if server else None,
                                           now=datetime.now(UTC)))
        verdict = record_tls_verdict(state, verdict)
        if verdict.action == "no-inspect":
            data.ignore_connection = True  # passed through untouched: never intercepted

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        device = self._device(flow.client_conn)
        if device is None:
            return
        req = flow.request
        # Client-sent copies of the tenant headers are never trusted. One pass over the
        # fields finds them (names compared lower-case, as Headers does).
        if not _TENANT_HEADER_KEYS.isdisjoint(field[0].lower() for field in req.headers.fields):
            for name in ALL_TENANT_HEADERS:
                if name in req.headers:
                    del req.headers[name]
        size = req.headers.get("content-length")
        host, url = request_target(flow)
        # One engine (issue #22): request_query + decide is the path bench/engine.py measures.
        query = request_query(
            device, host, url, req.scheme, req.method, self._ip(flow.server_conn.address),
            flow.server_conn.address[1] if flow.server_conn.address else req.port, req.headers.get("content-type"),
            int(size) if size and size.isascii() and size.isdigit() else None, datetime.now(UTC))
        verdict = self._decide(query)
        # A blocked SNI is not unblocked by a different Host header: the connection's block
        # stands (ConnectionState.connection_block, applied by record_verdict and the enforcer).
        if is_deferred(verdict):
            flow.metadata[METADATA_DEFERRED] = query
        self._record(flow, verdict)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        query = flow.metadata.pop(METADATA_DEFERRED, None)
        if query is None or flow.response is None:
            return
        verdict = self.holder.current.snapshot.decide(query.at_response(flow.response.headers.get("content-type")))
        self._record(flow, verdict)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        device = self._device(flow.client_conn)
        if device is None:
            return
        server = flow.server_conn.address
        port = server[1] if server else None
        verdict = self._decide(PolicyQuery(
            Stage.TCP, device, host=normalize_host(flow.client_conn.sni), dst_ip=self._ip(server),
            dst_port=port, now=datetime.now(UTC)))
        state = self.connections.get(flow.client_conn.id)
        if state is not None and state.protocol == PROTOCOL_UNIDENTIFIED:
            verdict = self._unidentified(state, verdict, port)
        self._record(flow, verdict)

    def _unidentified(self, state, verdict: Verdict, port: int | None) -> Verdict:
        """Unidentified traffic passes only where a rule that names its destination
        (``dst_port``, ``dst_cidr``, ``system``) allows it, and never on a web port."""
        if not verdict.passes:
            return verdict
        info = self.holder.current.snapshot.rule(verdict.rule_id) if verdict.rule_id else None
        if info is not None and info.names_destination and port not in WEB_PORTS:
            state.unidentified_allowed_by = info.id
            return verdict
        why = state.unidentified_why or "neither TLS nor HTTP"
        where = "on a web port, where only HTTP and TLS are accepted" if port in WEB_PORTS else \
            "and no policy rule names this destination (dst_port / dst_cidr)"
        return Verdict(Action.BLOCK, RULE_UNIDENTIFIED_PROTOCOL, f"protocol not identified ({why}) {where}",
                       Stage.TCP)
