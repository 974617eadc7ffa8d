"""Bad policies and bad lists: every problem reported as file:line, nothing built."""

from __future__ import annotations

import textwrap

import pytest

from gateway.policy import compile_text, load_policy
from gateway.policy.lists import parse_list
from gateway.yamlsource import SourceErrors


def errors_of(body: str, lists: dict[str, str] | None = None) -> list[str]:
    text = "version: 1\n" + textwrap.dedent(body).lstrip("\n")
    with pytest.raises(SourceErrors) as exc:
        compile_text(text, {k: (f"{k}.txt", v) for k, v in (lists or {}).items()}, filename="p.yaml")
    return [str(e) for e in exc.value.errors]


def test_schema_errors_point_at_their_lines():
    errs = errors_of("""
    rules:
      - id: ok
        action: block
      - id: bad-action
        action: deny
      - id: typo
        action: block
        match:
          domian: example.com
    """)
    assert any(e.startswith("p.yaml:6: rules[1].action:") and "deny" in e for e in errs), errs
    assert any(e.startswith("p.yaml:10: rules[2].match.domian: 不明なキーです") and " / unknown key" in e for e in errs), errs


def test_missing_version_and_unknown_top_level_key():
    with pytest.raises(SourceErrors) as exc:
        compile_text("rulez: []\n", filename="p.yaml")
    text = str(exc.value)
    assert "version" in text and "p.yaml:1: rulez: 不明なキーです" in text and "/ unknown key" in text


def test_bad_regex_in_rule_names_line_and_index():
    errs = errors_of("""
    rules:
      - id: r
        action: block
        match:
          url_regex:
            - "ok/[0-9]+"
            - "broken(["
    """)
    assert len(errs) == 1 and errs[0].startswith("p.yaml:8: rules[0].match.url_regex[1]: 正規表現が正しくありません: "), errs
    assert " / bad regular expression: " in errs[0]


def test_bad_regex_inside_a_list_file_names_the_list_line():
    errs = errors_of(
        """
    lists: {l: {file: l.txt, format: abp}}
    rules: [{id: r, action: block, match: {list: l}}]
    """,
        {"l": "||ok.example^\n! note\n/unclosed(/\n"},
    )
    assert errs == [e for e in errs if e.startswith("l.txt:3: ") and "bad regular expression" in e] and errs, errs


def test_semantic_errors_collected_together_with_lines():
    errs = errors_of("""
    systems:
      hr: {class: 3, cidrs: [10.0.0.0/33]}
    tenants:
      g: {provider: google}
    rules:
      - {id: dup, action: block, match: {dst_cidr: not-a-net}}
      - {id: dup, action: block, match: {list: nosuch}}
      - {id: t, action: tenant-restrict, tenant: nosuch}
      - {id: t2, action: tenant-restrict}
      - {id: when, action: block, expires: 31/03/2027}
      - {id: sys, action: block, match: {system: missing}}
      - {id: wc, action: block, match: {url: "http://a.example:xx/"}}
      - {id: dom, action: block, match: {domain: ["ok.example", "bad domain"]}}
    """)
    want = [
        ("p.yaml:3:", "systems.hr.cidrs[0]"),
        ("p.yaml:5:", "tenants.g.allowed_domains: プロバイダ google には必要です / required for provider google"),
        ("p.yaml:7:", "rules[0].match.dst_cidr: IP ネットワークではありません: 'not-a-net'"),
        ("p.yaml:8:", "duplicate rule id 'dup' (first on line 7)"),
        ("p.yaml:8:", "unknown list 'nosuch'"),
        ("p.yaml:9:", "unknown tenant 'nosuch'"),
        ("p.yaml:10:", "tenant-restrict needs tenant"),
        ("p.yaml:11:", "not a date"),
        ("p.yaml:12:", "unknown system 'missing'"),
        ("p.yaml:13:", "bad port"),
        ("p.yaml:14:", "rules[7].match.domain[1]: ドメイン名ではありません: 'bad domain' / not a domain name"),
    ]
    for where, what in want:
        assert any(e.startswith(where) and what in e for e in errs), (where, what, errs)


