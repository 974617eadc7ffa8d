"""What the engine is asked: one device, one stage, and what is known at that stage.

Pure data. The addons build a ``PolicyQuery`` from a flow; ``normalize_host`` is the one
place host names are put into the form the compiled tables use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
import re
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple

from gateway.hostname import normalize_host  # the one host normalization (IDNA UTS 46)
from gateway.verdict import Stage


@dataclass(frozen=True, slots=True)
class DeviceContext:
    device_id: str
    groups: frozenset[str]
    ownership: str  # "org" | "byod"
    user: str | None = None
    platform: str | None = None  # "ios" | "android" | "windows" | "macos" | "linux" ...
    os_version: str | None = None
    jailbroken: bool = False
    underlay_ip: IPv4Address | IPv6Address | None = None  # outer source address of the tunnel
    status: str = "active"  # "active" | "quarantined" ...
    # The signed-in user (issue #9, OIDC): set only while the device holds a valid session.
    # Without sign-in configured, ``user`` is the device's registered owner and these stay empty.
    signed_in: bool = False
    user_groups: frozenset[str] = frozenset()  # the IdP's groups claim
    amr: frozenset[str] = frozenset()  # authentication methods (OIDC amr), e.g. {"pwd", "otp"}
    acr: str | None = None  # authentication context class (OIDC acr)
    mfa: bool = False  # the sign-in used a second factor (judged from amr/acr by the gateway config)
    auth_time: datetime | None = None  # when the user authenticated at the IdP (aware UTC)


class PolicyQuery(NamedTuple):
    """Immutable like a frozen dataclass, but a NamedTuple: the gateway builds one per
    request and a NamedTuple is built about 5x faster (0.4 µs vs 1.9 µs for these 13
    fields, measured on the project machine). Change fields with ``q._replace(...)``."""

    stage: Stage
    device: DeviceContext
    host: str | None = None  # normalize_host() form
    url: str | None = None
    scheme: str | None = None
    method: str | None = None
    dst_ip: IPv4Address | IPv6Address | None = None
    dst_port: int | None = None
    protocol: str = "tcp"  # "tcp" | "udp"
    request_content_type: str | None = None
    response_content_type: str | None = None
    body_size: int | None = None
    now: datetime | None = None  # aware UTC; None = the snapshot's compile time

    def at_response(self, content_type: str | None) -> "PolicyQuery":
        """This request's query at the response stage, with the response's content type:
        ``_replace(stage=..., response_content_type=...)`` without its cost (~1.5 µs, once
        per deferred request in the gateway)."""
        return tuple.__new__(PolicyQuery, (Stage.RESPONSE, *self[1:10], content_type, *self[11:]))


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_DEFAULT_PORTS = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}


def _unescape_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def normalize_url(url: str) -> str:
    """The form URL patterns, regexes and file extensions are matched against: spellings
    that reach the same resource on the server are made equal (RFC 3986 6.2.2-6.2.3), so a
    URL rule cannot be stepped around by re-spelling the URL. Found by tests/fuzz: a
    trailing dot on the host (``https://files.test./secret``) and percent-encoded letters
    (``/%64ownload/x.%61pk``) used to escape ``url``/``url_regex``/``file_extension`` rules.

    - user info is dropped, the host loses trailing dots, the default port is dropped;
    - percent-encoded unreserved characters (letters, digits, ``-._~``) are decoded, other
      escapes get upper-case hex; reserved escapes (``%2F``, ``%3F`` ...) stay encoded.
    Case is left alone: matching is case-insensitive already. Unchanged URLs are returned
    as the same object (the common case costs a few string scans)."""
    start = url.find("://")
    if start == -1:
        return url
    begin = start + 3
    end = len(url)
    for sep in "/?#":
        at = url.find(sep, begin, end)
        if at != -1:
            end = at
    authority = url[begin:end]
    rest = url[end:]
    new_authority = authority
    at = new_authority.rfind("@")
    if at != -1:
        new_authority = new_authority[at + 1:]
    default_port = _DEFAULT_PORTS.get(url[:start].lower())
    close = new_authority.find("]")
    if new_authority.startswith("[") and close != -1:  # [IPv6]:port, the literal in canonical form
        literal, after = new_authority[1:close], new_authority[close + 1:]
        try:
            literal = str(ip_address(literal))
        except ValueError:
            pass
        new_authority = f"[{literal}]" + ("" if after == default_port else after)
    else:
        host, colon, port = new_authority.partition(":")
        if colon and ":" + port == default_port:
            colon = port = ""
        if not host.isascii():  # IDN in punycode, as patterns are compiled (urlpattern.py)
            host = normalize_host(host) or host
        new_authority = host.rstrip(".") + colon + port
    if "%" in rest:
        rest = _ESCAPE.sub(_unescape_unreserved, rest)
    if new_authority == authority and rest == url[end:]:
        return url
    return url[:begin] + new_authority + rest


class _NormalizedUrl(str):
    """A URL that ``query_for_url`` has put in ``normalize_url`` form. The mark is the type
    of the string itself, so it cannot outlive the value: a URL that a caller builds or
    replaces (``q._replace(url=...)``), or any string derived from this one (slices,
    concatenations give plain ``str``), is a plain ``str`` and ``decide`` normalizes it as
    always. Only this module makes them (``is_normalized_url``)."""

    __slots__ = ()


def marked_normalized_url(url: str) -> str:
    """``normalize_url(url)``, marked so that ``decide`` does not normalize it again: for a
    caller that decides the same URL at several stages (the gateway's request and response
    hooks)."""
    if type(url) is _NormalizedUrl:
        return url
    return _NormalizedUrl(normalize_url(url))


def is_normalized_url(url: object) -> bool:
    """True for a URL ``query_for_url`` has normalized already: ``decide`` skips the work."""
    return type(url) is _NormalizedUrl


def request_query(
    device: DeviceContext,
    host: str | None,
    url: str,
    scheme: str | None,
    method: str | None,
    dst_ip: IPv4Address | IPv6Address | None,
    dst_port: int | None,
    content_type: str | None,
    body_size: int | None,
    now: datetime | None,
) -> PolicyQuery:
    """The HTTP request stage's query as the gateway builds it from a flow (addons/policy.py):
    the host as the request names it (``pretty_host``) through ``normalize_host``, the URL
    (``pretty_url``) in ``normalize_url`` form, marked so that the response stage does not
    normalize it again. bench/engine.py measures the engine through this same function and
    ``snapshot.decide`` (tests/unit/test_policy_one_engine.py holds them together)."""
    return _tuple_new(PolicyQuery, (Stage.REQUEST, device, normalize_host(host), marked_normalized_url(url), scheme,
                                    method, dst_ip, dst_port, "tcp", content_type, None, body_size, now))


def query_for_url(
    url: str,
    device: DeviceContext,
    stage: Stage = Stage.REQUEST,
    method: str = "GET",
    now: datetime | None = None,
    **extra: object,
) -> PolicyQuery:
    """Build an HTTP query from a URL, for the operator tools and benchmarks (the addons
    have the parts already). A URL without a scheme is taken as ``https://``.

    The query's URL is already in ``normalize_url`` form (marked, see ``_NormalizedUrl``),
    so ``decide`` does not normalize it again; host and port come from the same scan of the
    authority as the normalization (this runs once per URL in ``policy test`` and the
    benchmark, where it used to cost more than the decision)."""
    start = url.find("://")
    if start == -1:
        url = "https://" + url
        start = 5
    scheme = url[:start].lower()
    # The authority ends at the first "/", "?" or "#" (RFC 3986 3.2); a hand-written split
    # because urllib's is several times slower.
    begin = start + 3
    end = len(url)
    for sep in "/?#":
        at = url.find(sep, begin, end)
        if at != -1:
            end = at
    authority = full_authority = url[begin:end]
    at = authority.rfind("@")
    if at != -1:
        authority = authority[at + 1:]
    default_port = _DEFAULT_PORTS.get(scheme)
    port: int | None = None
    # The host and port for the query, and the authority for the URL, as normalize_host,
    # the port parse and normalize_url would each make them from ``authority``.
    if authority.startswith("["):
        close = authority.find("]")
        raw_host, after = authority[1:close], authority[close + 1:]
        if after.startswith(":") and after[1:].isascii() and after[1:].isdigit():
            port = int(after[1:])
        host = normalize_host(raw_host)
        if close != -1:  # [IPv6]:port, the literal in canonical form
            try:
                literal = str(ip_address(raw_host))
            except ValueError:
                literal = raw_host
            new_authority = f"[{literal}]" + ("" if after == default_port else after)
        else:  # no closing bracket: normalize_url reads it as host[:port]
            name, colon, port_text = authority.partition(":")
            if colon and ":" + port_text == default_port:
                colon = port_text = ""
            if not name.isascii():
                name = normalize_host(name) or name
            new_authority = name.rstrip(".") + colon + port_text
    else:
        raw_host, colon, port_text = authority.partition(":")
        if colon and port_text.isascii() and port_text.isdigit():  # "²".isdigit() is True (tests/fuzz)
            port = int(port_text)
        host = raw_host.lower()
        # normalize_host's answer without calling it, for the common spelling: ASCII, no
        # surrounding blanks or dots (``raw_host`` has no ":" here, so it is no IPv6 literal
        # and no bracket pair can be stripped from it: it does not start with "[").
        if not (host and host.isascii() and host[-1] != "." and host[0] != "[" and host == host.strip()):
            host = normalize_host(raw_host)
        if colon and ":" + port_text == default_port:
            colon = port_text = ""
        name = raw_host if raw_host.isascii() else (host or raw_host)  # IDN in punycode
        new_authority = name.rstrip(".") + colon + port_text
    rest = url[end:]
    if "%" in rest:
        rest = _ESCAPE.sub(_unescape_unreserved, rest)
    unchanged = new_authority == full_authority and rest == url[end:]
    normalized = _NormalizedUrl(url if unchanged else url[:begin] + new_authority + rest)
    if port is None:
        port = 443 if scheme == "https" else 80 if scheme == "http" else None
    dst_ip = None
    if host and (host[0].isdigit() or ":" in host):
        try:
            dst_ip = ip_address(host)
        except ValueError:
            dst_ip = None
    if extra:
        return PolicyQuery(stage, device, host, normalized, scheme, method.upper(), dst_ip, port, now=now, **extra)  # type: ignore[arg-type]
    # All 13 fields in order, without the keyword handling of PolicyQuery(...): half the cost
    # (what NamedTuple._make does, without its length check).
    return _tuple_new(PolicyQuery, (stage, device, host, normalized, scheme, method.upper(), dst_ip, port,
                                    "tcp", None, None, None, now))


_tuple_new = tuple.__new__
