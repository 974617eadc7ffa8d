"""The free-mail domain list: parsing (pure) and matching.

File format (policies/freemail-domains.txt): one domain per line, optionally followed by
``# source: ...``; blank lines and lines starting with ``#`` are comments. IPA SME regulation
sample 7.4 (差出人のメールアドレス ①) names mail from a free-mail address as a targeted-attack
indicator, and 7.3 bans forwarding business mail to private addresses.
"""

from __future__ import annotations

import re2
from dataclasses import dataclass

from gateway.yamlsource import SourceError

# RE2 (no look-ahead there: the length is checked apart) — linear on any list line.
_DOMAIN = re2.compile(r"^([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


@dataclass(frozen=True)
class FreemailEntry:
    domain: str
    source: str
    line: int


def parse_freemail_list(text: str, filename: str) -> tuple[list[FreemailEntry], list[SourceError]]:
    """Parse the list; every malformed line becomes a ``file:line`` error."""
    entries: list[FreemailEntry] = []
    errors: list[SourceError] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        domain, _, comment = line.partition("#")
        domain = domain.strip().lower().rstrip(".")
        source = comment.strip()
        if source.lower().startswith("source:"):
            source = source[len("source:"):].strip()
        if not (0 < len(domain) <= 253 and _DOMAIN.match(domain)):
            errors.append(SourceError(filename, lineno, (), f"not a domain name: {domain!r}"))
            continue
        if domain in seen:
            errors.append(SourceError(filename, lineno, (), f"duplicate domain {domain} (first on line {seen[domain]})"))
            continue
        seen[domain] = lineno
        entries.append(FreemailEntry(domain, source, lineno))
    return entries, errors


def freemail_match(domain: str, freemail_domains: frozenset[str]) -> str | None:
    """The list entry ``domain`` falls under (itself or a parent), or None."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        candidate = ".".join(labels[i:])
        if candidate in freemail_domains:
            return candidate
    return None
