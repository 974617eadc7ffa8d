"""Cost oracle (tests/fuzz/cost.py) for the gateway's own parsers of attacker bytes
(issue #15): first-byte identification, the authority parser and the request-authority
check, URL and host normalization, a policy decision over a long URL (RE2, through the
gateway's own request_query + decide), DNS-binding bookkeeping. Each input shape is a long run, many pieces, or a
deep structure; what is measured is CPU time of n, 2n, 4n. The mail parsers have their own
file (test_mail_cost.py); the operator-file loaders are in tests/unit/test_load_bounds.py."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from mitmproxy.test import tflow

from addons.requesttarget import RequestAuthority
from gateway.proxy.authority import MalformedAuthority, parse_authority
from gateway.proxy.dnsbinding import DnsBindings
from gateway.proxy.firstbytes import classify
from gateway.policy.query import request_query
from gateway.hostname import normalize_host
from gateway.policy import DeviceContext, load_policy
from gateway.policy.query import normalize_url
from tests.fuzz.cost import assert_linear

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = load_policy(ROOT / "policies" / "example.yaml")
DEVICE = DeviceContext("phone-1", frozenset({"staff"}), "org")
NOW = dt.datetime(2026, 12, 5, 3, 0, tzinfo=dt.UTC)


def _authority(text: str) -> None:
    try:
        parse_authority(text)
    except MalformedAuthority:
        pass


def _request_with_headers(n: int):
    flow = tflow.tflow()
    for i in range(n):
        flow.request.headers.add(f"X-Filler-{i}", "v" * 20)
    flow.request.headers["Host"] = "www.example.test"
    return flow.request


def _bindings(n: int) -> list:
    device = ipaddress.ip_address("10.77.0.2")
    return [(device, f"n{i}.example.test", ipaddress.ip_address(f"198.51.{i // 250 % 250}.{i % 250 + 1}"))
            for i in range(n)]


def _bind_all(items) -> None:
    b = DnsBindings(per_device=1_000_000)
    for device, name, address in items:
        b.bind(device, name, address, 60)
    for device, name, address in items:
        b.resolved(device, name, address)


def _gateway_decide(url: str):
    """The decision as addons/policy.py makes it for a request (host and URL as mitmproxy
    gives them)."""
    host = url.split("/", 3)[2]
    return SNAPSHOT.decide(request_query(DEVICE, host, url, "https", "GET", None, 443, None, None, NOW))


CASES = {
    # identification: the classifier walks what arrived once (its caps make long input constant)
    "firstbytes/request-line": (lambda n: b"GET /" + b"a" * n, classify, 2_000),
    "firstbytes/records": (lambda n: b"\x16\x03\x01\x00\x01\x01" * n, classify, 600),
    "firstbytes/junk": (lambda n: b"\x00" * n, classify, 2_000),
    # authority: long host, many labels, many colons, brackets
    "authority/labels": (lambda n: ".".join(["a"] * n) + ":80", _authority, 100),
    "authority/colons": (lambda n: "a" + ":" * n, _authority, 200),
    "authority/ipv6": (lambda n: "[" + "1:" * n + "]", _authority, 200),
    "request-authority/headers": (_request_with_headers, RequestAuthority.check, 2_000),
    # normalization of what devices send
    "hostname/labels": (lambda n: ".".join(["Label"] * n) + ".", normalize_host, 500),
    "hostname/idn-labels": (lambda n: ".".join(["例え"] * n) + ".jp", normalize_host, 50),
    "url/long-path": (lambda n: "http://www.example.test/" + "a/" * n, normalize_url, 5_000),
    "url/percent-escapes": (lambda n: "http://www.example.test/" + "%41%2F" * n, normalize_url, 5_000),
    "url/query-params": (lambda n: "http://www.example.test/?" + "a=1&" * n, normalize_url, 5_000),
    "url/dot-segments": (lambda n: "http://www.example.test/" + "./../" * n, normalize_url, 5_000),
    # a whole decision over a long URL (example policy: lists, URL rules, response rules)
    "decide/long-url": (lambda n: "https://www.example.test/" + "seg/" * n + "x.apk",
                        lambda url: _gateway_decide(url), 5_000),
    "decide/long-host": (lambda n: "https://" + "a." * n + "example.test/",
                         lambda url: _gateway_decide(url), 100),
    # DNS bindings: many answers for one device
    "dnsbinding/many-names": (_bindings, _bind_all, 2_000),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cost_grows_linearly(name):
    build, fn, n = CASES[name]
    assert_linear(fn, build, n, name)
