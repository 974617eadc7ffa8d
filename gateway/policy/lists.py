"""Domain lists shared by many rules: plain domains, hosts-file format, and a small ABP
subset (``||domain^`` and ``/regex/``). Parsing is pure: text in, entries or
``file:line`` errors out.

Entry semantics (documented in LANGUAGE.md):
- plain ``example.com``  -> example.com and every sub-domain (``match: exact`` to change)
- hosts ``0.0.0.0 a.example b.example`` -> exactly those names (hosts files list names)
- ABP ``||example.com^`` -> example.com and every sub-domain
- ABP ``/regex/`` -> a URL regular expression (RE2 syntax), checked at the HTTP stages

Bounds (issue #15): a list file is at most ``MAX_LIST_BYTES`` (read by gateway/yamlsource's
``read_text_file``: a regular file only), a line at most ``MAX_LIST_LINE_CHARS``, and at most
``MAX_ERRORS`` errors are reported per file. Errors name the file and line but never quote
the line: a list pointed at the wrong file (/etc/shadow) must not print it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from ipaddress import ip_address

import re2

from gateway.hostname import normalize_host
from gateway.i18n import Text
from gateway.yamlsource import MAX_ERRORS, MAX_LIST_BYTES, T_LINE_TOO_LONG, T_TOO_MANY, SourceError

# A domain is at most 253 characters; an ABP regex line a few hundred.
MAX_LIST_LINE_CHARS = 4096

T_NOT_DOMAIN = Text("ドメイン名として正しくありません", "not a valid domain name")
T_BAD_REGEX = Text("正規表現の誤り: {problem}", "bad regular expression: {problem}")
T_ABP = Text("対応していない ABP ルールです（使えるのは ||domain^ と /regex/ だけです）",
             "unsupported ABP rule (only ||domain^ and /regex/ are understood)")
T_HOSTS_IP = Text("hosts 形式の行は IP アドレスで始まります", "hosts line must start with an IP address")
T_HOSTS_EMPTY = Text("hosts 形式の行にホスト名がありません", "hosts line names no host")
T_ONE_PER_LINE = Text("1 行に 1 つのドメインを書いてください", "one domain per line expected")
T_NOT_NAME = Text("ドメイン名ではありません（サブドメインは自動で含まれます。パスには url ルールを使ってください）",
                  "not a domain name (a plain entry already covers sub-domains; use a url rule for paths)")

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
# A chunk of lines, each a lower-case ASCII domain in _LABELS' form or blank (parse_list's
# bulk path). RE2: linear in the chunk, no backtracking; the length bound (the lookahead of
# _LABELS, which RE2 lacks) is checked on the lines themselves.
_CLEAN_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_CLEAN_LINE = rf"(?:{_CLEAN_LABEL}(?:\.{_CLEAN_LABEL})*)?"
_CLEAN_CHUNK = re2.compile(rf"{_CLEAN_LINE}(?:\n{_CLEAN_LINE})*")
_MAX_DOMAIN_CHARS = 253


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


def parse_list(text: str, name: str, filename: str, fmt: str = "auto", match: str = "suffix",
               chunk_lines: int = 4096) -> tuple[DomainList, list[SourceError]]:
    """Parse one list file. Every line that is not a comment, blank, or a valid entry is
    reported as ``filename:line``; the caller applies nothing when errors are returned.

    Lines are taken ``chunk_lines`` at a time. A chunk of a ``domains``/``auto`` list whose
    every line is a plain lower-case ASCII domain (or blank) — nearly all of a real block
    list — is checked by one RE2 match over the chunk and added as it is: for such a line
    the line-by-line path below would add the line itself (``normalize_host`` leaves it
    unchanged, ``valid_domain`` accepts it). Any other chunk goes line by line. A million
    domains take 2.2 s of CPU line by line, 0.5 s this way (issue #22, bench/engine_scale.py);
    tests/fuzz/test_engine_scale_paths.py checks that both paths give the same result
    (``chunk_lines=0``: line by line only)."""
    suffix: set[str] = set()
    exact: set[str] = set()
    regexes: list[tuple[str, int]] = []
    errors: list[SourceError] = []
    plain_target = exact if match == "exact" else suffix
    bulk: list[list[str]] = []  # chunks of clean lines, added to plain_target at the end

    def err(lineno: int, text: Text) -> None:
        errors.append(SourceError.of(filename, lineno, (), text))

    def add_domain(raw: str, lineno: int, target: set[str]) -> None:
        host = normalize_host(raw)
        if host is None or not valid_domain(host):
            err(lineno, T_NOT_DOMAIN)
            return
        target.add(host)

    def one_line(lineno: int, line: str) -> bool:
        """The line-by-line path; False once too many errors stop the file."""
        if len(errors) >= MAX_ERRORS:
            err(lineno, T_TOO_MANY.format(limit=MAX_ERRORS))
            return False
        if len(line) > MAX_LIST_LINE_CHARS:
            err(lineno, T_LINE_TOO_LONG.format(limit=MAX_LIST_LINE_CHARS))
            return True
        s = line.strip()
        if not s or s[0] == "#" or (s[0] == "!" and fmt in ("auto", "abp")):
            return True
        if s[0] == "[" and s.endswith("]") and fmt in ("auto", "abp"):
            return True  # "[Adblock Plus 2.0]" header
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
                    # RE2 quotes the offending part after ": "; the line is not printed.
                    err(lineno, T_BAD_REGEX.format(problem=problem.split(": ", 1)[0][:200]))
                else:
                    regexes.append((pattern, lineno))
                return True
            m = _ABP_DOMAIN.match(s)
            if not m:
                err(lineno, T_ABP)
                return True
            add_domain(m.group(1), lineno, suffix)
        elif kind == "hosts":
            fields = s.split()
            try:
                ip_address(fields[0])
            except ValueError:
                err(lineno, T_HOSTS_IP)
                return True
            if len(fields) < 2:
                err(lineno, T_HOSTS_EMPTY)
                return True
            for raw in fields[1:]:
                if raw.lower() in _HOSTS_SELF_NAMES:
                    continue
                add_domain(raw, lineno, exact)
        else:
            if " " in s or "\t" in s:
                err(lineno, T_ONE_PER_LINE)
                return True
            if "*" in s or "/" in s:
                err(lineno, T_NOT_NAME)
                return True
            add_domain(s, lineno, plain_target)
        return True

    # Lines as an editor numbers them: str.splitlines() also breaks at form feeds, NEL and
    # U+2028, which shifted every later error's line number (found by tests/fuzz).
    lines = text.split("\n") if "\r" not in text else _LINE_BREAK.split(text)
    fast = fmt in ("auto", "domains") and chunk_lines > 0  # 0: line by line only (the tests' reference)
    step = chunk_lines if chunk_lines > 0 else 4096
    for start in range(0, len(lines), step):
        chunk = lines[start:start + step]
        if (fast and len(errors) < MAX_ERRORS and max(map(len, chunk)) <= _MAX_DOMAIN_CHARS
                and _CLEAN_CHUNK.fullmatch("\n".join(chunk))):
            bulk.append(chunk)
            continue
        if not all(one_line(lineno, line) for lineno, line in enumerate(chunk, start + 1)):
            break
    # One frozenset from the clean chunks and the entries added line by line (no set copied
    # into a frozenset: at a million entries each copy is 32 MiB more to allocate).
    plain = frozenset(filter(None, chain(plain_target, *bulk)))  # filter: the blank lines of clean chunks
    other = frozenset(exact if plain_target is suffix else suffix)
    if plain_target is suffix:
        return DomainList(name, filename, plain, other, tuple(regexes)), errors
    return DomainList(name, filename, other, plain, tuple(regexes)), errors


def _detect(s: str) -> str:
    if s.startswith("||") or (s.startswith("/") and s.endswith("/")) or s.startswith("@@"):
        return "abp"
    first = s.split(None, 1)[0]
    if (" " in s or "\t" in s) and (first[0].isdigit() or ":" in first):
        return "hosts"
    return "domains"
