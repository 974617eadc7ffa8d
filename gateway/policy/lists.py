"""Domain lists shared by many rules: plain domains, hosts-file format, and a small ABP
subset (``||domain^`` and ``/regex/``). Parsing is pure: text in, entries or
``file:line`` errors out.

Entry semantics (documented in LANGUAGE.md):
- plain ``example.com``  -> example.com and every sub-domain (``match: exact`` to change)
- hosts ``0.0.0.0 a.example b.example`` -> exactly those names (hosts files list names)
- ABP ``||example.com^`` -> example.com and every sub-domain
- ABP ``/regex/`` -> a URL regular expression (RE2 syntax), checked at the HTTP stages
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import ip_address

import re2

from gateway.policy.query import normalize_host
from gateway.yamlsource import SourceError

FORMATS = ("auto", "domains", "hosts", "abp")

# Host names in hosts files that name the machine itself, not a blocked site.
_HOSTS_SELF_NAMES = frozenset(
    {"localhost", "localhost.localdomain", "local", "broadcasthost", "ip6-localhost",
     "ip6-loopback", "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters",
     "ip6-allhosts", "0.0.0.0"}
)
_LABELS = re.compile(r"(?=.{1,253}\Z)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ABP_DOMAIN = re.compile(r"\|\|([^/^$|*]+)\^\Z")


@dataclass(frozen=True)
class DomainList:
    name: str
    filename: str
    suffix: frozenset[str]  # the name and all sub-domains
    exact: frozenset[str]  # exactly the name
    regexes: tuple[tuple[str, int], ...]  # (RE2 pattern, line) matched against the URL

    def __len__(self) -> int:
        return len(self.suffix) + len(self.exact) + len(self.regexes)


def regex_error(pattern: str) -> str | None:
    """The RE2 error for ``pattern`` or ``None``; the same check the compiler's Set uses."""
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        msg = exc.args[0] if exc.args else str(exc)
        return msg.decode() if isinstance(msg, bytes) else str(msg)
    return None


def valid_domain(name: str) -> bool:
    return bool(_LABELS.match(name))


def parse_list(text: str, name: str, filename: str, fmt: str = "auto", match: str = "suffix") -> tuple[DomainList, list[SourceError]]:
    """Parse one list file. Every line that is not a comment, blank, or a valid entry is
    reported as ``filename:line``; the caller applies nothing when errors are returned."""
    suffix: set[str] = set()
    exact: set[str] = set()
    regexes: list[tuple[str, int]] = []
    errors: list[SourceError] = []
    plain_target = exact if match == "exact" else suffix

    def err(lineno: int, msg: str) -> None:
        errors.append(SourceError(filename, lineno, (), msg))

    def add_domain(raw: str, lineno: int, target: set[str]) -> None:
        host = normalize_host(raw)
        if host is None or not valid_domain(host):
            err(lineno, f"not a valid domain name: {raw!r}")
            return
        target.add(host)

    # Lines as an editor numbers them: str.splitlines() also breaks at form feeds, NEL and
    # U+2028, which shifted every later error's line number (found by tests/fuzz).
    for lineno, line in enumerate(_LINE_BREAK.split(text), 1):
        s = line.strip()
        if not s or s[0] == "#" or (s[0] == "!" and fmt in ("auto", "abp")):
            continue
        if s[0] == "[" and s.endswith("]") and fmt in ("auto", "abp"):
            continue  # "[Adblock Plus 2.0]" header
        # Trailing comments: "example.com  # what it is"
        hash_at = s.find(" #")
        if hash_at == -1:
            hash_at = s.find("\t#")
        if hash_at != -1:
            s = s[:hash_at].rstrip()
        kind = fmt if fmt != "auto" else _detect(s)
        if kind == "abp":
            if s.startswith("/") and s.endswith("/") and len(s) > 2:
                pattern = s[1:-1]
                problem = regex_error(pattern)
                if problem:
                    err(lineno, f"bad regular expression: {problem}")
                else:
                    regexes.append((pattern, lineno))
                continue
            m = _ABP_DOMAIN.match(s)
            if not m:
                err(lineno, f"unsupported ABP rule {s!r} (only ||domain^ and /regex/ are understood)")
                continue
            add_domain(m.group(1), lineno, suffix)
        elif kind == "hosts":
            fields = s.split()
            try:
                ip_address(fields[0])
            except ValueError:
                err(lineno, f"hosts line must start with an IP address: {s!r}")
                continue
            if len(fields) < 2:
                err(lineno, f"hosts line names no host: {s!r}")
                continue
            for raw in fields[1:]:
                if raw.lower() in _HOSTS_SELF_NAMES:
                    continue
                add_domain(raw, lineno, exact)
        else:
            if " " in s or "\t" in s:
                err(lineno, f"one domain per line expected: {s!r}")
                continue
            if "*" in s or "/" in s:
                err(lineno, f"not a domain name: {s!r} (a plain entry already covers sub-domains; use a url rule for paths)")
                continue
            add_domain(s, lineno, plain_target)
    return DomainList(name, filename, frozenset(suffix), frozenset(exact), tuple(regexes)), errors


def _detect(s: str) -> str:
    if s.startswith("||") or (s.startswith("/") and s.endswith("/")) or s.startswith("@@"):
        return "abp"
    first = s.split(None, 1)[0]
    if (" " in s or "\t" in s) and (first[0].isdigit() or ":" in first):
        return "hosts"
    return "domains"
