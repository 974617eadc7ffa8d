"""One host normalization (gateway/hostname.py, issue #15): IDNA UTS 46 nontransitional, as
browsers. A name written in a policy, a list, the config, and the same name in a request
meet in one form, whichever way it is spelled; both engines agree.

The bypass this closes: ``domain: faß.de`` was turned into ``fass.de`` (IDNA 2003), so it
blocked fass.de and let through ``xn--fa-hia.de``, the name browsers send for faß.de.
"""

from __future__ import annotations

from datetime import datetime, timezone

import idna
import pytest

from addons.hostrules import normalize_host as hostrules_normalize
from gateway.config import load_config_text
from gateway.hostname import normalize_host, normalize_host_entry
from gateway.policy import DeviceContext, compile_text, query_for_url
from gateway.policy.lists import parse_list
from gateway.policy.query import normalize_url
from gateway.policy.urlpattern import compile_wildcard
from gateway.verdict import Action, Stage

NOW = datetime(2026, 6, 10, 3, 0, tzinfo=timezone.utc)
DEVICE = DeviceContext("d", frozenset({"staff"}), "org", platform="ios", os_version="17.4")

# (as written, the form browsers send)
SPELLINGS = [
    ("faß.de", "xn--fa-hia.de"),
    ("FAß.DE.", "xn--fa-hia.de"),
    ("xn--fa-hia.de", "xn--fa-hia.de"),
    ("XN--FA-HIA.DE", "xn--fa-hia.de"),
    ("fass.de", "fass.de"),
    ("例え.jp", "xn--r8jz45g.jp"),
    ("例え。jp。", "xn--r8jz45g.jp"),        # ideographic full stop
    ("ＥＸＡＭＰＬＥ．ｃｏｍ", "example.com"),  # full-width letters and stop
    ("ﬁle.example", "file.example"),        # ligature mapped
    ("ΣΑΣ.gr", "xn--mxa9ab.gr"),            # final sigma kept (nontransitional)
    ("☃.net", "xn--n3h.net"),                # valid in UTS 46, refused by strict IDNA 2008: browsers accept it
    (" Example.COM. ", "example.com"),
    ("A\xa0", "a"),                          # ASCII once the no-break space is stripped (tests/fuzz)
    ("\u3000Example.COM\u3000", "example.com"),
    ("[2001:DB8:0::1]", "2001:db8::1"),
]


@pytest.mark.parametrize("written,expected", SPELLINGS)
def test_every_spelling_meets_in_the_browser_form(written, expected):
    assert normalize_host(written) == expected
    assert normalize_host(expected) == expected  # idempotent
    assert hostrules_normalize(written) == expected  # the built-in host rules use the same function


@pytest.mark.parametrize("name", ["faß.de", "例え.jp", "ΣΑΣ.gr", "bücher.example", "ドメイン名例.jp", "ශ්‍රී.lk"])
def test_agrees_with_idna_uts46_nontransitional_where_the_name_is_valid(name):
    assert normalize_host(name) == idna.encode(name, uts46=True, transitional=False).decode("ascii")


def test_unmappable_names_have_no_host():
    assert normalize_host("\ufffd.example") is None
    assert normalize_host("") is None and normalize_host(None) is None and normalize_host(" . ") is None
    assert hostrules_normalize("\ufffd.example") == ""


POLICY = """version: 1
lists:
  l: {file: l.txt}
rules:
  - {id: eszett, action: block, match: {domain: faß.de}}
  - {id: listed, action: block, match: {list: l}}
  - {id: pattern, action: block, match: {url: "https://bücher.example/secret/*"}}
"""


def test_policy_domain_faß_blocks_the_name_browsers_send_and_the_typed_name():
    snap = compile_text(POLICY, {"l": ("l.txt", "例え.jp\n0.0.0.0 ＴＲＡＣＫＥＲ.example\n")}, compiled_at=NOW)
    blocked = ["https://xn--fa-hia.de/", "https://faß.de/", "https://WWW.FAß.DE/x", "https://sub.xn--fa-hia.de./",
               "https://xn--r8jz45g.jp/", "https://例え.jp/", "https://a.例え。jp/", "http://tracker.example/",
               "https://xn--bcher-kva.example/secret/x", "https://bücher.example/secret/x"]
    for url in blocked:
        verdict = snap.decide_url(url, DEVICE, Stage.REQUEST, now=NOW)
        assert verdict.action is Action.BLOCK, (url, verdict)
    # fass.de is another registered name: the policy blocks it only if it says so.
    assert snap.decide_url("https://fass.de/", DEVICE, Stage.REQUEST, now=NOW).action is Action.ALLOW
    for stage in (Stage.DNS, Stage.TLS):
        for host in ("xn--fa-hia.de", "faß.de", "FAß.de."):
            q = query_for_url("https://" + host + "/", DEVICE, stage=stage, now=NOW)._replace(url=None, scheme=None,
                                                                                            method=None)
            assert snap.decide(q).action is Action.BLOCK, (stage, host)


