"""Fuzz: policy YAML loading and compiling.

Whatever the operator writes — arbitrary text, a mangled copy of a real policy, or any YAML
structure built from the language's own keys with hostile values — ``compile_text`` gives a
snapshot or ``SourceErrors`` whose every error names the file and a real line
(``file:line: key: message``). Never another exception, never a hang. A snapshot that
compiles must also decide a query at every stage without raising.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml
from hypothesis import strategies as st

from gateway.policy import DeviceContext, PolicySnapshot, compile_text, query_for_url
from gateway.policy.schema import CONDITIONS
from gateway.verdict import Stage, Verdict
from gateway.yamlsource import SourceErrors
from tests.fuzz.harness import Harness

ROOT = Path(__file__).resolve().parents[2]
FILENAME = "fuzz-policy.yaml"
SEED_POLICIES = [p.read_text(encoding="utf-8") for p in
                 (ROOT / "policies" / "example.yaml", ROOT / "tests" / "e2e" / "policies" / "lab.yaml",
                  ROOT / "tests" / "e2e" / "policies" / "lab-switch.yaml") if p.exists()]
LIST_NAMES = ["webmail", "storage", "sns-post", "p2p", "shortener", "doh", "sideload"]
DEVICE = DeviceContext("fuzz-1", frozenset({"staff", "byod"}), "byod", user="sato", platform="ios",
                       os_version="16.1", jailbroken=False)
NOW = dt.datetime(2025, 6, 2, 3, 4, 5, tzinfo=dt.UTC)


_SHIPPED_LIST_FILES = {"webmail": "webmail", "storage": "storage", "sns-post": "sns-posting", "p2p": "p2p-trackers",
                       "shortener": "shorteners", "doh": "doh-resolvers", "sideload": "sideload-sources"}
SHIPPED_LISTS = {name: (ROOT / "policies" / "lists" / f"{stem}.txt").read_text(encoding="utf-8")
                 for name, stem in _SHIPPED_LIST_FILES.items()}


def _list_texts(fuzzed: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The shipped lists, some replaced by fuzzed text (so rules get compiled, not only
    refused for a missing list)."""
    return {name: (f"lists/{name}.txt", fuzzed.get(name, text)) for name, text in SHIPPED_LISTS.items()}


OUTCOMES = {"snapshots": 0, "errors": 0}  # bench/fuzz.py reports how often each outcome was reached


def _line_count(text: str, yaml_breaks: bool = False) -> int:
    """How many lines an editor shows (CR, LF, CRLF), plus one; the YAML reader also
    breaks lines at NEL and U+2028/U+2029, so a YAML mark may count those too."""
    extra = ("\x85", "\u2028", "\u2029") if yaml_breaks else ()
    return 2 + sum(text.count(c) for c in ("\n", "\r") + extra)


def check_compiles_or_points_at_a_line(text: str, lists: dict[str, str]) -> None:
    n_lines = _line_count(text, yaml_breaks=True)
    list_lines = {filename: _line_count(body) for filename, body in _list_texts(lists).values()}
    try:
        snapshot = compile_text(text, _list_texts(lists), filename=FILENAME, compiled_at=NOW)
    except SourceErrors as exc:
        OUTCOMES["errors"] += 1
        assert exc.errors, "SourceErrors without a single error"
        for err in exc.errors:
            limit = n_lines if err.filename == FILENAME else list_lines.get(err.filename)
            assert limit is not None, f"error names an unknown file: {err}"
            assert 1 <= err.line <= limit, f"line {err.line} outside the file ({limit} lines): {err}"
            assert str(err).startswith(f"{err.filename}:{err.line}: "), str(err)
            assert err.message
        return
    assert isinstance(snapshot, PolicySnapshot)
    OUTCOMES["snapshots"] += 1
    for url in ("https://mail.example.com/inbox", "http://例え.jp/a.apk", "https://[2001:db8::1]:8443/x?y=1"):
        for stage in (Stage.DNS, Stage.TLS, Stage.REQUEST, Stage.RESPONSE, Stage.TCP):
            verdict = snapshot.decide(query_for_url(url, DEVICE, stage=stage, now=NOW,
                                                    response_content_type="application/zip", body_size=10**9))
            assert isinstance(verdict, Verdict)


