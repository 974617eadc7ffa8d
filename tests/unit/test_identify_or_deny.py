"""Issue #14, "identify or deny", at unit level: first-byte identification, the strict
authority parser, the strictest-wins verdict rule, DNS bindings for no-inspect, the DNS
bypass guard, and the enforcer's refusal of unidentified traffic. The same invariants are
driven through the tunnel by tests/e2e/test_bypass*.py."""

from __future__ import annotations

import ipaddress
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from addons.dnsguard import DnsBypassGuard, NoInspectBinding
from addons.enforce import Enforcer
from addons.flowverdict import record_verdict
from gateway.proxy.flowstate import METADATA_VERDICT
from addons.requesttarget import RequestAuthority
from gateway.proxy.authority import MalformedAuthority, parse_authority
from gateway.proxy.connections import PROTOCOL_UNIDENTIFIED, LiveConnections
from gateway.hostname import canonical_address
from gateway.proxy.dnsbinding import DnsBindings
from gateway.proxy.firstbytes import MAX_IDENTIFY_BYTES, Kind, classify, normalized_record_versions
from gateway.metrics import GatewayMetrics
from gateway.verdict import (RULE_AUTHORITY_MISMATCH, RULE_DNS_BYPASS, RULE_MALFORMED_AUTHORITY,
                             RULE_NO_INSPECT_UNRESOLVED, RULE_UNIDENTIFIED_PROTOCOL, Action, Stage, Verdict, strictest)

from tests.unit.test_addons import DEVICE, HELPDESK, INTERNAL