def test_duplicate_yaml_key_and_syntax_error():
    errs = errors_of("""
    rules:
      - id: a
        action: block
        action: allow
    """)
    assert any(e.startswith("p.yaml:5:") and "duplicate key" in e for e in errs), errs
    errs = errors_of("rules: [\n")
    assert errs[0].startswith("p.yaml:") and "syntax" in errs[0]


@pytest.mark.parametrize(
    ("fmt", "text", "line", "message"),
    [
        ("domains", "ok.example\nnot a domain\n", 2, "one domain per line"),
        ("domains", "ok.example\n*.wild.example\n", 2, "not a domain name"),
        ("domains", "ok.example\n\nbad..example\n", 3, "not a valid domain"),
        ("hosts", "0.0.0.0 a.example\nexample.com 1.2.3.4\n", 2, "must start with an IP address"),
        ("hosts", "# x\n0.0.0.0\n", 2, "names no host"),
        ("abp", "||a.example^\n||b.example^$third-party\n", 2, "unsupported ABP rule"),
        ("abp", "||a.example^\n/bad(/\n", 2, "bad regular expression"),
        ("auto", "a.example\n0.0.0.0 b.example\n||c.example^\n@@||d.example^\n", 4, "unsupported ABP rule"),
    ],
)
def test_list_line_errors(fmt, text, line, message):
    _, errors = parse_list(text, "l", "lists/l.txt", fmt)
    assert [(e.filename, e.line) for e in errors] == [("lists/l.txt", line)]
    assert message in errors[0].message
    assert str(errors[0]).startswith(f"lists/l.txt:{line}: ")


def test_list_parsing_all_formats():
    lst, errors = parse_list(
        "# comment\nPlain.Example.  # trailing comment\n0.0.0.0 h1.example h2.example # c\n127.0.0.1 localhost\n"
        "||abp.example^\n! abp comment\n/re[0-9]/\n",
        "l", "l.txt",
    )
    assert errors == []
    assert lst.suffix == {"plain.example", "abp.example"}
    assert lst.exact == {"h1.example", "h2.example"}
    assert [p for p, _ in lst.regexes] == ["re[0-9]"]
    exact_plain, _ = parse_list("a.example\n", "l", "l.txt", "domains", match="exact")
    assert exact_plain.exact == {"a.example"} and not exact_plain.suffix


def test_load_policy_reports_missing_list_file_at_policy_line(tmp_path):
    (tmp_path / "p.yaml").write_text("version: 1\nlists:\n  l: {file: missing.txt}\nrules: []\n")
    with pytest.raises(SourceErrors) as exc:
        load_policy(tmp_path / "p.yaml")
    (err,) = exc.value.errors
    assert err.line == 3 and "cannot read file" in err.message and "missing.txt" in err.message


def test_load_policy_reads_lists_relative_to_the_policy(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text("bad.example\n")
    (tmp_path / "p.yaml").write_text("version: 1\nlists:\n  l: {file: lists/l.txt}\nrules: [{id: r, action: block, match: {list: l}}]\n")
    snap = load_policy(tmp_path / "p.yaml")
    assert snap.lists == {"l": 1} and snap.rule("r") is not None
    (tmp_path / "lists" / "l.txt").write_text("bad.example\nbad line here\n")
    with pytest.raises(SourceErrors) as exc:
        load_policy(tmp_path / "p.yaml")
    assert str(exc.value.errors[0]).startswith(str(tmp_path / "lists" / "l.txt") + ":2:")


def test_shipped_example_policy_compiles():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    snap = load_policy(root / "policies" / "example.yaml")
    assert len(snap.rules) > 10 and set(snap.lists) >= {"webmail", "storage", "doh", "p2p", "sideload", "shortener", "sns-post"}
    for name in ("webmail", "storage", "sns-posting", "p2p-trackers", "shorteners", "doh-resolvers", "sideload-sources"):
        for n, line in enumerate((root / "policies" / "lists" / f"{name}.txt").read_text().splitlines(), 1):
            s = line.strip()
            if s and not s.startswith(("#", "!")):
                assert "# source:" in s, f"{name}.txt:{n} has no source comment"
