"""query_for_url returns its URL already normalized (issue #4 benchmarks: the URL used to be
normalized twice per decision, once in ``decide``) and parses host and port in the same pass.

Checked here against the reference: the query it made before (``_reference_query``, the
former implementation kept verbatim) with ``normalize_url`` applied, which is exactly what
``decide`` used to match; and the mark that lets ``decide`` skip the work cannot be forged by
other callers or survive a replaced URL.
"""

from __future__ import annotations

import datetime as dt
import string
from ipaddress import ip_address

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.policy import DeviceContext, PolicyQuery, compile_text, query_for_url
from gateway.policy.query import is_normalized_url, marked_normalized_url, normalize_host, normalize_url
from gateway.verdict import Stage

DEVICE = DeviceContext("q-1", frozenset({"staff"}), "org")
NOW = dt.datetime(2025, 6, 2, 3, 4, 5, tzinfo=dt.UTC)
POLICY = compile_text("""
version: 1
settings: {default_action: allow}
rules:
  - {id: suffix, action: block, match: {domain: [blocked.example, 例え.jp]}}
  - {id: wild, action: block, match: {url: ["*.files.test/secret/*", "https://[2001:db8::5]/admin*"]}}
  - {id: rx, action: block, match: {url_regex: ["^https?://docs\\\\.test(:[0-9]+)?/private/"]}}
  - {id: ext, action: block, match: {file_extension: [apk]}}
  - {id: port, action: block, match: {dst_port: [8443]}}
  - {id: net4, action: block, match: {dst_cidr: [192.0.2.0/24]}}
""", compiled_at=NOW)


def _reference_query(url: str, device: DeviceContext, stage: Stage = Stage.REQUEST, method: str = "GET",
                     now: dt.datetime | None = None) -> PolicyQuery:
    """query_for_url as it was before the one-pass parse (commit c23ad2f), for comparison."""
    start = url.find("://")
    if start == -1:
        url = "https://" + url
        start = 5
    scheme = url[:start].lower()
    begin = start + 3
    end = len(url)
    for sep in "/?#":
        at = url.find(sep, begin, end)
        if at != -1:
            end = at
    authority = url[begin:end]
    at = authority.rfind("@")
    if at != -1:
        authority = authority[at + 1:]
    port = None
    if authority.startswith("["):
        close = authority.find("]")
        raw_host, rest = authority[1:close], authority[close + 1:]
        if rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit():
            port = int(rest[1:])
    else:
        raw_host, colon, port_text = authority.partition(":")
        if colon and port_text.isascii() and port_text.isdigit():
            port = int(port_text)
    host = normalize_host(raw_host)
    if port is None:
        port = 443 if scheme == "https" else 80 if scheme == "http" else None
    dst_ip = None
    if host and (host[0].isdigit() or ":" in host):
        try:
            dst_ip = ip_address(host)
        except ValueError:
            dst_ip = None
    return PolicyQuery(stage, device, host, url, scheme, method.upper(), dst_ip, port, now=now)


_PIECES = st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "ws://", "", "user@", "u:p@", "@", "[",
                           "]", "[2001:DB8:0::5]", "[::ffff:192.0.2.1]", ":", ":443", ":80", ":8443", ":²", ":0x1",
                           "192.0.2.7", "1password.com", "files.test", "WWW.Files.Test.", "例え.jp", "例え.jp。",
                           "docs.test", "blocked.example", "/", "?", "#", "/secret/", "/private/", "x.apk",
                           "%61pk", "%2F", "%7e", "%zz", "%", ".", " ", "\t"])
URLS = st.one_of(st.lists(_PIECES, max_size=8).map("".join),
                 st.text(alphabet=string.printable + "例え。ßü", max_size=40))


@settings(max_examples=1500, deadline=None)
@given(URLS)
@example("https://files.test./secret/x")
@example("https://u:p@[2001:0DB8::5]:443/admin/%61")
@example("https://[2001:db8::5/admin")
@example("HTTPS://例え.jp。:443/%64ownload/x.%61pk")
@example("http://192.0.2.7:8443/")
def test_query_for_url_equals_the_former_query_with_its_url_normalized(url):
    new = query_for_url(url, DEVICE, now=NOW)
    old = _reference_query(url, DEVICE, now=NOW)
    assert new._replace(url=None) == old._replace(url=None)  # host, port, scheme, address: unchanged
    assert new.url == normalize_url(old.url)  # what decide used to match against
    assert is_normalized_url(new.url)
    for stage in (Stage.REQUEST, Stage.TLS):
        assert POLICY.decide(new._replace(stage=stage)) == POLICY.decide(old._replace(stage=stage))


def test_a_plain_url_from_another_caller_is_still_normalized_by_decide():
    q = query_for_url("https://ok.test/", DEVICE, now=NOW)
    raw = "https://x.files.test./%73ecret/a"  # trailing dot and an escaped letter
    assert not is_normalized_url(raw)
    assert POLICY.decide(q._replace(host="x.files.test", url=raw)).rule_id == "wild"
    hand_built = PolicyQuery(Stage.REQUEST, DEVICE, "docs.test", "https://DOCS.test:443/%70rivate/x", "https", "GET",
                             now=NOW)
    assert POLICY.decide(hand_built).rule_id == "rx"


def test_the_mark_does_not_survive_a_derived_string():
    url = query_for_url("https://a.test/x/y", DEVICE).url
    assert is_normalized_url(url)
    for derived in (url[:-1], url + "/%61", url.replace("x", "%78"), str(url), f"{url}", url.lower()):
        assert not is_normalized_url(derived), repr(derived)
    assert not is_normalized_url("https://a.test/x/y") and not is_normalized_url(None)


def test_normalized_url_reads_as_the_plain_string():
    q = query_for_url("https://User@Files.Test.:443/%7Eme/b.%61pk?q=%2f", DEVICE, now=NOW)
    assert q.url == "https://Files.Test/~me/b.apk?q=%2F" and q.host == "files.test" and q.dst_port == 443
    assert q.url.encode() == b"https://Files.Test/~me/b.apk?q=%2F"
    assert POLICY.decide(q).rule_id == "ext"


# -- the gateway's request hook marks its URL once; the response stage reuses the query -------

@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "%./:-_~?#@[]", max_size=40))
@example("https://docs.test./%70rivate/x.%61pk")
def test_marked_url_decides_like_the_plain_one_at_every_stage(tail):
    url = "https://" + tail
    m = marked_normalized_url(url)
    assert is_normalized_url(m) and m == normalize_url(url)
    assert marked_normalized_url(m) is m  # marking twice does nothing
    host = normalize_host(tail.split("/")[0].split("?")[0].split("#")[0].rpartition("@")[2]) or "x.test"
    for stage in (Stage.REQUEST, Stage.RESPONSE):
        plain = PolicyQuery(stage, DEVICE, host=host, url=url, now=NOW)
        assert POLICY.decide(plain._replace(url=m)) == POLICY.decide(plain)


def test_at_response_is_replace_of_stage_and_response_type():
    q = query_for_url("https://files.test/a/b.apk?x=1", DEVICE, Stage.REQUEST, "POST", NOW,
                      request_content_type="text/plain", body_size=12)
    r = q.at_response("application/vnd.android.package-archive")
    assert type(r) is PolicyQuery
    assert r == q._replace(stage=Stage.RESPONSE, response_content_type="application/vnd.android.package-archive")
    assert q.at_response(None) == q._replace(stage=Stage.RESPONSE, response_content_type=None)