def test_list_entries_url_patterns_and_urls_use_the_same_form():
    lst, errors = parse_list("faß.de\n||straße.example^\n0.0.0.0 ＢÜＣＨＥＲ.example\n", "l", "l.txt")
    assert errors == []
    assert lst.suffix == {"xn--fa-hia.de", "xn--strae-oqa.example"} and lst.exact == {"xn--bcher-kva.example"}
    assert compile_wildcard("https://*.faß.de/*").host == "xn--fa-hia.de"
    assert compile_wildcard("https://FAß.DE/*").host == "xn--fa-hia.de"
    assert normalize_url("https://faß.de/x") == "https://xn--fa-hia.de/x"


def test_config_host_entries_use_the_same_form():
    cfg = load_config_text(
        "state_dir: /tmp/x\ntunnel: {interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}\n"
        "uplink: {interface: eth0}\nrules:\n  default_action: allow\n  list:\n"
        "    - {id: b, action: block, hosts: [faß.de, .例え.jp]}\n"
        "quarantine:\n  allow_hosts: [ＭＤＭ.example., .straße.example]\n", "k.yaml")
    (rule,) = cfg.host_rules
    for host in ("faß.de", "xn--fa-hia.de", "x.例え.jp", "xn--r8jz45g.jp"):
        assert rule.matches(hostrules_normalize(host)), host
    assert not rule.matches(hostrules_normalize("fass.de"))
    assert cfg.quarantine_allow_hosts == ("mdm.example", ".xn--strae-oqa.example")
    assert normalize_host_entry(" .FAß.de. ") == ".xn--fa-hia.de"


def test_one_address_parser_everywhere():
    """Issue #16: one parser for peer and destination addresses (gateway.hostname.canonical_address):
    the zone is dropped and an IPv4-mapped IPv6 address is its IPv4 address wherever an address
    is judged: the internal-destination check, policy destinations, underlay endpoints,
    sign-in sessions, enrollment rate limits."""
    import ipaddress

    from addons.enforce import Enforcer
    from addons.policy import _ip
    from gateway.enroll.ratelimit import source_key
    from gateway.hostname import canonical_address
    from gateway.metrics import GatewayMetrics
    from gateway.net.underlay import endpoint_address
    from gateway.proxy.connections import LiveConnections
    from gateway.signin.sessions import canonical_ip

    v4 = ipaddress.ip_address("198.51.100.7")
    assert canonical_address("::ffff:198.51.100.7") == v4 == canonical_address("198.51.100.7")
    assert canonical_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert canonical_address("not-an-address") is None and canonical_address(None) is None
    assert _ip(("::ffff:198.51.100.7", 443)) == v4
    assert endpoint_address("[::ffff:198.51.100.7]:51820") == v4
    assert canonical_ip("::ffff:198.51.100.7") == "198.51.100.7"
    assert source_key("::ffff:198.51.100.7") == "198.51.100.7"
    enforcer = Enforcer(LiveConnections(), GatewayMetrics(), None, [ipaddress.ip_network("10.77.0.0/24")], lambda _c: None)
    # A mapped loopback or tunnel address is internal: it never leaves as an upstream connection.
    assert enforcer._is_internal(("::ffff:127.0.0.1", 80)) and enforcer._is_internal(("::ffff:10.77.0.5", 443))
    assert not enforcer._is_internal(("::ffff:198.51.100.7", 443))


def test_one_suffix_matcher_for_host_rules_quarantine_and_signin():
    """Issue #16: one "exact or .suffix" matcher (gateway.hostname.host_in); a Japanese-script
    entry matches the punycode SNI wherever entries are matched."""
    from addons.quarantine import QuarantineGate
    from gateway.hostname import host_in, split_host_entries
    from gateway.proxy.connections import LiveConnections

    exact, suffixes = split_host_entries(["Mdm.Example", ".例え.jp"])
    assert exact == {"mdm.example"} and suffixes == (".xn--r8jz45g.jp",)
    assert host_in("xn--r8jz45g.jp", exact, suffixes) and host_in("www.xn--r8jz45g.jp", exact, suffixes)
    assert not host_in("badxn--r8jz45g.jp", exact, suffixes) and not host_in(None, exact, suffixes)
    gate = QuarantineGate(LiveConnections(), ("mdm.example", ".例え.jp"))
    assert gate.allowed("WWW.例え.JP.") and gate.allowed("www.xn--r8jz45g.jp") and not gate.allowed("example.jp")