# -- strategies --------------------------------------------------------------------------

# Values chosen to reach every branch of the compiler: good and bad domains, CIDRs, ports,
# regexes, wildcards, dates, sizes, time windows, names that refer to lists/systems/tenants.
_ATOMS = st.one_of(
    st.sampled_from([
        "example.com", "*.example.com", "例え.jp", "xn--r8jz45g.jp", "EXAMPLE.COM.", "a..b", "-bad-.com", "",
        " ", "*", "**", "http://*", "https://files.test/secret/*", "user@host/x", "host:99999", "host:x/",
        "[2001:db8::1]", "10.0.0.0/8", "10.0.0.1/33", "2001:db8::/129", "fe80::1%eth0", "not-an-ip",
        "(unclosed", "a{1000}{1000}", "\\p{Han}+", "(?P<n>x)", "a" * 300, "1-65535", "0", "65536", "443-80",
        "10MiB", "5 kB", "12XB", "application/zip", "video/*", "noslash", "apk", ".exe", "> 2", "<=1", "4",
        "2024-02-30", "2099-12-31", "yesterday", "ios", "android", "17.4.1", "14.0-beta", "org", "byod",
        "active", "retired", "quarantined", "webmail", "storage", "nolist", "portal", "google-org", "m365-org",
        "Asia/Tokyo", "Mars/Olympus", "../../etc/passwd", "09:00", "24:00", "23:60", "mon", "weekdays",
        "\x00", "\u202e", "\ud7ff", "💥", "true", "null", "~",
    ]),
    st.integers(-2, 70000), st.booleans(), st.none(), st.floats(allow_nan=True, allow_infinity=True),
    st.dates(min_value=dt.date(1, 1, 1)), st.text(max_size=12),
)
_KEYS = st.sampled_from(sorted(CONDITIONS) + [
    "id", "action", "match", "unless", "tenant", "expires", "status", "category", "dns_block", "reason",
    "owner", "description", "file", "format", "class", "hosts", "cidrs", "provider", "allowed_domains",
    "tenants", "context", "tenant_policy", "restrict_msa", "mode", "from", "to", "days", "name", "rules",
    "applies_to", "settings", "default_action", "timezone", "no_sni", "version", "<<", "bogus"])


def _values(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return _ATOMS
    inner = _values(depth - 1)
    return st.one_of(_ATOMS, st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4))


_ACTIONS = st.sampled_from(["allow", "block", "monitor", "no-inspect", "tenant-restrict", "deny", 1, None])
_CONDITION_BLOCK = st.dictionaries(st.sampled_from(sorted(CONDITIONS) + ["bogus"]), _values(2), max_size=4)
_RULE = st.fixed_dictionaries(
    {"id": st.one_of(st.sampled_from(["r1", "r2", "r1", "bad id", "", "x.y:z"]), _ATOMS), "action": _ACTIONS},
    optional={"match": _CONDITION_BLOCK, "unless": _CONDITION_BLOCK, "tenant": _ATOMS, "expires": _ATOMS,
              "status": st.sampled_from(["active", "retired", "gone"]), "category": _ATOMS,
              "dns_block": st.sampled_from(["nxdomain", "sinkhole", "drop"]), "reason": _ATOMS, "bogus": _ATOMS})
