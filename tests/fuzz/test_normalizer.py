"""Fuzz: the host and URL normalizer (``normalize_host``, ``normalize_url``, ``query_for_url``).

1. Any text: ``normalize_host`` never raises; its answer is ``None`` or an ASCII, lower-case
   name without a trailing dot that normalizes to itself.
2. Equivalent spellings get the same verdict at every stage: case, trailing dot, surrounding
   blanks, IDN in Unicode or punycode, user info, an explicit default port, percent-encoded
   unreserved characters in the path, IPv6 literals written long or short. A rule that a
   re-spelt URL escapes is a bypass.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from hypothesis import strategies as st

from gateway.policy import DeviceContext, compile_text, normalize_host, query_for_url
from gateway.policy.query import normalize_url
from gateway.verdict import Stage
from tests.fuzz.harness import Harness

DEVICE = DeviceContext("fuzz-1", frozenset({"staff"}), "org")
NOW = dt.datetime(2025, 6, 2, 3, 4, 5, tzinfo=dt.UTC)
POLICY = compile_text("""
version: 1
settings: {default_action: allow, no_sni: block}
rules:
  - {id: suffix, action: block, match: {domain: [blocked.example, 例え.jp, xn--fa-hia.de]}}
  - {id: exact, action: block, match: {domain_exact: [login.example.org]}}
  - {id: wild, action: block, match: {url: ["*.files.test/secret/*", "https://[2001:db8::5]/admin*"]}}
  - {id: rx, action: block, match: {url_regex: ["^https?://docs\\\\.test(:[0-9]+)?/private/"]}}
  - {id: ext, action: block, match: {file_extension: [apk, ipa]}}
  - {id: net4, action: block, match: {dst_cidr: [192.0.2.0/24]}}
  - {id: net6, action: block, match: {dst_cidr: ["2001:db8:bad::/48"]}}
""", compiled_at=NOW)

_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-") and not s.endswith("-") and s[2:4] != "--")
_UNICODE_LABEL = st.text(alphabet="例えテストかんもん関門ßüé" + "abcxyz", min_size=1, max_size=6)
_BASES = st.sampled_from(["blocked.example", "例え.jp", "login.example.org", "www.files.test", "docs.test",
                          "open.example", "example.org", "files.test", "ok.jp"])
_PATHS = st.lists(st.sampled_from(["secret", "private", "admin", "download", "x.apk", "a.ipa", "index.html",
                                   "~user", "a-b_c.d", "%E4%BE%8B", "q?x=1", "#frag"]), max_size=4).map(
    lambda parts: "/" + "/".join(parts))


@st.composite
def _host(draw) -> str:
    kind = draw(st.sampled_from(["name", "name", "name", "v4", "v6"]))
    if kind == "v4":
        net = draw(st.sampled_from([ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.0/24")]))
        return str(net[draw(st.integers(0, 255))])
    if kind == "v6":
        net = draw(st.sampled_from([ipaddress.ip_network("2001:db8:bad::/48"), ipaddress.ip_network("2001:db8::/120")]))
        return str(net[draw(st.one_of(st.just(5), st.integers(0, 255)))])  # ::5 has a URL rule
    subs = draw(st.lists(st.one_of(_LABEL, _UNICODE_LABEL), max_size=2))
    return ".".join(subs + [draw(_BASES)])


def _respell_host(host: str, draw) -> str:
    """An equivalent spelling of ``host`` (as a URL authority host)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address):
        text = draw(st.sampled_from([ip.compressed, ip.exploded, ip.compressed.upper(), ip.exploded.upper()]))
        return f"[{text}]"
    if ip is not None:
        return host
    if not host.isascii() and draw(st.booleans()):
        host = normalize_host(host) or host  # the punycode form
    host = "".join(c.upper() if c.isascii() and draw(st.booleans()) else c for c in host)
    return host + draw(st.sampled_from(["", "", ".", "\u3002"]))  # 。 is a full stop in IDNA


def _respell_path(path: str, draw) -> str:
    out = []
    for c in path:
        if c.isascii() and (c.isalnum() or c in "-._~") and draw(st.integers(0, 5)) == 0:
            out.append("%{:02X}".format(ord(c)) if draw(st.booleans()) else "%{:02x}".format(ord(c)))
        else:
            out.append(c)
    return "".join(out)


def _url(host: str, path: str, scheme: str, port: str, userinfo: str) -> str:
    bracketed = host if host.startswith("[") else (f"[{host}]" if ":" in host else host)
    return f"{scheme}://{userinfo}{bracketed}{port}{path}"


@st.composite
def _equivalent_urls(draw) -> tuple[str, str]:
    host, path = draw(_host()), draw(_PATHS)
    scheme = draw(st.sampled_from(["https", "http"]))
    plain = _url(host, path, scheme, "", "")
    port = draw(st.sampled_from(["", {"https": ":443", "http": ":80"}[scheme]]))
    userinfo = draw(st.sampled_from(["", "", "user@", "user:pass@", "a%40b@"]))
    respelt = _url(_respell_host(host, draw), _respell_path(path, draw), draw(st.sampled_from([scheme, scheme.upper()])),
                   port, userinfo)
    return plain, respelt


def check_normalize_host(text: str) -> None:
    out = normalize_host(text)
    if out is None:
        return
    assert out.isascii() and out == out.lower() and not out.endswith("."), repr(out)
    assert normalize_host(out) == out, f"not idempotent: {text!r} -> {out!r} -> {normalize_host(out)!r}"


def check_url_normalizer_idempotent(url: str) -> None:
    once = normalize_url(url)
    assert normalize_url(once) == once, f"{url!r} -> {once!r} -> {normalize_url(once)!r}"
    query_for_url(url, DEVICE)  # never raises


def _decisions(url: str) -> list[tuple[str, str, str | None]]:
    q = query_for_url(url, DEVICE, now=NOW)
    out = []
    for stage in (Stage.DNS, Stage.TLS, Stage.REQUEST):
        v = POLICY.decide(q._replace(stage=stage, url=q.url if stage is Stage.REQUEST else None))
        out.append((str(stage), str(v.action), v.rule_id))
    return out


def check_equivalent_urls_same_verdict(pair: tuple[str, str]) -> None:
    plain, respelt = pair
    assert _decisions(plain) == _decisions(respelt), f"{plain!r} and {respelt!r} are judged differently"


HARNESSES = [
    Harness("host-normalizer", st.one_of(st.text(max_size=80), _host(), st.builds(
        lambda h, pre, post: pre + h + post, _host(), st.sampled_from(["", " ", "[", "\t"]),
        st.sampled_from(["", ".", "..", "]", " ", "\n"]))), check_normalize_host, ci_examples=400),
    Harness("url-normalizer", st.one_of(st.text(max_size=80), st.builds(lambda p: p[1], _equivalent_urls())),
            check_url_normalizer_idempotent, ci_examples=300),
    Harness("url-equivalence", _equivalent_urls(), check_equivalent_urls_same_verdict, ci_examples=300),
]

for _h in HARNESSES:
    globals()[_h.as_test().__name__] = _h.as_test()
