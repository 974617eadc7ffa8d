"""Addon chain, unit level (mitmproxy taddons/tflow): identity, decisions, enforcement,
the fail-closed guard and the block page."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from mitmproxy import connection, dns
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import taddons, tflow
from wireguard_tools import WireguardKey

from addons.blockpage import Helpdesk, render_block_page
from addons.enforce import Enforcer
from addons.failclosed import FailClosedActions, Guarded
from addons.hostrules import HostRuleDecider
from gateway.proxy.flowstate import METADATA_DEVICE, METADATA_VERDICT
from addons.identity import DeviceDirectory, DeviceIdentity
from gateway.config import HostRule
from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.registry.model import DeviceRecord
from gateway.verdict import RULE_FAIL_CLOSED, RULE_INTERNAL_DESTINATION, RULE_UNDECIDED, Action, Stage, Verdict

DEVICE = DeviceRecord("phone-1", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.2"),
                      ipaddress.ip_address("fd77:77::2"), owner="sato@example.jp")
HELPDESK = Helpdesk("情報システム課", "the IT desk", "内線 1234")
INTERNAL = [ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("fd77:77::/64")]


class Chain:
    """The chain as the gateway assembles it, without the proxy around it."""

    def __init__(self, rules=(), default=Action.ALLOW):
        self.metrics = GatewayMetrics()
        self.connections = LiveConnections()
        self.directory = DeviceDirectory()
        self.directory.replace([DEVICE])
        self.cut: list[str] = []
        self.fatal: list[str] = []
        self.identity = DeviceIdentity(self.directory, self.connections, self.metrics)
        self.decider = HostRuleDecider(tuple(rules), default, self.connections)
        self.enforcer = Enforcer(self.connections, self.metrics, HELPDESK, INTERNAL, self.cut.append)
        self.actions = FailClosedActions(self.connections, self.metrics, self.enforcer.block_http,
                                         self.cut.append, self.fatal.append)

    def client(self, ip: str = "10.77.0.2") -> connection.Client:
        client = tflow.tclient_conn()
        client.peername = (ip, 40000)
        self.identity.client_connected(client)
        return client

    def http(self, host: str, client=None, server=("198.51.100.80", 80)):
        flow = tflow.tflow(client_conn=client or self.client())
        flow.request.host = host
        flow.request.headers["Host"] = host
        flow.server_conn.address = server
        return flow

    def errors(self, addon: str, hook: str) -> float:
        return self.metrics.registry.get_sample_value("kanmon_addon_errors_total", {"addon": addon, "hook": hook}) or 0


BLOCK_MAIL = HostRule("block-webmail", Action.BLOCK, frozenset({"mail.example.com"}), (".webmail.test",), "free webmail")
ALLOW_ALL_WEBMAIL = HostRule("allow-x", Action.ALLOW, frozenset({"x.webmail.test"}), (), "")


def test_unknown_tunnel_address_is_refused_known_one_annotated():
    chain = Chain()
    stranger = chain.client("10.77.0.99")
    assert stranger.error and "no admitted device" in stranger.error
    assert chain.metrics.registry.get_sample_value("kanmon_unknown_device_connections_total") == 1
    flow = chain.http("www.example.test")
    chain.identity.requestheaders(flow)
    assert flow.metadata[METADATA_DEVICE] is DEVICE
    v6 = chain.client("fd77:77::2")
    assert v6.error is None


def test_first_matching_rule_wins_and_default_applies():
    chain = Chain([ALLOW_ALL_WEBMAIL, BLOCK_MAIL], default=Action.BLOCK)
    assert chain.decider.decide_host("x.webmail.test", Stage.REQUEST).action is Action.ALLOW
    v = chain.decider.decide_host("Y.WebMail.Test.", Stage.REQUEST)
    assert (v.action, v.rule_id) == (Action.BLOCK, "block-webmail")
    v = chain.decider.decide_host("intranet.example.jp", Stage.REQUEST)
    assert (v.action, v.rule_id) == (Action.BLOCK, None)


def test_blocked_request_gets_bilingual_block_page():
    chain = Chain([BLOCK_MAIL])
    flow = chain.http("mail.example.com")
    for hook in (chain.identity, chain.decider, chain.enforcer):
        hook.requestheaders(flow)
    assert flow.response.status_code == 403
    assert flow.response.headers["X-Kanmon-Rule"] == "block-webmail"
    page = flow.response.get_text()
    assert "組織のセキュリティポリシー" in page and "security policy" in page
    assert "phone-1" in page and "内線 1234" in page
    assert chain.metrics.registry.get_sample_value(
        "kanmon_decisions_total", {"stage": "http-request", "verdict": "block", "rule": "block-webmail", "category": "none", "group": "none"}) == 1


def test_sni_block_is_not_undone_by_a_different_host_header():
    chain = Chain([BLOCK_MAIL])
    client = chain.client()
    client.sni = "mail.example.com"
    from mitmproxy import tls
    from mitmproxy.proxy import context
    hello = tls.ClientHelloData(context.Context(client, None), _client_hello("mail.example.com"))
    chain.decider.tls_clienthello(hello)
    flow = chain.http("allowed.example.test", client=client)
    chain.decider.requestheaders(flow)
    chain.enforcer.requestheaders(flow)
    assert flow.response.status_code == 403 and flow.metadata[METADATA_VERDICT].stage is Stage.TLS


def _client_hello(sni: str):
    from mitmproxy.tls import ClientHello
    # A minimal TLS 1.2 ClientHello with an SNI extension.
    name = sni.encode()
    sni_ext = (len(name) + 3).to_bytes(2, "big") + b"\x00" + len(name).to_bytes(2, "big") + name
    ext = b"\x00\x00" + len(sni_ext).to_bytes(2, "big") + sni_ext
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00" + len(ext).to_bytes(2, "big") + ext
    return ClientHello(body)


def test_no_verdict_means_blocked_and_counted():
    chain = Chain()
    flow = chain.http("www.example.test")
    chain.enforcer.requestheaders(flow)  # no decision addon ran
    assert flow.response.status_code == 503   # the gateway's fault, not a policy block (issue #19)
    assert flow.response.headers["X-Kanmon-Rule"] == RULE_UNDECIDED
    assert chain.metrics.registry.get_sample_value(
        "kanmon_fail_closed_blocks_total", {"stage": "http-request", "reason": "no-decision"}) == 1


def test_destination_inside_gateway_is_blocked_even_when_allowed():
    chain = Chain()
    flow = chain.http("www.example.test", server=("10.77.0.3", 22))
    chain.decider.requestheaders(flow)
    chain.enforcer.requestheaders(flow)
    assert flow.response.headers["X-Kanmon-Rule"] == RULE_INTERNAL_DESTINATION


def test_upstream_connection_needs_a_passing_verdict():
    chain = Chain([BLOCK_MAIL])
    client = chain.client()
    data = server_hooks.ServerConnectionHookData(server=connection.Server(address=("198.51.100.80", 443)), client=client)
    chain.enforcer.server_connect(data)
    assert data.server.error, "no decision yet: no upstream connection"
    flow = chain.http("www.example.test", client=client)
    chain.decider.requestheaders(flow)
    data = server_hooks.ServerConnectionHookData(server=connection.Server(address=("198.51.100.80", 443)), client=client)
    chain.enforcer.server_connect(data)
    assert data.server.error is None


def test_raw_tcp_block_refuses_the_upstream_connection():
    chain = Chain(default=Action.BLOCK)
    flow = tflow.ttcpflow(client_conn=chain.client())
    chain.decider.tcp_start(flow)
    chain.enforcer.tcp_start(flow)
    data = server_hooks.ServerConnectionHookData(server=flow.server_conn, client=flow.client_conn)
    chain.enforcer.server_connect(data)
    assert data.server.error


def test_tenant_headers_replace_client_copies():
    chain = Chain()
    flow = chain.http("accounts.google.com")
    flow.request.headers["X-GoogApps-Allowed-Domains"] = "attacker.example"
    flow.metadata[METADATA_VERDICT] = Verdict(Action.TENANT_RESTRICT, "google-tenant", "", Stage.REQUEST,
                                              headers=(("X-GoogApps-Allowed-Domains", "example.jp"),))
    chain.enforcer.requestheaders(flow)
    assert flow.response is None
    assert flow.request.headers.get_all("X-GoogApps-Allowed-Domains") == ["example.jp"]


class Exploding:
    name = "exploding"

    def requestheaders(self, flow):
        raise ValueError("boom")

    async def response(self, flow):
        raise ValueError("late boom")

    def dns_request(self, flow):
        raise KeyError("dns boom")

    def tcp_message(self, flow):
        raise RuntimeError("tcp boom")

    def client_connected(self, client):
        raise RuntimeError("connect boom")

    def configure(self, updated):
        raise RuntimeError("bad option")


def test_guard_blocks_http_request_on_exception_and_counts_it():
    chain = Chain()
    guarded = Guarded(Exploding(), chain.actions)
    flow = chain.http("www.example.test")
    guarded.requestheaders(flow)
    assert flow.response.status_code == 503   # a fault page: "temporarily unavailable" (issue #19)
    assert flow.response.headers["X-Kanmon-Rule"] == RULE_FAIL_CLOSED
    assert chain.errors("exploding", "requestheaders") == 1
    # The connection is marked: a later decision on it cannot let anything through.
    later = chain.http("www.example.test", client=flow.client_conn)
    chain.decider.requestheaders(later)
    chain.enforcer.requestheaders(later)
    assert later.response.headers["X-Kanmon-Rule"] == RULE_FAIL_CLOSED


def test_guard_replaces_response_when_an_async_response_hook_raises():
    chain = Chain()
    guarded = Guarded(Exploding(), chain.actions)
    flow = tflow.tflow(client_conn=chain.client(), resp=True)
    asyncio.run(guarded.response(flow))
    assert flow.response.status_code == 503
    assert chain.errors("exploding", "response") == 1


def test_guard_refuses_dns_cuts_tcp_and_rejects_clients():
    chain = Chain()
    guarded = Guarded(Exploding(), chain.actions)
    dflow = tflow.tdnsflow(client_conn=chain.client())
    guarded.dns_request(dflow)
    assert dflow.response.response_code == dns.response_codes.REFUSED
    tflow_ = tflow.ttcpflow(client_conn=chain.client())
    guarded.tcp_message(tflow_)
    assert tflow_.messages[-1].content == b"" and chain.cut == [tflow_.client_conn.id]
    client = tflow.tclient_conn()
    guarded.client_connected(client)
    assert client.error and "connect boom" in client.error


def test_guard_stops_the_gateway_when_configure_fails():
    chain = Chain()
    Guarded(Exploding(), chain.actions).configure({"x"})
    assert chain.fatal and "bad option" in chain.fatal[0]


def test_guarded_addon_loads_in_a_real_addon_manager():
    chain = Chain()
    with taddons.context() as tctx:
        tctx.master.addons.add(Guarded(chain.decider, chain.actions))
        assert tctx.master.addons.get("kanmon-hostrules") is not None


def test_block_page_escapes_what_it_shows():
    verdict = Verdict(Action.BLOCK, "r<1>", "reason & <b>", Stage.REQUEST)
    page = render_block_page(verdict, url="http://x.test/<script>alert(1)</script>", device_id="d\"1",
                             helpdesk=HELPDESK, request_id="abc")
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert "r&lt;1&gt;" in page and "reason &amp; &lt;b&gt;" in page
    assert "http" not in page.split("<body>")[0].replace("http-equiv", ""), "no external resources in <head>"


# -- the hook-wrapper cache of Guarded (mitmproxy looks every hook up for every event) -------


def test_guard_builds_each_hook_wrapper_once_and_it_still_fails_closed(monkeypatch):
    built: list[str] = []
    wrap = Guarded._wrap

    def counting_wrap(self, hook, func):
        built.append(hook)
        return wrap(self, hook, func)

    monkeypatch.setattr(Guarded, "_wrap", counting_wrap)
    chain = Chain()
    guarded = Guarded(Exploding(), chain.actions)
    implemented = ["client_connected", "configure", "dns_request", "requestheaders", "response", "tcp_message"]
    assert sorted(built) == implemented, "one wrapper per hook the addon implements, built when guarded"
    first, second = guarded.requestheaders, guarded.requestheaders
    assert first is second
    for _ in range(3):  # the cached wrapper blocks every time, not only the first
        flow = chain.http("www.example.test")
        guarded.requestheaders(flow)
        assert flow.response.status_code == 503
        assert flow.response.headers["X-Kanmon-Rule"] == RULE_FAIL_CLOSED
    assert chain.errors("exploding", "requestheaders") == 3
    # async hooks: cached too, still awaited and still failing closed
    assert guarded.response is guarded.response
    for _ in range(2):
        flow = tflow.tflow(client_conn=chain.client(), resp=True)
        asyncio.run(guarded.response(flow))
        assert flow.response.status_code == 503
    assert chain.errors("exploding", "response") == 2
    # what mitmproxy asks per event is answered from plain attributes: no hook -> None, no children
    assert guarded.websocket_message is None and tuple(guarded.addons) == ()
    with taddons.context() as tctx:
        flow = chain.http("www.example.test")
        tctx.master.addons.invoke_addon_sync(guarded, HttpRequestHeadersHook(flow))
        assert flow.response.status_code == 503
    assert sorted(built) == implemented, "and none built again per event"


def test_guard_cache_follows_a_hook_the_addon_rebinds():
    chain = Chain()
    inner = Exploding()
    guarded = Guarded(inner, chain.actions)
    old = guarded.requestheaders
    seen = []
    inner.requestheaders = seen.append  # an addon that swaps its hook at run time
    flow = chain.http("www.example.test")
    guarded.requestheaders(flow)
    assert guarded.requestheaders is old, "the same wrapper calls whatever the addon has now"
    assert seen == [flow] and flow.response is None
    inner.requestheaders = lambda flow: 1 / 0
    flow = chain.http("www.example.test")
    guarded.requestheaders(flow)
    assert flow.response.status_code == 503
    assert chain.errors("exploding", "requestheaders") == 1

    async def late_boom(flow):  # rebound to an async function: still awaited and guarded
        await asyncio.sleep(0)
        raise ValueError("async boom")
    inner.requestheaders = late_boom
    flow = chain.http("www.example.test")
    asyncio.run(guarded.requestheaders(flow))
    assert flow.response.status_code == 503
    assert chain.errors("exploding", "requestheaders") == 2


def test_guard_wraps_a_hook_whose_event_is_registered_after_the_addon_was_guarded():
    from dataclasses import dataclass

    from mitmproxy import hooks

    chain = Chain()

    class LateAddon:
        name = "late"

        def kanmon_test_late_event(self, flow):
            raise ValueError("late hook boom")

    guarded = Guarded(LateAddon(), chain.actions)

    @dataclass
    class LateEvent(hooks.Hook):  # a hook mitmproxy learns only now (a module imported later)
        name = "kanmon_test_late_event"
        flow: object

    with taddons.context() as tctx:
        flow = chain.http("www.example.test")
        tctx.master.addons.invoke_addon_sync(guarded, LateEvent(flow))
        assert flow.response.status_code == 503, "still guarded: blocked, not passed through unguarded"
    assert chain.errors("late", "kanmon_test_late_event") == 1


class Parent:
    name = "parent"

    def __init__(self):
        self.addons = [Exploding()]


def test_guard_children_keep_their_wrappers_and_fail_closed_through_the_addon_manager():
    chain = Chain()
    parent = Parent()
    guarded = Guarded(parent, chain.actions)
    child = guarded.addons[0]
    assert isinstance(child, Guarded) and child.inner is parent.addons[0]
    assert guarded.addons[0] is child and child.requestheaders is guarded.addons[0].requestheaders
    with taddons.context() as tctx:
        for _ in range(2):  # mitmproxy's own lookup (traverse + getattr per event)
            flow = chain.http("www.example.test")
            tctx.master.addons.invoke_addon_sync(guarded, HttpRequestHeadersHook(flow))
            assert flow.response.status_code == 503
    assert chain.errors("exploding", "requestheaders") == 2
    parent.addons = [Exploding(), Exploding()]  # a changed child list gets new wrappers
    assert [g.inner for g in guarded.addons] == parent.addons


def test_guarded_addons_register_without_deprecation_warnings(caplog):
    """mitmproxy warns "add_log event has been deprecated" for any addon that merely has an
    `add_log` attribute; a guard must not grow one (the gateway logged one warning per addon
    at every start, #19)."""
    import logging

    import mitmproxy.log  # noqa: F401 -- registers AddLogHook in hooks.all_hooks, as in the gateway
    chain = Chain()
    guarded = Guarded(chain.decider, chain.actions)
    assert not hasattr(guarded, "add_log")
    with caplog.at_level(logging.WARNING), taddons.context() as tctx:
        tctx.master.addons.add(guarded)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