_POLICY = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1", None])},
    optional={
        "settings": st.dictionaries(st.sampled_from(["default_action", "timezone", "no_sni", "dns_block", "x"]),
                                    _ATOMS, max_size=4),
        "lists": st.dictionaries(st.sampled_from(LIST_NAMES + ["missing"]), st.fixed_dictionaries(
            {"file": st.sampled_from([f"lists/{n}.txt" for n in LIST_NAMES] + ["lists/absent.txt"])},
            optional={"format": st.sampled_from(["auto", "domains", "hosts", "abp", "csv"]),
                      "match": st.sampled_from(["suffix", "exact", "fuzzy"])}), max_size=3),
        "systems": st.dictionaries(st.sampled_from(["portal", "db", "x"]), st.dictionaries(
            st.sampled_from(["class", "hosts", "cidrs", "owner"]), _values(1), max_size=3), max_size=2),
        "tenants": st.dictionaries(st.sampled_from(["google-org", "m365-org", "t"]), st.dictionaries(
            st.sampled_from(["provider", "allowed_domains", "tenants", "context", "tenant_policy", "restrict_msa",
                             "workspaces", "team_ids", "mode"]), _values(1), max_size=4), max_size=2),
        "rule_groups": st.lists(st.fixed_dictionaries(
            {"name": _ATOMS, "rules": st.lists(_RULE, max_size=3)},
            optional={"applies_to": st.dictionaries(st.sampled_from(["device_group", "ownership", "platform",
                                                                     "device_status", "domain"]), _values(1),
                                                    max_size=2)}), max_size=2),
        "rules": st.lists(_RULE, max_size=5),
        "bogus": _ATOMS,
    })
_LIST_LINE = st.one_of(
    st.sampled_from(["example.com", "||ads.example^", "0.0.0.0 tracker.test other.test", "/^https?://x\\.test/.*/",
                     "/(unclosed/", "# comment", "! abp comment", "||bad^$third-party", "127.0.0.1 localhost",
                     "例え.jp", "*.wild.example", "a..b", "::1 ip6-localhost", "|http://x", "@@||allow.example^",
                     "[Adblock Plus 2.0]", "\ufeffbom.example", "x" * 300]),
    st.text(max_size=30))
_LISTS = st.dictionaries(st.sampled_from(LIST_NAMES), st.lists(_LIST_LINE, max_size=6).map("\n".join), max_size=3)


def _mutate(text: str, data: "_Drawer") -> str:
    lines = text.splitlines(keepends=True) or [""]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["delete", "duplicate", "indent", "dedent", "insert", "truncate", "swap"]))
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = data.draw(st.sampled_from([" ", "  ", "\t", "- "])) + lines[i]
        elif op == "dedent":
            lines[i] = lines[i].lstrip()
        elif op == "insert":
            pos = data.draw(st.integers(0, len(lines[i])))
            junk = data.draw(st.one_of(st.sampled_from([":", "- ", "{", "}", "[", "]", "&a", "*a", "!!python/object:os.system",
                                                        "%YAML 1.1\n", "---\n", "\"", "'", "|", ">", "#", "\x00", "\t"]),
                                       st.text(max_size=5)))
            lines[i] = lines[i][:pos] + junk + lines[i][pos:]
        elif op == "truncate":
            lines[i] = lines[i][: data.draw(st.integers(0, len(lines[i])))]
        elif op == "swap" and len(lines) > 1:
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


@st.composite
def _mutated_seed(draw) -> tuple[str, dict[str, str]]:
    seed = draw(st.sampled_from(SEED_POLICIES))
    return _mutate(seed, _Drawer(draw)), draw(_LISTS)


class _Drawer:
    """Lets ``_mutate`` draw from inside a composite strategy."""

    def __init__(self, draw):
        self.draw = draw


def _dump(doc: object) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:
        return "version: 1\n"


# Hostile inputs at the bounds (issue #15): alias bombs, nesting, huge numbers, odd tags,
# impossible dates, long lines and time zones, each built at a random size, put into a
# valid policy. Every one must give file:line errors (or compile), quickly, and no error
# may print a whole huge value.
_HOSTILE_TAGS = ["!!binary aGk=", "!!set {a: null}", "!!omap [a: 1]", "!!pairs [a: 1]", "!!python/name:os.system",
                 "!local x", "!!int abc", "!!float x", "!!bool maybe", "!!timestamp 2025-99-99", "!!str ok", "!!int 0x1F"]


