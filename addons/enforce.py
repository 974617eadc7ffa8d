"""Verdict -> action. The last of Kanmon's decision-stage addons.

It turns the verdict recorded by the decision addons into what happens to the traffic, and
it is the fail-closed gate: a request, raw TCP flow or DNS query that reaches it without a
verdict (no addon decided, or one failed) is blocked and counted; no upstream connection is
opened for a client connection that holds no passing verdict; destinations inside the
gateway (tunnel prefixes, its own addresses) are never proxied to.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable

from mitmproxy import dns, http, tcp
from mitmproxy.proxy import server_hooks

from addons.blockpage import Helpdesk, Organization, block_response, new_request_id
from gateway.proxy.flowstate import (METADATA_DEVICE, METADATA_DNS_BLOCK, METADATA_REQUEST_ID, METADATA_SIGNATURE,
                                     METADATA_VERDICT)
from addons.requesttarget import request_target
from gateway.hostname import canonical_address
from gateway.proxy.connections import PROTOCOL_UNIDENTIFIED, LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.pages.catalog import load_all as load_catalogs
from gateway.pages.kinds import PageKind, page_kind, staff_message
from gateway.verdict import (RULE_FAIL_CLOSED, RULE_INTERNAL_DESTINATION, RULE_MALFORMED_AUTHORITY, RULE_UNDECIDED,
                             RULE_UNIDENTIFIED_PROTOCOL, Action, Stage, Verdict, strictest)

log = logging.getLogger("kanmon.enforce")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Destination addresses whose "inside the gateway?" answer is remembered; emptied when full.
_INTERNAL_CACHE_SIZE = 4096


class Enforcer:
    name = "kanmon-enforce"

    def __init__(self, connections: LiveConnections, metrics: GatewayMetrics, helpdesk: Helpdesk,
                 internal_networks: Iterable[Network], cut_client: Callable[[str], None],
                 sinkhole: tuple[str, str] = ("198.18.0.1", "100::1"), organization: Organization | None = None,
                 policy_view: Callable[[], object] | None = None, signin_portal: str | None = None):
        self.connections = connections
        self.metrics = metrics
        self.helpdesk = helpdesk
        # issue #19: the block pages. The catalogs load now: a broken one stops the start.
        load_catalogs()
        self.organization = organization or Organization(helpdesk=helpdesk)
        self.policy_view = policy_view        # () -> the policy snapshot in force (rules, categories) or None
        self.signin_portal = signin_portal    # the sign-in portal's host, for the sign-in-required page
        self.internal_networks = tuple(internal_networks)
        self.cut_client = cut_client
        self.sinkhole = sinkhole
        self._internal: dict[str, bool] = {}  # address text -> is_internal (networks are fixed)
        self._counters: dict[tuple[str, ...], object] = {}  # decision label values -> counter child

    # -- helpers -------------------------------------------------------------------------
    def is_internal(self, address: tuple | None) -> bool:
        if not address:
            return False
        key = address[0]
        if isinstance(key, str):
            known = self._internal.get(key)
            if known is None:
                if len(self._internal) >= _INTERNAL_CACHE_SIZE:
                    self._internal.clear()
                known = self._internal[key] = self._is_internal(address)
            return known
        return self._is_internal(address)

    def _is_internal(self, address: tuple) -> bool:
        ip = canonical_address(address[0])
        if ip is None:
            return False  # a host name: resolved upstream, never one of our literal addresses
        return ip.is_loopback or ip.is_unspecified or any(ip in net for net in self.internal_networks)

    def _count(self, verdict: Verdict, flow=None) -> None:
        device = flow.metadata.get(METADATA_DEVICE) if flow is not None else None
        group = min(device.groups) if device is not None and device.groups else "none"
        labels = (str(verdict.stage), str(verdict.action), verdict.rule_id or "default", verdict.category or "none", group)
        # labels() validates and locks on every call; a child, once made, is never removed.
        child = self._counters.get(labels)
        if child is None:
            if len(self._counters) >= 65536:  # rule ids x groups is bounded; this is a backstop
                self._counters.clear()
            child = self._counters[labels] = self.metrics.decisions.labels(*labels)
        child.inc()

    def _gate(self, flow, stage: Stage) -> Verdict:
        """The verdict to act on: fail-closed verdicts override whatever was decided."""
        state = self.connections.get(flow.client_conn.id)
        if state is not None and state.failed:
            return Verdict(Action.BLOCK, RULE_FAIL_CLOSED, "an addon failed on this connection", stage)
        if stage is not Stage.DNS and self.is_internal(flow.server_conn.address):
            return Verdict(Action.BLOCK, RULE_INTERNAL_DESTINATION, "destination is inside the gateway", stage)
        verdict = flow.metadata.get(METADATA_VERDICT)
        if not isinstance(verdict, Verdict):
            self.metrics.fail_closed_blocks.labels(str(stage), "no-decision").inc()
            return Verdict(Action.BLOCK, RULE_UNDECIDED, "no policy decision was made", stage)
        if state is not None:
            # No later stage loosens a block the connection already got (SNI, raw TCP).
            verdict = strictest(state.connection_block, verdict)
            if (stage is Stage.TCP and verdict.passes and state.protocol == PROTOCOL_UNIDENTIFIED
                    and state.unidentified_allowed_by is None):
                # Identify or deny: no decision stage confirmed that a rule naming this
                # destination allows unidentified traffic.
                self.metrics.fail_closed_blocks.labels(str(stage), "unidentified-protocol").inc()
                verdict = Verdict(Action.BLOCK, RULE_UNIDENTIFIED_PROTOCOL,
                                  "protocol not identified and no rule allows it", stage)
        return verdict

    def block_http(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        device = flow.metadata.get(METADATA_DEVICE)
        request_id = flow.metadata.setdefault(METADATA_REQUEST_ID, new_request_id())
        flow.metadata[METADATA_VERDICT] = verdict
        signature = flow.metadata.get(METADATA_SIGNATURE)
        url = request_target(flow)[1]
        flow.response = block_response(
            verdict, url=url, device_id=device.device_id if device else None,
            helpdesk=self.helpdesk, request_id=request_id, organization=self.organization,
            staff=self._staff(verdict), signature=signature, portal_url=self._portal_url(verdict, url))
        if verdict.rule_id == RULE_MALFORMED_AUTHORITY:
            flow.response.status_code, flow.response.reason = 400, "Bad Request"   # broken, not forbidden

    def _staff(self, verdict: Verdict):
        """The rule's staff message and alternative from the policy in force (issue #19)."""
        snapshot = self.policy_view() if self.policy_view is not None else None
        if snapshot is None or verdict.rule_id is None:
            return staff_message(verdict)
        return staff_message(verdict, snapshot.rule(verdict.rule_id), getattr(snapshot, "categories", None))

    def _portal_url(self, verdict: Verdict, url: str | None) -> str | None:
        if self.signin_portal is None or page_kind(verdict) is not PageKind.SIGNIN:
            return None
        from gateway.signin.pages import start_url
        return start_url(self.signin_portal, url if url and url.startswith(("http://", "https://")) else None)

    # -- hooks ---------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.metadata.setdefault(METADATA_REQUEST_ID, new_request_id())
        if flow.response is not None:
            return
        verdict = self._gate(flow, Stage.REQUEST)
        flow.metadata[METADATA_VERDICT] = verdict
        self._count(verdict, flow)
        if not verdict.passes:
            self.block_http(flow, verdict)
            return
        for name, value in verdict.headers:
            flow.request.headers[name] = value  # replaces any client-sent copy

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A verdict that needed the response (its content type) blocks here, before any of
        the body reaches the device."""
        verdict = flow.metadata.get(METADATA_VERDICT)
        if not isinstance(verdict, Verdict) or verdict.stage is not Stage.RESPONSE or flow.response is None:
            return
        self._count(verdict, flow)
        if verdict.passes:
            return
        self.block_http(flow, verdict)
        page = flow.response.content
        # mitmproxy keeps relaying the server's body after this hook: stream it through a
        # filter that emits the block page once and drops everything the server sends.
        sent = False

        def only_the_block_page(chunk: bytes) -> bytes:
            nonlocal sent
            if sent:
                return b""
            sent = True
            return page

        flow.response.stream = only_the_block_page

    def response(self, flow: http.HTTPFlow) -> None:
        """A bodiless response skips streaming and is re-read from the server: put the block
        page back if a response-stage verdict blocked it."""
        verdict = flow.metadata.get(METADATA_VERDICT)
        if (isinstance(verdict, Verdict) and not verdict.passes and flow.response is not None
                and "X-Kanmon-Rule" not in flow.response.headers):
            self.block_http(flow, verdict)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        verdict = self._gate(flow, Stage.TCP)
        flow.metadata[METADATA_VERDICT] = verdict
        self._count(verdict, flow)
        state = self.connections.get(flow.client_conn.id)
        if not verdict.passes and state is not None:
            # server_connect below refuses the upstream connection; mitmproxy then closes the client.
            state.blocked = verdict

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        state = self.connections.get(data.client.id)
        if self.is_internal(data.server.address):
            data.server.error = "kanmon: destination is inside the gateway"
        elif state is None or not state.may_connect_upstream:
            self.metrics.fail_closed_blocks.labels(str(Stage.UPSTREAM), "no-allow-verdict").inc()
            data.server.error = "kanmon: no allow verdict covers this connection"

    def dns_request(self, flow: dns.DNSFlow) -> None:
        if flow.response is not None:
            return
        verdict = self._gate(flow, Stage.DNS)
        flow.metadata[METADATA_VERDICT] = verdict
        self._count(verdict, flow)
        if not verdict.passes and verdict.rule_id in (RULE_FAIL_CLOSED, RULE_UNDECIDED):
            flow.response = flow.request.fail(dns.response_codes.REFUSED)
        elif not verdict.passes:
            # issue #19: the sinkhole by default (the browser then lands on the block page);
            # NXDOMAIN only where the policy asks for it (dns_block: nxdomain).
            if flow.metadata.get(METADATA_DNS_BLOCK) == "nxdomain":
                flow.response = flow.request.fail(dns.response_codes.NXDOMAIN)
            else:
                flow.response = self._sinkhole_answer(flow.request)

    def _sinkhole_answer(self, request: dns.DNSMessage) -> dns.DNSMessage:
        """Blocked name answered with an address that leads only to the proxy, so a browser
        connects and shows the block page. Other record types get an empty answer."""
        q = request.question
        if q is None or q.type not in (dns.types.A, dns.types.AAAA):
            return request.succeed([])
        address = self.sinkhole[0] if q.type == dns.types.A else self.sinkhole[1]
        return request.succeed([dns.ResourceRecord(q.name, q.type, dns.classes.IN, 60,
                                                   ipaddress.ip_address(address).packed)])
