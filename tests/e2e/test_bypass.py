"""Issue #14 "No bypass": a corpus of ways around the gateway's decisions, each sent from a
device through the tunnel to a fake internet that records every byte it receives
(gateway/lab/recorder.py), under the shipped policies/example.yaml (plus a block rule for
blocked.test and a no-inspect rule for bank.test, the lab's names).

Every refusal case asserts (tests/e2e/bypass_tools.py, check_refused):
(a) no upstream received the blocked host, the case's marker, or (raw cases) any byte;
(b) the access log has a denying record for the connection naming the reason rule id or
    the blocked host, and no later record of the same connection lets it on.
Control cases assert that allowed traffic still arrives, with the allowed Host only, so the
corpus cannot pass by everything being broken.

Classes (ids start with the class number of the issue):
 c1 unrecognised first bytes (plain HTTP after CRLF/space, split request line) -> raw TCP
 c2 odd ClientHello (split at 1/2 bytes, record version 0x0304/0x0305, record fragments)
 c3 the same inside intercepted TLS
 c4 absolute-form target / :authority disagreeing with Host
 c5 malformed authority (bad port, duplicate Host, userinfo)
 c6 a no-inspect SNI as a front to another address
 c7 DNS around the resolver (DoT, DoH by content type)
 c8 SMTP to a private server on a non-mail port after a CRLF
 c9 the gateway host's own services through its other addresses
 c10 further finds (pipelined requests)

Found while writing the corpus, beyond the issue's list: HTTP/2 with two Host fields (the h2
library compares only the last with :authority; mitmproxy judges :authority and relays both,
the blocked one first), an obs-folded Host (`Host: blocked.test` continued by ` :80x` is
judged as one odd name; the upstream reads the first line), DNS over TCP to port 5353 of any
address (mitmproxy takes it for DNS and relays it to that server), and a response-stage
re-decision that logs an enforcer block (internal-destination) as `allow` (c9-tunnel-http).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Callable

import pytest

from gateway.lab.topology import GATEWAY_TUNNEL4, SPARE4, UNDERLAY_GW, UPLINK_GW4, UPLINK_GW6, WEB4, WEB6
from tests.e2e.bypass_tools import (
    ALLOWED, BLOCK_RULES, BLOCKED, DNS_BYPASS, HOST_PORT, INTERNAL, MALFORMED, MISMATCH, NO_INSPECT,
    NO_INSPECT_UNRESOLVED, NO_SNI, UNIDENTIFIED, WEBMAIL, BypassLab, Observation, Observer, bypass_lab,
    check_reached, check_refused, describe, dns_query_wire, http_request, new_marker, wait_for_denial,
)
from tests.e2e.conftest import require_lab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def blab(tmp_path_factory):
    require_lab()
    with bypass_lab(tmp_path_factory, "test_bypass") as lab:
        yield lab


@pytest.fixture(scope="module")
def observer(blab):
    return Observer(blab)


# -- spec builders -------------------------------------------------------------------------
def plain(dst: str, port: int, *segments: str, **extra) -> dict:
    return {"dst": dst, "port": port, "segments": list(segments), **extra}


def tls(dst: str, port: int, sni: str | None, *segments: str, read_timeout: float = 3, **tls_options) -> dict:
    return {"dst": dst, "port": port, "tls": {"sni": sni, **tls_options}, "segments": list(segments),
            "read_timeout": read_timeout}


def req(m: str, host: str | None = BLOCKED, **kw) -> str:
    return http_request(f"/{m}", host, **kw)


def utf8(text: str) -> str:
    """Text as the latin-1 view of its UTF-8 bytes (the probe sends latin-1)."""
    return text.encode().decode("latin-1")


@dataclass(frozen=True)
class Case:
    id: str
    spec: Callable[[str], dict]          # marker -> probe spec
    reasons: tuple[str, ...]             # rule ids the log may give as the reason
    hosts: tuple[str, ...] = (BLOCKED,)  # blocked host(s): never upstream; a log record naming one counts
    nothing_reaches: bool = False        # not one application byte may reach an upstream
    may_drop: bool = False               # nftables may drop it (no handshake) instead of a log record
    parser_refusal: bool = False         # mitmproxy's HTTP parser refuses it before any hook (400 / GOAWAY)
    resolved_by_other_device: Callable[[str], str] | None = None   # marker -> name device 2 looks up first

    def __str__(self) -> str:
        return self.id


RAW = (UNIDENTIFIED, *BLOCK_RULES)     # unidentified, or identified leniently and blocked by its host
AUTH = (MISMATCH, MALFORMED, *BLOCK_RULES)
DNS = (DNS_BYPASS, UNIDENTIFIED, NO_SNI)


def _c1(cid, dst, port, make, hosts=(BLOCKED,), reasons=RAW, read_timeout=3.0):
    return Case(cid, lambda m: plain(dst, port, *make(m), read_timeout=read_timeout), reasons, hosts,
                nothing_reaches=True)


def _rest(m: str, host: str = BLOCKED) -> str:
    return req(m, host)


CASES: list[Case] = [
    # c1: first bytes mitmproxy does not take for HTTP -> raw TCP, judged by (absent) SNI.
    _c1("c1-crlf", WEB4, 80, lambda m: ["\r\n" + _rest(m)]),
    _c1("c1-lf", WEB4, 80, lambda m: ["\n" + _rest(m)]),
    _c1("c1-crlf-crlf", WEB4, 80, lambda m: ["\r\n\r\n" + _rest(m)]),
    _c1("c1-space", WEB4, 80, lambda m: [" " + _rest(m)]),
    _c1("c1-tab", WEB4, 80, lambda m: ["\t" + _rest(m)]),
    _c1("c1-split-G", WEB4, 80, lambda m: ["G", _rest(m)[1:]]),
    _c1("c1-split-GE", WEB4, 80, lambda m: ["GE", _rest(m)[2:]]),
    _c1("c1-split-GET", WEB4, 80, lambda m: ["GET", _rest(m)[3:]]),
    _c1("c1-split-G-crlf", WEB4, 80, lambda m: ["\r\n", "G", _rest(m)[1:]]),
    _c1("c1-crlf-port8080", WEB4, 8080, lambda m: ["\r\n" + _rest(m)]),
    _c1("c1-crlf-ipv6", WEB6, 80, lambda m: ["\r\n" + _rest(m)]),
    _c1("c1-crlf-plaintext-on-443", WEB4, 443, lambda m: ["\r\n" + _rest(m)]),
    _c1("c1-crlf-webmail", WEB4, 80, lambda m: ["\r\n" + _rest(m, WEBMAIL)], hosts=(WEBMAIL,)),
    _c1("c1-ssh-banner-on-443", WEB4, 443, lambda m: [f"SSH-2.0-OpenSSH_9.6 {m}\r\n"], hosts=(),
        reasons=(UNIDENTIFIED,), read_timeout=1.5),
    _c1("c1-binary-on-80", WEB4, 80, lambda m: ["\x00\x01\x02\x03" + m], hosts=(), reasons=(UNIDENTIFIED,),
        read_timeout=1.5),
    _c1("c1-unknown-line-port8443", WEB4, 8443, lambda m: [f"hello-{m}\r\n"], hosts=(), reasons=(UNIDENTIFIED,),
        read_timeout=1.5),
    # c2: a ClientHello mitmproxy does not recognise is relayed untouched (real certificate).
    *[Case(f"c2-{name}", (lambda opts: lambda m: tls(WEB4, 443, BLOCKED, req(m), **opts))(opts), RAW,
           nothing_reaches=True)
      for name, opts in [("split-at-1", {"split": [1]}), ("split-at-2", {"split": [2]}),
                         ("split-at-5", {"split": [5]}), ("split-at-1-and-3", {"split": [1, 3]}),
                         ("record-version-0304", {"record_version": "0304"}),
                         ("record-version-0305", {"record_version": "0305"}),
                         ("record-version-0300", {"record_version": "0300"}),
                         ("record-version-0304-split-at-1", {"record_version": "0304", "split": [1]}),
                         ("records-of-8-bytes", {"fragment": 8}),
                         ("records-of-8-bytes-split-at-2", {"fragment": 8, "split": [2]})]],
    Case("c2-split-at-1-webmail", lambda m: tls(WEB4, 443, WEBMAIL, req(m, WEBMAIL), split=[1]), RAW,
         (WEBMAIL,), nothing_reaches=True),
    Case("c2-split-at-1-port8443", lambda m: tls(WEB4, 8443, BLOCKED, req(m), split=[1]), RAW,
         nothing_reaches=True),
    Case("c2-split-at-2-ipv6", lambda m: tls(WEB6, 443, BLOCKED, req(m), split=[2]), RAW,
         nothing_reaches=True),
    # An SSLv2-format ClientHello (0x80 length byte): unidentified on a web port.
    Case("c2-sslv2-format-hello", lambda m: plain(WEB4, 443, "\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + m,
                                                  read_timeout=1.5),
         (UNIDENTIFIED,), (), nothing_reaches=True),
    # c3: inside intercepted TLS (allowed SNI, or none), the same first-byte tricks.
    *[Case(f"c3-{sni_name}-{name}", (lambda sni, make: lambda m: tls(WEB4, 443, sni, *make(m)))(sni, make),
           (*RAW, NO_SNI), nothing_reaches=True)
      for sni_name, sni in [("sni", ALLOWED), ("nosni", None)]
      for name, make in [("crlf", lambda m: ["\r\n" + _rest(m)]), ("lf", lambda m: ["\n" + _rest(m)]),
                         ("space", lambda m: [" " + _rest(m)]), ("split-G", lambda m: ["G", _rest(m)[1:]]),
                         ("split-GET", lambda m: ["GET", _rest(m)[3:]])]],
    Case("c3-sni-crlf-webmail", lambda m: tls(WEB4, 443, ALLOWED, "\r\n" + _rest(m, WEBMAIL)), RAW, (WEBMAIL,),
         nothing_reaches=True),
    Case("c3-sni-crlf-port8443", lambda m: tls(WEB4, 8443, ALLOWED, "\r\n" + _rest(m)), RAW,
         nothing_reaches=True),
    # c4: absolute-form request target (or :authority) naming another host than Host.
    Case("c4-http", lambda m: plain(WEB4, 80, req(m, ALLOWED, target=f"http://{BLOCKED}/{m}")), AUTH),
    Case("c4-https", lambda m: tls(WEB4, 443, ALLOWED, req(m, ALLOWED, target=f"https://{BLOCKED}/{m}")), AUTH),
    Case("c4-uppercase-scheme-and-host",
         lambda m: plain(WEB4, 80, req(m, ALLOWED, target=f"HTTP://{BLOCKED.upper()}/{m}")), AUTH),
    Case("c4-userinfo", lambda m: plain(WEB4, 80, req(m, "allowed.test", target=f"http://allowed.test@{BLOCKED}/{m}")),
         AUTH, parser_refusal=True),
    Case("c4-trailing-dot", lambda m: plain(WEB4, 80, req(m, ALLOWED, target=f"http://{BLOCKED}./{m}")), AUTH),
    Case("c4-explicit-port", lambda m: plain(WEB4, 80, req(m, ALLOWED, target=f"http://{BLOCKED}:80/{m}")), AUTH),
    Case("c4-http10-without-host", lambda m: plain(WEB4, 80, req(m, None, version="1.0",
                                                                   target=f"http://{BLOCKED}/{m}")), AUTH),
    Case("c4-https-http10-without-host",
         lambda m: tls(WEB4, 443, ALLOWED, req(m, None, version="1.0", target=f"https://{BLOCKED}/{m}")), AUTH),
    Case("c4-ipv6-literal", lambda m: plain(WEB4, 80, req(m, ALLOWED, target=f"http://[{WEB6}]/{m}")),
         (MISMATCH, MALFORMED), ()),
    Case("c4-webmail", lambda m: plain(WEB4, 80, req(m, ALLOWED, target=f"http://{WEBMAIL}/{m}")), AUTH, (WEBMAIL,)),
    Case("c4-h2-authority-blocked", lambda m: {**tls(WEB4, 443, ALLOWED, alpn=["h2"]), "h2": [
        [":method", "GET"], [":scheme", "https"], [":authority", BLOCKED], [":path", f"/{m}"], ["host", ALLOWED]]},
        AUTH, parser_refusal=True),
    Case("c4-h2-host-blocked", lambda m: {**tls(WEB4, 443, ALLOWED, alpn=["h2"]), "h2": [
        [":method", "GET"], [":scheme", "https"], [":authority", ALLOWED], [":path", f"/{m}"], ["host", BLOCKED]]},
        AUTH, parser_refusal=True),
    # The h2 library checks :authority against the *last* Host only; mitmproxy judges
    # :authority and relays both Host fields to an HTTP/1.1 upstream, the blocked one first.
    Case("c4-h2-duplicate-host-blocked-first", lambda m: {**tls(WEB4, 443, ALLOWED, alpn=["h2"]), "h2": [
        [":method", "GET"], [":scheme", "https"], [":authority", ALLOWED], [":path", f"/{m}"], ["host", BLOCKED],
        ["host", ALLOWED]]}, AUTH),
    Case("c4-h2-duplicate-host-webmail-first", lambda m: {**tls(WEB4, 443, ALLOWED, alpn=["h2"]), "h2": [
        [":method", "GET"], [":scheme", "https"], [":authority", ALLOWED], [":path", f"/{m}"], ["host", WEBMAIL],
        ["host", ALLOWED]]}, AUTH, (WEBMAIL,)),
    # c5: malformed authority: mitmproxy keeps the whole text as the host; no rule matches it.
    *[Case(f"c5-{name}", (lambda host: lambda m: plain(WEB4, 80, req(m, host)))(host), AUTH)
      for name, host in [("port-80x", f"{BLOCKED}:80x"), ("port-empty", f"{BLOCKED}:"),
                         ("port-99999", f"{BLOCKED}:99999"), ("port-plus-80", f"{BLOCKED}:+80"),
                         ("port-minus-1", f"{BLOCKED}:-1"), ("space-before-port", f"{BLOCKED}: 80"),
                         ("tab-before-port", f"{BLOCKED}\t:80"), ("port-hex", f"{BLOCKED}:0x50"),
                         ("port-fullwidth-digits", utf8(f"{BLOCKED}:８０")),
                         ("host-list", f"{ALLOWED}, {BLOCKED}"), ("userinfo", f"{ALLOWED}@{BLOCKED}"),
                         ("uppercase-port-80x", f"{BLOCKED.upper()}:80x")]],
    Case("c5-port-plus-443-tls", lambda m: tls(WEB4, 443, ALLOWED, req(m, f"{BLOCKED}:+443")), AUTH),
    Case("c5-port-80x-tls", lambda m: tls(WEB4, 443, ALLOWED, req(m, f"{BLOCKED}:80x")), AUTH),
    Case("c5-webmail-port-80x", lambda m: plain(WEB4, 80, req(m, f"{WEBMAIL}:80x")), AUTH, (WEBMAIL,)),
    Case("c5-duplicate-host-allowed-first",
         lambda m: plain(WEB4, 80, req(m, ALLOWED, extra=f"Host: {BLOCKED}\r\n")), AUTH),
    Case("c5-duplicate-host-blocked-first",
         lambda m: plain(WEB4, 80, req(m, BLOCKED, extra=f"Host: {ALLOWED}\r\n")), AUTH),
    Case("c5-h2-authority-port-80x", lambda m: {**tls(WEB4, 443, ALLOWED, alpn=["h2"]), "h2": [
        [":method", "GET"], [":scheme", "https"], [":authority", f"{BLOCKED}:80x"], [":path", f"/{m}"]]}, AUTH, parser_refusal=True),
    # obs-fold (a header line continued on the next line): the first line is all a server
    # that ignores the fold sees; mitmproxy judges the folded whole.
    Case("c5-obs-fold-port", lambda m: plain(WEB4, 80, req(m, f"{BLOCKED}\r\n :80x")), AUTH),
    Case("c5-obs-fold-after-allowed", lambda m: plain(WEB4, 80, req(m, f"{BLOCKED}\r\n {ALLOWED}")), AUTH),
    Case("c5-empty-host-with-port", lambda m: plain(WEB4, 80, req(m, ":80")), (MALFORMED,), ()),
    # c6: the SNI of a no-inspect host to an address the gateway's resolver never gave it.
    Case("c6-front-to-other-address", lambda m: {**tls(SPARE4, 443, NO_INSPECT, req(m)), "resolve": [NO_INSPECT]},
         (NO_INSPECT_UNRESOLVED,), nothing_reaches=True),
    Case("c6-front-to-other-address-port8443",
         lambda m: {**tls(SPARE4, 8443, NO_INSPECT, req(m)), "resolve": [NO_INSPECT]},
         (NO_INSPECT_UNRESOLVED,), nothing_reaches=True),
    Case("c6-subdomain-never-resolved", lambda m: tls(SPARE4, 443, f"x{m}.{NO_INSPECT}", req(m)),
         (NO_INSPECT_UNRESOLVED,), nothing_reaches=True),
    Case("c6-uppercase-sni-trailing-dot",
         lambda m: {**tls(SPARE4, 443, NO_INSPECT.upper() + ".", req(m)), "resolve": [NO_INSPECT]},
         (NO_INSPECT_UNRESOLVED,), nothing_reaches=True),
    Case("c6-resolved-by-another-device", lambda m: tls(WEB4, 443, f"y{m}.{NO_INSPECT}", req(m)),
         (NO_INSPECT_UNRESOLVED,), nothing_reaches=True, resolved_by_other_device=lambda m: f"y{m}.{NO_INSPECT}"),
    Case("c6-front-webmail", lambda m: {**tls(SPARE4, 443, NO_INSPECT, req(m, WEBMAIL)), "resolve": [NO_INSPECT]},
         (NO_INSPECT_UNRESOLVED,), (WEBMAIL,), nothing_reaches=True),
    # c7: DNS around the gateway's resolver.
    Case("c7-dot-without-sni", lambda m: tls(WEB4, 853, None, dns_query_wire(f"{m}.{BLOCKED}", tcp=True),
                                             read_timeout=1.5), DNS, (), nothing_reaches=True),
    Case("c7-dot-allowed-sni", lambda m: tls(WEB4, 853, ALLOWED, dns_query_wire(f"{m}.{BLOCKED}", tcp=True),
                                             read_timeout=1.5), DNS, (), nothing_reaches=True),
    Case("c7-dot-other-address", lambda m: tls(SPARE4, 853, None, dns_query_wire(f"{m}.{BLOCKED}", tcp=True),
                                               read_timeout=1.5), DNS, (), nothing_reaches=True),
    Case("c7-dot-ipv6", lambda m: tls(WEB6, 853, None, dns_query_wire(f"{m}.{BLOCKED}", tcp=True), read_timeout=1.5),
         DNS, (), nothing_reaches=True),
    Case("c7-plain-dns-over-tcp-port853", lambda m: plain(WEB4, 853, dns_query_wire(f"{m}.{BLOCKED}", tcp=True),
                                                          read_timeout=1.5), DNS, (), nothing_reaches=True),
    # DNS over TCP to port 5353 of any address: mitmproxy takes it for DNS and relays it there.
    Case("c7-dns-tcp-port5353-allowed-name", lambda m: plain(SPARE4, 5353, dns_query_wire(f"{m}.example.test", tcp=True),
                                                             read_timeout=1.5), DNS, (), nothing_reaches=True),
    Case("c7-dns-tcp-port5353-blocked-name", lambda m: plain(SPARE4, 5353, dns_query_wire(f"{m}.{BLOCKED}", tcp=True),
                                                             read_timeout=1.5), (*DNS, *BLOCK_RULES), (),
         nothing_reaches=True),
    Case("c7-doh-post", lambda m: tls(WEB4, 443, ALLOWED, http_request(
        f"/dns-query?m={m}", ALLOWED, method="POST", extra="Content-Type: application/dns-message\r\n",
        body=dns_query_wire(f"{m}.{BLOCKED}", tcp=False))), (DNS_BYPASS,), (), nothing_reaches=True),
    Case("c7-doh-post-plain-http", lambda m: plain(WEB4, 80, http_request(
        f"/dns-query?m={m}", ALLOWED, method="POST", extra="Content-Type: application/dns-message\r\n",
        body=dns_query_wire(f"{m}.{BLOCKED}", tcp=False))), (DNS_BYPASS,), (), nothing_reaches=True),
    Case("c7-doh-post-odd-path-and-case", lambda m: tls(WEB4, 443, ALLOWED, http_request(
        f"/api/{m}", ALLOWED, method="POST", extra="Content-Type: Application/DNS-Message; charset=binary\r\n",
        body=dns_query_wire(f"{m}.{BLOCKED}", tcp=False))), (DNS_BYPASS,), (), nothing_reaches=True),
    Case("c7-doh-post-json", lambda m: tls(WEB4, 443, ALLOWED, http_request(
        f"/resolve?m={m}", ALLOWED, method="POST", extra="Content-Type: application/dns-json\r\n",
        body=f'{{"name":"{m}.{BLOCKED}","type":"A"}}')), (DNS_BYPASS,), (), nothing_reaches=True),
    # c8: SMTP to a private server on a non-mail port, after a CRLF (raw TCP today).
    *[Case(f"c8-{name}", (lambda dst, make: lambda m: plain(dst, 2525, *make(m), read_timeout=1.5))(dst, make),
           (UNIDENTIFIED,), (), nothing_reaches=True)
      for name, dst, make in [
          ("crlf-ehlo", SPARE4, lambda m: [f"\r\nEHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<{m}@private.test>\r\n"]),
          ("lf-ehlo", SPARE4, lambda m: [f"\nEHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<{m}@private.test>\r\n"]),
          ("split-EH", SPARE4, lambda m: ["EH", f"LO x\r\nMAIL FROM:<{m}@x.test>\r\n"]),
          ("space-helo-web-address", WEB4, lambda m: [f" HELO x\r\nMAIL FROM:<{m}@x.test>\r\n"]),
          ("crlf-data", SPARE4, lambda m: [f"\r\nDATA\r\nSubject: {m}\r\n\r\nbody\r\n.\r\n"])]],
    # c9: the gateway host's own listener (0.0.0.0 / ::) through its other addresses.
    *[Case(f"c9-{name}", (lambda spec: spec)(spec), (INTERNAL,), (), nothing_reaches=True, may_drop=True)
      for name, spec in [
          ("uplink-http", lambda m: plain(UPLINK_GW4, HOST_PORT, req(m, ALLOWED), connect_timeout=2)),
          ("uplink-crlf-raw", lambda m: plain(UPLINK_GW4, HOST_PORT, "\r\n" + req(m, ALLOWED), connect_timeout=2)),
          ("uplink-tls", lambda m: {**tls(UPLINK_GW4, HOST_PORT, ALLOWED, req(m, ALLOWED)), "connect_timeout": 2}),
          ("uplink-ipv6-http", lambda m: plain(UPLINK_GW6, HOST_PORT, req(m, ALLOWED), connect_timeout=2)),
          # Not here: the gateway's underlay address. The device reaches it on its own network
          # (that is how WireGuard is reached), never through the tunnel, so it is the host
          # firewall's concern (only the WireGuard port and enrollment there), not the proxy's.
          ("tunnel-http", lambda m: plain(GATEWAY_TUNNEL4, HOST_PORT, req(m, ALLOWED), connect_timeout=2)),
          ("loopback-http", lambda m: plain("127.0.0.1", HOST_PORT, req(m, ALLOWED), connect_timeout=2))]],
    # c10: a second, pipelined request on a connection whose first request is allowed.
    Case("c10-pipelined-second-request", lambda m: plain(WEB4, 80, http_request("/first", ALLOWED).replace(
        "Connection: close\r\n", "") + req(m)), BLOCK_RULES),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_refused(blab: BypassLab, observer: Observer, case: Case):
    marker = new_marker()
    device = blab.devices[0]
    if case.resolved_by_other_device is not None:
        from tests.e2e.bypass_tools import run_probe
        run_probe(blab.devices[1], {"dst": None, "resolve": [case.resolved_by_other_device(marker)]})
    obs = observer.run(device, case.spec(marker))
    check_refused(blab, device, obs, forbidden=(*case.hosts, marker), reasons=case.reasons, hosts=case.hosts,
                  nothing_reaches=case.nothing_reaches, may_drop=case.may_drop, parser_refusal=case.parser_refusal)


# -- DoH by GET: the query leaves as a URL, so the answer is what must be refused ------------
@pytest.mark.parametrize("path,accept", [
    ("/dns-query?dns={q}&m={m}", "application/dns-message"),
    ("/resolve?name={m}.blocked.test&type=A", "application/dns-json"),
], ids=["c7-doh-get-wire", "c7-doh-get-json"])
def test_doh_answer_is_refused(blab: BypassLab, observer: Observer, path: str, accept: str):
    marker = new_marker()
    q = base64.urlsafe_b64encode(dns_query_wire(f"{marker}.{BLOCKED}", tcp=False).encode("latin-1")).decode().rstrip("=")
    device = blab.devices[0]
    obs = observer.run(device, tls(WEB4, 443, ALLOWED, http_request(path.format(q=q, m=marker), ALLOWED,
                                                                     extra=f"Accept: {accept}\r\n")))
    obs.records = wait_for_denial(blab, device, obs.result["sport"], (DNS_BYPASS,), ())
    assert "DNSANSWER" not in obs.result["response"], "BYPASS: the device got the DoH answer\n" + describe(obs)
    assert any(r.get("rule.id") == DNS_BYPASS for r in obs.records), describe(obs)


# -- odd ClientHellos with an allowed name: the session must still be inspected --------------
@pytest.mark.parametrize("opts", [{"split": [1]}, {"split": [2]}, {"split": [5]}, {"record_version": "0304"},
                                  {"record_version": "0305"}, {"record_version": "0300"}, {"fragment": 8},
                                  {"fragment": 8, "split": [2]}],
                         ids=["c2-split-at-1", "c2-split-at-2", "c2-split-at-5", "c2-record-version-0304",
                              "c2-record-version-0305", "c2-record-version-0300", "c2-records-of-8-bytes",
                              "c2-records-of-8-bytes-split-at-2"])
def test_odd_client_hello_is_still_intercepted(blab: BypassLab, observer: Observer, opts: dict):
    marker = new_marker()
    obs = observer.run(blab.devices[0], tls(WEB4, 443, ALLOWED, req(marker, ALLOWED), **opts))
    assert obs.result["tls_established"], describe(obs)
    assert obs.result["peer_cert_sha256"] != blab.recorder_cert_sha256, \
        "BYPASS: the device got the upstream's own certificate: the session was relayed uninspected\n" + describe(obs)
    check_reached(blab, obs, marker=marker, host=ALLOWED, sni=ALLOWED)


# -- controls: what must keep working --------------------------------------------------------
CONTROLS: list[tuple[str, Callable[[str], dict], str]] = [
    ("http", lambda m: plain(WEB4, 80, req(m, ALLOWED)), ALLOWED),
    ("http-port-in-host", lambda m: plain(WEB4, 80, req(m, f"{ALLOWED}:80")), f"{ALLOWED}:80"),
    ("http-port8080", lambda m: plain(WEB4, 8080, req(m, f"{ALLOWED}:8080")), f"{ALLOWED}:8080"),
    ("http-ipv6", lambda m: plain(WEB6, 80, req(m, ALLOWED)), ALLOWED),
    ("http-absolute-form-same-host", lambda m: plain(WEB4, 80, req(m, ALLOWED, target=f"http://{ALLOWED}/{m}")),
     ALLOWED),
    ("https", lambda m: tls(WEB4, 443, ALLOWED, req(m, ALLOWED)), ALLOWED),
    ("https-h2", lambda m: {**tls(WEB4, 443, ALLOWED, alpn=["h2"]), "h2": [
        [":method", "GET"], [":scheme", "https"], [":authority", ALLOWED], [":path", f"/{m}"]]}, ALLOWED),
    ("https-json-post", lambda m: tls(WEB4, 443, ALLOWED, http_request(
        f"/api/{m}", ALLOWED, method="POST", extra="Content-Type: application/json\r\n", body='{"a":1}')), ALLOWED),
]


@pytest.mark.parametrize("name,spec,host", CONTROLS, ids=[f"control-{c[0]}" for c in CONTROLS])
def test_control_allowed_request_reaches_the_upstream(blab: BypassLab, observer: Observer, name, spec, host):
    marker = new_marker()
    obs = observer.run(blab.devices[0], spec(marker))
    check_reached(blab, obs, marker=marker, host=host)
    if obs.result["tls_established"]:
        assert obs.result["peer_cert_sha256"] != blab.recorder_cert_sha256, "an allowed host is inspected"


def test_control_no_inspect_host_is_relayed_untouched_to_its_resolved_address(blab: BypassLab, observer: Observer):
    marker = new_marker()
    obs = observer.run(blab.devices[0], {**tls(WEB4, 443, NO_INSPECT, req(marker, NO_INSPECT)),
                                         "resolve": [NO_INSPECT]})
    assert obs.result["peer_cert_sha256"] == blab.recorder_cert_sha256, "no-inspect must not be intercepted\n" \
        + describe(obs)
    check_reached(blab, obs, marker=marker, host=NO_INSPECT, sni=NO_INSPECT)


@pytest.mark.parametrize("spec", [
    lambda m: plain(WEB4, 80, req(m)),
    lambda m: tls(WEB4, 443, BLOCKED, req(m)),
    lambda m: tls(WEB4, 443, ALLOWED, req(m)),
    lambda m: plain(WEB4, 80, req(m, WEBMAIL)),
], ids=["control-blocked-http", "control-blocked-sni", "control-blocked-host-in-tls", "control-webmail-http"])
def test_control_plainly_blocked_request_is_refused(blab: BypassLab, observer: Observer, spec):
    marker = new_marker()
    hosts = (WEBMAIL,) if "gmail" in str(spec(marker)) else (BLOCKED,)
    obs = observer.run(blab.devices[0], spec(marker))
    check_refused(blab, blab.devices[0], obs, forbidden=(*hosts, marker), reasons=BLOCK_RULES, hosts=hosts)
    assert " 403 " in obs.result["response"].split("\r\n", 1)[0], describe(obs)