@st.composite
def _hostile_policy(draw) -> str:
    kind = draw(st.sampled_from(["bomb", "flow", "block", "number", "tag", "date", "line", "timezone", "merge"]))
    rule = "rules:\n  - id: r\n    action: block\n    match: {domain: example.com}\n"
    if kind == "bomb":
        levels, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        lines = ["x0: &a0 [" + ", ".join(["lol"] * width) + "]"]
        lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
        return "version: 1\n" + rule + "\n".join(lines) + "\n"
    if kind == "flow":
        depth = draw(st.integers(1, 3000))
        return "version: 1\n" + rule + "x: " + "[" * depth + "]" * depth + "\n"
    if kind == "block":
        depth = draw(st.integers(1, 300))
        return "version: 1\n" + rule + "x:\n" + "".join("  " * (i + 1) + "k:\n" for i in range(depth))
    if kind == "number":
        digits = draw(st.integers(1, 6000))
        where = draw(st.sampled_from(["version: {n}\n", "version: 1\nsettings: {{timezone: {n}}}\n",
                                      "version: 1\nsystems: {{s: {{class: {n}}}}}\n",
                                      "version: 1\nrules:\n  - {{id: r, action: block, match: {{mfa_within: {n}}}}}\n"]))
        return where.format(n=draw(st.sampled_from(["", "-", "0x", "0o", "1_"])) + "9" * digits)
    if kind == "tag":
        return "version: 1\n" + rule + "    expires: " + draw(st.sampled_from(_HOSTILE_TAGS)) + "\n"
    if kind == "date":
        y, m, d = draw(st.integers(0, 99999)), draw(st.integers(0, 99)), draw(st.integers(0, 99))
        return "version: 1\n" + rule + f"    expires: {y:04d}-{m:02d}-{d:02d}\n"
    if kind == "line":
        n = draw(st.integers(60_000, 140_000))
        return "version: 1\n" + rule + "    description: " + "x" * n + "\n"
    if kind == "timezone":
        return "version: 1\nsettings:\n  timezone: " + draw(st.text(min_size=1, max_size=20)).replace("\n", "") * \
            draw(st.integers(1, 400)) + "\n"
    return "version: 1\n" + rule + "x:\n  a: 1\n  <<: {a: 2}\n"


def check_hostile(text: str) -> None:
    try:
        check_compiles_or_points_at_a_line(text, {})
    except SourceErrors as exc:  # pragma: no cover - check_compiles_or_points_at_a_line handles these
        raise AssertionError(exc) from None
    try:
        compile_text(text, _list_texts({}), filename=FILENAME, compiled_at=NOW)
    except SourceErrors as exc:
        assert all(len(str(err)) < 2000 for err in exc.errors), [len(str(e)) for e in exc.errors]


HARNESSES = [
    Harness("policy-text", st.tuples(st.one_of(st.text(max_size=400), st.binary(max_size=300).map(
        lambda b: b.decode("utf-8", "replace"))), _LISTS), lambda v: check_compiles_or_points_at_a_line(*v),
        ci_examples=150),
    Harness("policy-mutated", _mutated_seed(), lambda v: check_compiles_or_points_at_a_line(*v), ci_examples=120),
    Harness("policy-structure", st.tuples(_POLICY.map(_dump), _LISTS),
            lambda v: check_compiles_or_points_at_a_line(*v), ci_examples=150),
    Harness("policy-hostile", _hostile_policy(), check_hostile, ci_examples=120, hang_seconds=5.0),
]

for _h in HARNESSES:
    globals()[_h.as_test().__name__] = _h.as_test()
