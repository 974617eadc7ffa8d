"""Redaction of secrets carried in URLs (pure, no I/O).

Tokens in query strings end up in proxy logs: OAuth ``code``/``access_token``, signed-URL
signatures, session ids. A rule names the parameters whose *values* are replaced; names
stay, so the log still shows which parameter was present. The password part of
``user:password@host`` is always replaced.

Hand-written rather than urllib.parse.urlencode round-trips on purpose: re-encoding would
change the rest of the URL (ordering, ``+`` vs ``%20``, blank values); here only the
redacted values change and everything else is kept byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

REDACTED = "REDACTED"

# Default parameter names (case-insensitive) whose values are secrets or credentials:
# OAuth 2.0 / OIDC (RFC 6749: code, access_token, refresh_token, id_token, client_secret,
# assertion), passwords, API keys, session ids, and the signatures/credentials of
# pre-signed cloud storage URLs (AWS SigV4, Google Cloud Storage, Azure SAS ``sig``).
DEFAULT_REDACTED_PARAMS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "code", "client_secret",
    "assertion", "password", "passwd", "pwd", "pass", "secret", "sig", "signature",
    "key", "api_key", "apikey", "auth", "session", "sessionid", "session_id", "sid",
    "jwt", "otp", "ticket", "saml", "samlresponse", "samlrequest",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential",
})


@dataclass(frozen=True)
class RedactionRule:
    """``params``: exact parameter names (compared lower-case); ``patterns``: regular
    expressions matched (fullmatch, case-insensitive) against parameter names, e.g.
    ``r".*token.*"``."""

    params: frozenset[str] = DEFAULT_REDACTED_PARAMS
    patterns: tuple[str, ...] = ()
    replacement: str = REDACTED
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", frozenset(p.lower() for p in self.params))
        object.__setattr__(self, "_compiled",
                           tuple(re.compile(p, re.IGNORECASE) for p in self.patterns))

    @classmethod
    def with_extra(cls, params: Iterable[str] = (), patterns: Iterable[str] = ()) -> "RedactionRule":
        """The default rule plus site-specific names/patterns."""
        return cls(params=DEFAULT_REDACTED_PARAMS | frozenset(params), patterns=tuple(patterns))

    def matches(self, name: str) -> bool:
        lowered = name.lower()
        if lowered in self.params:
            return True
        return bool(self._compiled) and any(p.fullmatch(lowered) for p in self._compiled)


DEFAULT_REDACTION = RedactionRule()


def redact_query(query: str, rule: RedactionRule = DEFAULT_REDACTION) -> str:
    """``a=1&token=xyz`` -> ``a=1&token=REDACTED``. Separators ``&`` and ``;``."""
    if "=" not in query:
        return query
    parts = re.split(r"([&;])", query) if ";" in query else query.split("&")
    step = 2 if ";" in query else 1
    changed = False
    for i in range(0, len(parts), step):
        name, eq, _value = parts[i].partition("=")
        if not eq:
            continue
        plain = unquote_plus(name) if ("%" in name or "+" in name) else name
        if rule.matches(plain):
            parts[i] = f"{name}={rule.replacement}"
            changed = True
    if not changed:
        return query
    return "".join(parts) if step == 2 else "&".join(parts)


def redact_url(url: str, rule: RedactionRule = DEFAULT_REDACTION) -> str:
    """Redact the query (and a query-like fragment, where implicit-flow OAuth puts
    ``access_token``) and the userinfo password of ``url``."""
    if "?" not in url and "#" not in url and "@" not in url:
        return url
    base, hash_mark, fragment = url.partition("#")
    base, question, query = base.partition("?")
    scheme_end = base.find("://")
    if scheme_end != -1:
        authority_start = scheme_end + 3
        slash = base.find("/", authority_start)
        authority_end = len(base) if slash == -1 else slash
        authority = base[authority_start:authority_end]
        userinfo, at, hostport = authority.rpartition("@")
        if at and ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            base = f"{base[:authority_start]}{user}:{rule.replacement}@{hostport}{base[authority_end:]}"
    out = base
    if question:
        out += "?" + redact_query(query, rule)
    if hash_mark:
        out += "#" + (redact_query(fragment, rule) if "=" in fragment else fragment)
    return out
