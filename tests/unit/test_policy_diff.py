"""A candidate policy against the one in force (gateway/policy/diff.py) and the shared URL
test path (gateway/policy/urltest.py) that `kanmon policy test|diff` and the console use
(issue #21)."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest

from gateway.policy import DeviceContext, compile_text
from gateway.policy.compiler import parse_policy
from gateway.policy.diff import diff_documents, rules_in_order
from gateway.policy.loader import load_policy, load_policy_text
from gateway.policy.urltest import RequestShape, judge_urls, url_warning, verdict_changes
from gateway.verdict import Action, Stage
from gateway.yamlsource import SourceErrors

NOW = datetime(2026, 6, 10, 3, 0, tzinfo=UTC)
DEVICE = DeviceContext("d1", frozenset({"staff"}), "org", user="sato")
BYOD = DeviceContext("d2", frozenset({"byod"}), "byod", user="suzuki")

OLD = """
settings: {default_action: allow}
lists:
  mail: {file: mail.txt, description: "web mail"}
rule_groups:
  - name: byod
    applies_to: {device_group: byod}
    rules:
      - {id: byod-sns, action: block, match: {domain: sns.example}}
rules:
  - {id: block-mail, action: block, match: {list: mail}, description: "free mail", description_ja: "フリーメール"}
  - {id: block-storage, action: block, match: {domain: storage.example}}
  - {id: monitor-news, action: monitor, match: {domain: news.example}}
"""

NEW = """
settings: {default_action: allow}
lists:
  mail: {file: mail.txt, description: "free web mail"}
rule_groups:
  - name: byod
    applies_to: {device_group: [byod, guest]}
    rules:
      - {id: byod-sns, action: block, match: {domain: sns.example}}
rules:
  - {id: monitor-news, action: monitor, match: {domain: news.example}}
  - {id: block-mail, action: block, match: {list: mail}, description: "free mail", description_ja: "フリーメール"}
  - {id: block-video, action: block, match: {domain: video.example}}
"""


def doc(text: str):
    return parse_policy("version: 1\n" + textwrap.dedent(text), "p.yaml")[0].data


def snap(text: str, mail: str = "gmail.com\n"):
    return compile_text("version: 1\n" + textwrap.dedent(text), {"mail": ("mail.txt", mail)}, filename="p.yaml",
                        compiled_at=NOW)


def test_rules_in_precedence_order():
    assert [(r, g) for r, g, _ in rules_in_order(doc(OLD))] == [
        ("byod-sns", "byod"), ("block-mail", None), ("block-storage", None), ("monitor-news", None)]


def test_diff_names_added_removed_changed_and_moved_rules_and_lists():
    d = diff_documents(doc(OLD), doc(NEW), snap(OLD), snap(NEW, "gmail.com\nyahoo.co.jp\n"))
    by = {(c.name, c.kind) for c in d.rules}
    assert ("block-video", "added") in by and ("block-storage", "removed") in by
    # monitor-news went from last to first: it moved; block-mail kept its place relative to it? no:
    # one of the two moved (the longest common order keeps the other)
    moved = [c.name for c in d.rules if c.kind == "moved"]
    assert len(moved) == 1 and moved[0] in {"monitor-news", "block-mail"}
    assert [(c.name, c.kind, c.keys) for c in d.groups] == [("byod", "changed", ("applies_to",))]
    [mail] = d.lists
    assert (mail.name, mail.kind) == ("mail", "changed") and set(mail.keys) == {"description", "entries"}
    assert not d.settings and not d.empty


def test_rule_changed_key_by_key_and_group_change():
    old = doc("""
    rules:
      - {id: a, action: block, match: {domain: a.example}}
    """)
    new = doc("""
    rule_groups:
      - name: g
        applies_to: {device_group: staff}
        rules:
          - {id: a, action: allow, match: {domain: a.example}, reason: approved}
    """)
    [c] = diff_documents(old, new).rules
    assert (c.name, c.kind, c.keys, c.group) == ("a", "changed", ("action", "reason", "rule_groups"), "g")


def test_identical_policies_have_an_empty_diff():
    assert diff_documents(doc(OLD), doc(OLD), snap(OLD), snap(OLD)).empty


def test_list_file_content_change_alone_is_reported_by_entry_count():
    d = diff_documents(doc(OLD), doc(OLD), snap(OLD, "a.example\n"), snap(OLD, "a.example\nb.example\n"))
    [c] = d.lists
    assert (c.name, c.kind, c.keys, c.old, c.new) == ("mail", "changed", ("entries",), 1, 2)


def test_settings_change():
    d = diff_documents(doc("settings: {default_action: allow}"), doc("settings: {default_action: block}"))
    [c] = d.settings
    assert (c.name, c.old, c.new) == ("default_action", "allow", "block")


def test_verdict_changes_lists_only_urls_whose_action_changes():
    urls = ["https://storage.example/x", "https://video.example/", "https://gmail.com/", "https://other.example/"]
    changes = verdict_changes(snap(OLD), snap(NEW), urls, DEVICE, RequestShape(), NOW)
    assert [(c.url, c.old.action, c.new.action) for c in changes] == [
        ("https://storage.example/x", Action.BLOCK, Action.ALLOW), ("https://video.example/", Action.ALLOW, Action.BLOCK)]


def test_judge_urls_gives_warnings_and_skips_what_cannot_be_judged():
    s = snap(OLD)
    results = judge_urls(s, ["https://gmail.com/", "gmail.com", "htps://gmail.com", "", "https:///x"], DEVICE,
                         RequestShape(), NOW)
    assert [r.kind for r in results] == ["ok", "shorthand", "guess", "skip", "skip"]
    assert results[0].verdict.rule_id == "block-mail" and results[1].verdict.rule_id == "block-mail"
    assert results[3].verdict is None and results[3].warning is not None
    assert results[1].warning.ja and results[1].warning.en
    # at the DNS stage a bare host is what is seen anyway: no warning
    assert judge_urls(s, ["gmail.com"], DEVICE, RequestShape(stage=Stage.DNS), NOW)[0].warning is None


def test_judge_urls_for_a_group():
    s = snap(OLD)
    [staff] = judge_urls(s, ["https://sns.example/"], DEVICE, RequestShape(), NOW)
    [byod] = judge_urls(s, ["https://sns.example/"], BYOD, RequestShape(), NOW)
    assert staff.verdict.action is Action.ALLOW and byod.verdict.rule_id == "byod-sns"


def test_url_warning_kinds():
    assert url_warning("https://a.example/")[1] == "ok"
    assert url_warning("   ")[1] == "skip"


def test_load_policy_text_reads_lists_beside_the_named_path_and_writes_nothing(tmp_path):
    (tmp_path / "mail.txt").write_text("gmail.com\n")
    before = sorted(tmp_path.iterdir())
    s = load_policy_text("version: 1\n" + textwrap.dedent(OLD), tmp_path / "candidate.yaml", feeds_dir=tmp_path / "feeds")
    assert s.lists == {"mail": 1}
    assert sorted(tmp_path.iterdir()) == before
    (tmp_path / "p.yaml").write_text("version: 1\n" + textwrap.dedent(OLD))
    assert load_policy(tmp_path / "p.yaml", feeds_dir=tmp_path / "feeds").version == s.version


def test_load_policy_text_refuses_bad_yaml_with_file_and_line(tmp_path):
    with pytest.raises(SourceErrors) as exc:
        load_policy_text("version: 1\nrules: [\n", tmp_path / "candidate.yaml")
    assert "candidate.yaml" in str(exc.value.errors[0])