def client_hello(sni: str = "allowed.test") -> bytes:
    """The first flight of a real TLS client (Python's ssl), as it goes on the wire."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# ---- first bytes -------------------------------------------------------------------------------

def test_a_client_hello_is_tls_only_once_complete_however_it_is_split():
    hello = client_hello()
    assert classify(hello) is Kind.TLS
    for cut in range(1, len(hello)):
        assert classify(hello[:cut]) is Kind.NEED_MORE, cut


def test_a_client_hello_spread_over_two_records_is_tls():
    hello = client_hello()
    body = hello[5:]
    half = len(body) // 2
    two = hello[:3] + half.to_bytes(2, "big") + body[:half] + hello[:3] + (len(body) - half).to_bytes(2, "big") + body[half:]
    assert classify(two) is Kind.TLS


@pytest.mark.parametrize("minor", [0x00, 0x04, 0x05, 0xFF])
def test_tls_does_not_depend_on_the_record_version(minor):
    hello = client_hello()
    odd = hello[:2] + bytes([minor]) + hello[3:]
    assert classify(odd) is Kind.TLS
    fixed = normalized_record_versions(odd)
    if minor > 3:
        assert fixed == hello[:2] + b"\x01" + hello[3:]    # what mitmproxy's TLS layer then reads
        assert classify(fixed) is Kind.TLS
    else:
        assert fixed is None


def test_normalization_rewrites_every_record_of_a_split_client_hello():
    hello = client_hello()
    body = hello[5:]
    half = len(body) // 2
    odd = b"\x16\x03\x04" + half.to_bytes(2, "big") + body[:half] + b"\x16\x03\x05" + (len(body) - half).to_bytes(2, "big") + body[half:]
    fixed = normalized_record_versions(odd)
    assert fixed[:3] == b"\x16\x03\x01" and fixed[5 + half: 8 + half] == b"\x16\x03\x01"
    assert fixed[5:5 + half] == body[:half] and classify(fixed) is Kind.TLS


@pytest.mark.parametrize("version", [b"\x02\x00", b"\x04\x01", b"\x00\x03"])
def test_a_record_whose_major_version_is_not_3_is_not_tls(version):
    hello = client_hello()
    assert classify(hello[:1] + version + hello[3:]) is Kind.UNIDENTIFIED


def test_a_handshake_record_that_is_not_a_client_hello_is_unidentified():
    hello = bytearray(client_hello())
    hello[5] = 0x02   # ServerHello
    assert classify(bytes(hello)) is Kind.UNIDENTIFIED


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"POST /upload?x=1 HTTP/1.0\r\n", b"GET http://a.test/ HTTP/1.1\n",
    b"PROPFIND /dav HTTP/1.1\r\n", b"VERSION-CONTROL /x HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n",
])
def test_well_formed_request_lines_are_http(line):
    assert classify(line) is Kind.HTTP
    end = line.index(b"\n")
    for cut in range(1, end):
        assert classify(line[:cut]) is Kind.NEED_MORE, line[:cut]


@pytest.mark.parametrize("data", [
    b"\r\nGET / HTTP/1.1\r\n", b"\nGET / HTTP/1.1\r\n", b" GET / HTTP/1.1\r\n", b"get / HTTP/1.1\r\n",
    b"GET  / HTTP/1.1\r\n", b"GET\t/ HTTP/1.1\r\n", b"GET / HTTP/1.2\r\n", b"GET / HTTP/2\r\n", b"GET /\r\n",
    b"GET / HTTP/1.1 extra\r\n", b"EHLO x\r\n", b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x1c\x12\x34",
    b"GET /\x01 HTTP/1.1\r\n", b"\xffGET", b"GETTTTTTTTTTTTTTTTTTTTTTTTTTTTTT / HTTP/1.1\r\n",
])
def test_what_is_neither_tls_nor_http_is_unidentified(data):
    assert classify(data) is Kind.UNIDENTIFIED


def test_identification_gives_up_at_its_byte_limit():
    assert classify(b"GET /" + b"a" * MAX_IDENTIFY_BYTES) is Kind.UNIDENTIFIED
    big = b"\x16\x03\x01\x40\x00" + b"\x01" + (MAX_IDENTIFY_BYTES).to_bytes(3, "big")
    assert classify(big) is Kind.UNIDENTIFIED


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_a_decision_never_changes_once_made(head, tail):
    """More bytes never turn a decided connection into another kind (no "wait and see"
    that an attacker could steer after the gateway chose a layer)."""
    first = classify(head)
    if first is not Kind.NEED_MORE and head:
        assert classify(head + tail) is first


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sampled_from([b"\r\n", b"\n", b" ", b"\t", b"\r\n\r\n", b"\x00"]),
       st.sampled_from([b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n", b"POST /x HTTP/1.0\r\n\r\n"]))
def test_junk_before_a_request_is_never_http(junk, request_bytes):
    assert classify(junk + request_bytes) is Kind.UNIDENTIFIED


# ---- authority ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,host,port", [
    ("allowed.test", "allowed.test", None), ("Allowed.Test.", "allowed.test", None),
    ("allowed.test:8080", "allowed.test", 8080), ("[2001:db8::1]:443", "2001:db8::1", 443),
    ("198.51.100.80", "198.51.100.80", None), ("xn--fa-hia.de", "xn--fa-hia.de", None), ("a_b.test", "a_b.test", None),
])
def test_sound_authorities(text, host, port):
    assert parse_authority(text) == (parse_authority(text).__class__(host, port))


@pytest.mark.parametrize("text", [
    "", "allowed.test:", "allowed.test:80x", "allowed.test:99999", "allowed.test:+443", "allowed.test:-1",
    "allowed.test:0", "allowed.test :80", "allowed.test\t", " allowed.test", "allowed.test:80:80",
    "user@allowed.test", "allowed.test/path", "allowed.test?x", "2001:db8::1", "[2001:db8::1", "[zz]:80",
    "[2001:db8::1]x", ":80", "allowed..test", ".allowed.test", "a\x00b.test", "a%20b.test", "allowed.test:0080000",
])
def test_malformed_authorities(text):
    with pytest.raises(MalformedAuthority):
        parse_authority(text)


def _request(host_headers=(), authority: str = "", http2: bool = False):
    flow = tflow.tflow()
    req = flow.request
    req.headers.clear()
    for h in host_headers:
        req.headers.add("Host", h)
    req.authority = authority
    if http2:
        req.http_version = "HTTP/2.0"
    return flow


def test_absolute_form_for_another_host_is_a_mismatch():
    verdict = RequestAuthority.check(_request(["allowed.test"], "blocked.test").request)
    assert verdict.rule_id == RULE_AUTHORITY_MISMATCH and not verdict.passes


def test_absolute_form_with_a_matching_host_goes_upstream_in_origin_form():
    flow = _request(["allowed.test"], "allowed.test:80")
    assert RequestAuthority.check(flow.request) is None
    assert flow.request.authority == "" and flow.request.headers["Host"] == "allowed.test"


def test_absolute_form_without_host_gets_the_judged_host_header():
    flow = _request([], "blocked.test")
    assert RequestAuthority.check(flow.request) is None
    assert flow.request.authority == "" and flow.request.headers["Host"] == "blocked.test"
    assert flow.request.pretty_host == "blocked.test"   # what the policy then judges


@pytest.mark.parametrize("hosts,authority", [
    (["allowed.test:80x"], ""), (["allowed.test:"], ""), (["allowed.test", "blocked.test"], ""),
    (["allowed.test:+443"], ""), ([""], ""), (["allowed.test"], "blocked.test:99999"),
])
def test_malformed_host_or_target_is_refused(hosts, authority):
    verdict = RequestAuthority.check(_request(hosts, authority).request)
    assert verdict.rule_id == RULE_MALFORMED_AUTHORITY


def test_http2_authority_and_host_must_agree():
    verdict = RequestAuthority.check(_request(["blocked.test"], "allowed.test", http2=True).request)
    assert verdict.rule_id == RULE_AUTHORITY_MISMATCH


# ---- verdicts combine: the strictest wins ----------------------------------------------------------

BLOCK = Verdict(Action.BLOCK, "r-block", "x", Stage.TLS)
ALLOW = Verdict(Action.ALLOW, "r-allow", "y", Stage.REQUEST)


def test_a_later_pass_never_loosens_a_block():
    assert strictest(BLOCK, ALLOW) is BLOCK
    assert strictest(ALLOW, BLOCK) is BLOCK
    assert strictest(None, ALLOW) is ALLOW
    later = Verdict(Action.MONITOR, None, "z", Stage.RESPONSE)
    assert strictest(ALLOW, later) is later
    other_block = Verdict(Action.BLOCK, "r-other", "w", Stage.REQUEST)
    assert strictest(BLOCK, other_block) is BLOCK     # the first block keeps its rule and reason


def test_a_connection_block_holds_for_every_later_request_of_the_connection():
    connections = LiveConnections()
    flow = tflow.tflow()
    state = connections.open(flow.client_conn.id, "10.77.0.2", 40000, DEVICE)
    state.record(BLOCK)      # e.g. the SNI was blocked
    assert record_verdict(flow, ALLOW, connections) is BLOCK
    assert flow.metadata[METADATA_VERDICT] is BLOCK


# ---- the enforcer: unidentified traffic ----------------------------------------------------------

def _tcp(connections, protocol, allowed_by=None, verdict=ALLOW):
    flow = tflow.ttcpflow()
    flow.server_conn.address = ("198.51.100.90", 7000)
    state = connections.open(flow.client_conn.id, "10.77.0.2", 40000, DEVICE)
    state.protocol, state.unidentified_allowed_by = protocol, allowed_by
    flow.metadata[METADATA_VERDICT] = verdict._replace(stage=Stage.TCP) if hasattr(verdict, "_replace") else \
        Verdict(verdict.action, verdict.rule_id, verdict.explain, Stage.TCP)
    state.record(flow.metadata[METADATA_VERDICT])
    return flow, state


def test_unidentified_traffic_is_refused_unless_a_destination_rule_allowed_it():
    connections = LiveConnections()
    enforcer = Enforcer(connections, GatewayMetrics(), HELPDESK, INTERNAL, lambda _c: None)
    flow, state = _tcp(connections, PROTOCOL_UNIDENTIFIED)
    enforcer.tcp_start(flow)
    assert flow.metadata[METADATA_VERDICT].rule_id == RULE_UNIDENTIFIED_PROTOCOL
    assert not state.may_connect_upstream
    allowed, state2 = _tcp(connections, PROTOCOL_UNIDENTIFIED, allowed_by="approved-sftp")
    enforcer.tcp_start(allowed)
    assert allowed.metadata[METADATA_VERDICT].passes and state2.may_connect_upstream
    mail, state3 = _tcp(connections, "mail")
    enforcer.tcp_start(mail)
    assert mail.metadata[METADATA_VERDICT].passes


# ---- no-inspect only to what our resolver said ---------------------------------------------------

def test_dns_bindings_expire_and_are_per_device_and_name():
    now = [0.0]
    b = DnsBindings(clock=lambda: now[0], min_seconds=10, max_seconds=100, per_device=2)
    dev, other = ipaddress.ip_address("10.77.0.2"), ipaddress.ip_address("10.77.0.3")
    addr = ipaddress.ip_address("198.51.100.80")
    b.bind(dev, "bank.test", addr, ttl=5)
    assert b.resolved(dev, "bank.test", addr)
    assert not b.resolved(other, "bank.test", addr)
    assert not b.resolved(dev, "blocked.test", addr)
    now[0] = 11
    assert not b.resolved(dev, "bank.test", addr)       # 5 s TTL kept for the 10 s minimum
    for i in range(3):
        b.bind(dev, f"n{i}.test", addr, ttl=50)
    assert not b.resolved(dev, "n0.test", addr) and b.resolved(dev, "n2.test", addr)   # capped per device
    assert canonical_address("::ffff:198.51.100.80") == addr


def test_no_inspect_to_an_address_the_resolver_did_not_give_is_intercepted_and_blocked():
    from mitmproxy import tls as mtls
    from mitmproxy.test import tutils  # noqa: F401  (tflow builds the connection objects)

    connections = LiveConnections()
    guard = NoInspectBinding(connections)
    client = tflow.tclient_conn()
    client.peername = ("10.77.0.2", 40000)
    state = connections.open(client.id, "10.77.0.2", 40000, DEVICE)
    state.tls_verdict = Verdict(Action.NO_INSPECT, "bank", "no-inspect", Stage.TLS)
    server = tflow.tserver_conn()
    server.address = ("198.51.100.99", 443)
    ctx = type("Ctx", (), {"client": client, "server": server})()
    hello = type("Hello", (), {"sni": "bank.test"})()
    data = mtls.ClientHelloData(ctx, hello)
    data.ignore_connection = True
    guard.tls_clienthello(data)
    assert data.ignore_connection is False
    assert state.tls_verdict.rule_id == RULE_NO_INSPECT_UNRESOLVED
    assert state.connection_block is not None
    # After the resolver gave that address for that name to this device, it passes untouched.
    guard.bindings.bind(ipaddress.ip_address("10.77.0.2"), "bank.test", ipaddress.ip_address("198.51.100.99"), 60)
    state2 = connections.open("c2", "10.77.0.2", 40001, DEVICE)
    state2.tls_verdict = Verdict(Action.NO_INSPECT, "bank", "no-inspect", Stage.TLS)
    client.id = "c2"
    data2 = mtls.ClientHelloData(ctx, hello)
    data2.ignore_connection = True
    guard.tls_clienthello(data2)
    assert data2.ignore_connection is True and state2.connection_block is None


# ---- DNS over HTTPS / TLS ------------------------------------------------------------------------

@pytest.mark.parametrize("header,value", [("content-type", "application/dns-message"),
                                          ("accept", "text/html, application/dns-message;q=0.9"),
                                          ("content-type", "Application/DNS-JSON; charset=utf-8")])
def test_doh_requests_are_blocked_unless_a_rule_names_the_content_type(header, value):
    connections = LiveConnections()
    flow = tflow.tflow()
    flow.request.headers[header] = value
    flow.metadata[METADATA_VERDICT] = Verdict(Action.ALLOW, "corp-resolver", "x", Stage.REQUEST)
    DnsBypassGuard(connections).requestheaders(flow)
    assert flow.metadata[METADATA_VERDICT].rule_id == RULE_DNS_BYPASS
    info = type("Info", (), {"allows_dns_messages": True})()
    flow2 = tflow.tflow()
    flow2.request.headers[header] = value
    flow2.metadata[METADATA_VERDICT] = Verdict(Action.ALLOW, "corp-resolver", "x", Stage.REQUEST)
    DnsBypassGuard(connections, rule_info=lambda rule_id: info).requestheaders(flow2)
    assert flow2.metadata[METADATA_VERDICT].rule_id == "corp-resolver"


def test_a_doh_get_without_accept_header_is_blocked_at_the_request():
    connections = LiveConnections()
    flow = tflow.tflow()
    flow.request.path = "/dns-query?dns=AAABAAABAAAAAAAAB2V4YW1wbGUDY29tAAABAAE"
    flow.metadata[METADATA_VERDICT] = Verdict(Action.ALLOW, None, "default", Stage.REQUEST)
    DnsBypassGuard(connections).requestheaders(flow)
    assert flow.metadata[METADATA_VERDICT].rule_id == RULE_DNS_BYPASS
    plain = tflow.tflow()
    plain.request.path = "/search?dns=short"
    plain.metadata[METADATA_VERDICT] = Verdict(Action.ALLOW, None, "default", Stage.REQUEST)
    DnsBypassGuard(connections).requestheaders(plain)
    assert plain.metadata[METADATA_VERDICT].passes


def test_doh_responses_are_blocked_and_dot_is_refused_except_to_configured_resolvers():
    connections = LiveConnections()
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "application/dns-message"
    flow.metadata[METADATA_VERDICT] = Verdict(Action.ALLOW, None, "default", Stage.REQUEST)
    DnsBypassGuard(connections).responseheaders(flow)
    assert flow.metadata[METADATA_VERDICT].rule_id == RULE_DNS_BYPASS
    assert flow.metadata[METADATA_VERDICT].stage is Stage.RESPONSE
    tcp = tflow.ttcpflow()
    tcp.server_conn.address = ("198.51.100.53", 853)
    DnsBypassGuard(connections).tcp_start(tcp)
    assert tcp.metadata[METADATA_VERDICT].rule_id == RULE_DNS_BYPASS
    ok = tflow.ttcpflow()
    ok.server_conn.address = ("198.51.100.53", 853)
    DnsBypassGuard(connections, dot_resolvers=["198.51.100.53"]).tcp_start(ok)
    assert METADATA_VERDICT not in ok.metadata
