"""URL wildcard patterns -> RE2 regular expressions, and the host a pattern is tied to.

Syntax (LANGUAGE.md, "URL patterns"): ``[scheme://]host[:port][/path]``; ``*`` matches any
run of characters; ``*.example.com`` is example.com and every sub-domain; a pattern without
a path matches every path on the host; a path is matched to its end (add ``*`` for "and
more"), a query string is allowed after it unless the pattern names one. Matching is
case-insensitive (a block on ``/upload`` also catches ``/UPLOAD``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import ip_address

from gateway.i18n import Text
from gateway.policy.query import normalize_host

_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


@dataclass(frozen=True)
class CompiledWildcard:
    regex: str
    host: str | None  # bucket key, None when the host part has free wildcards
    host_is_suffix: bool
    # The parts the regex was made of: the scheme (lower-case; None: any), the port
    # (digits; None: any), the path glob as written ("" : none).
    scheme: str | None = None
    port: str | None = None
    path: str = ""
    # The regex from "://" on (``^://host...$``): ``regex`` is the scheme's regex followed by
    # this, less its "^" (urlsets.py matches the two parts apart).
    tail: str = ""


class WildcardError(ValueError):
    """A URL pattern that cannot be compiled; ``text`` in Japanese and English."""

    def __init__(self, text: Text) -> None:
        super().__init__(text.en)
        self.text = text


def _glob(part: str, star: str) -> str:
    return star.join(re.escape(chunk) for chunk in part.split("*"))


def compile_wildcard(pattern: str) -> CompiledWildcard:
    p = pattern.strip()
    if not p:
        raise WildcardError(Text("URL パターンが空です", "empty URL pattern"))
    m = _SCHEME.match(p)
    scheme: str | None = None
    if m:
        scheme = m.group(1).lower()
        scheme_re = re.escape(scheme)
        rest = p[m.end():]
    else:
        scheme_re = "[a-z][a-z0-9+.-]*"
        rest = p
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise WildcardError(Text(f"URL パターンにユーザー情報(@ の前)は書けません: {pattern!r}",
                                 f"user info is not allowed in a URL pattern: {pattern!r}"))
    port_re = "(?::[0-9]+)?"
    port_digits: str | None = None
    if ":" in authority and not authority.endswith("]"):
        authority, port = authority.rsplit(":", 1)
        if port == "*":
            port_re = "(?::[0-9]+)?"
        elif port.isascii() and port.isdigit():
            port_re = f":{port}"
            port_digits = port
        else:
            raise WildcardError(Text(f"URL パターン {pattern!r} のポート {port!r} が正しくありません",
                                     f"bad port {port!r} in URL pattern {pattern!r}"))
    host = authority.rstrip(".")
    if host.isascii():
        host = host.lower()
    else:  # an IDN: the punycode form normalize_url gives URLs (UTS 46 folds case itself)
        prefix = "*." if host.startswith("*.") else ""
        rest = host[len(prefix):]
        host = prefix + (normalize_host(rest) or rest.lower()) if "*" not in rest else host.lower()
    if host.startswith("[") and host.endswith("]") and "*" not in host:
        try:  # the spelling normalize_url gives URLs: [2001:0DB8::5] is [2001:db8::5]
            host = f"[{ip_address(host[1:-1])}]"
        except ValueError:
            pass
    if not host:
        raise WildcardError(Text(f"URL パターンにホストがありません: {pattern!r}(どのホストでもよいときは *)",
                                 f"URL pattern has no host: {pattern!r} (use * for any host)"))
    host_key: str | None = None
    host_is_suffix = False
    if host == "*":
        host_re = "[^/?#]*"
    elif host.startswith("*.") and "*" not in host[2:]:
        host_key, host_is_suffix = host[2:], True
        host_re = r"(?:[^/?#]*\.)?" + re.escape(host[2:])
    elif "*" not in host:
        host_key = host
        host_re = re.escape(host)
    else:
        host_re = _glob(host, "[^/?#]*")
    if not path:
        path_re = "(?:[/?#].*)?"
    else:
        path_re = _glob(path, ".*")
        if "?" not in path:
            path_re += "(?:[?#].*)?"
    return CompiledWildcard(f"^{scheme_re}://{host_re}{port_re}{path_re}$", host_key, host_is_suffix,
                            scheme, port_digits, path, f"^://{host_re}{port_re}{path_re}$")
