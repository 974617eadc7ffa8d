"""The one authority parser of the gateway: ``host[:port]`` as it appears in a Host header,
an HTTP/2 ``:authority`` or an absolute-form request target. Pure; strict on purpose.

mitmproxy's own parser, in its lenient mode (what ``Request.pretty_host`` uses), keeps a
malformed value whole as the host name: ``allowed.test:80x`` became a "host" no rule
matched, while the upstream server dropped the port and served ``allowed.test``'s
neighbour. Here anything that is not exactly a host and an optional decimal port is an
error the gateway answers with 400 (issue #14):

* the host: a DNS name (letters, digits, ``-``, ``_``, dots; non-ASCII names are put into
  their IDNA form by ``normalize_host``), an IPv4 literal, or an IPv6 literal in brackets;
* the port: 1-5 ASCII digits, 1-65535, nothing else (no sign, no spaces, not empty);
* no user information (``user@host``), no path, query or fragment, no whitespace or
  control characters anywhere.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.hostname import normalize_host

DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME_BYTES = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_AUTHORITY = 1024


class MalformedAuthority(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Authority:
    host: str              # normalize_host() form: lower case, IDNA, no trailing dot, IP literals canonical
    port: int | None       # None: not given (the scheme's default applies)

    def effective_port(self, scheme: str) -> int | None:
        return self.port if self.port is not None else DEFAULT_PORTS.get(scheme)


def parse_authority(text: str) -> Authority:
    """``host[:port]`` -> Authority, or MalformedAuthority saying what is wrong."""
    if not text:
        raise MalformedAuthority("empty authority")
    if len(text) > MAX_AUTHORITY:
        raise MalformedAuthority("authority too long")
    for ch in text:
        if ch <= " " or ch == "\x7f":
            raise MalformedAuthority("whitespace or control character in the authority")
        if ch in "@/?#\\":
            raise MalformedAuthority(f"{ch!r} in the authority (user information or a path)")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise MalformedAuthority("unclosed IPv6 literal")
        literal, rest = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise MalformedAuthority("invalid IPv6 literal") from None
        host_text = literal
    else:
        host_text, colon, port_text = text.partition(":")
        rest = colon + port_text
        if ":" in port_text:
            raise MalformedAuthority("more than one ':' (an IPv6 address needs brackets)")
        if not host_text:
            raise MalformedAuthority("empty host")
        if host_text.isascii() and not set(host_text) <= _NAME_BYTES:
            raise MalformedAuthority("invalid character in the host name")
    port = None
    if rest:
        if not rest.startswith(":"):
            raise MalformedAuthority("text after the IPv6 literal")
        digits = rest[1:]
        if not digits:
            raise MalformedAuthority("empty port")
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 5:
            raise MalformedAuthority("port is not a number")
        port = int(digits)
        if not 1 <= port <= 65535:
            raise MalformedAuthority("port out of range")
    host = normalize_host(host_text)
    if not host or ".." in host or host.startswith("."):
        raise MalformedAuthority("invalid host name")
    return Authority(host, port)
