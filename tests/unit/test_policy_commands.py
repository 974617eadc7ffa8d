"""kanmon policy check / test / diff, called through argparse as cli.py will."""

from __future__ import annotations

import argparse
import io
import json
from datetime import date, timedelta

import pytest

from gateway.cli.policy import device_context_from_args, register

POLICY = """version: 1
lists:
  mail: {file: mail.txt}
rules:
  - {id: soon, action: monitor, expires: %s, match: {domain: soon.example}}
  - {id: webmail, action: block, match: {list: mail}}
  - {id: byod-news, action: block, match: {ownership: byod, domain: news.example}}
"""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(argv)


def run(argv: list[str], monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    args = parse(argv)
    return args.func(args), out.getvalue(), err.getvalue()


@pytest.fixture
def policy(tmp_path):
    (tmp_path / "mail.txt").write_text("gmail.com\n")
    path = tmp_path / "p.yaml"
    path.write_text(POLICY % (date.today() + timedelta(days=5)).isoformat())
    return path


def test_check_valid_warns_about_expiring_rules(policy, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "en")
    code, out, _ = run(["policy", "check", str(policy), "--expiring-days", "10"], monkeypatch)
    assert code == 0
    assert "Policy is valid" in out and "3 rules" in out
    assert "warning: rule soon" in out and f"{policy}:5" in out
    code, out, _ = run(["policy", "check", str(policy), "--expiring-days", "2"], monkeypatch)
    assert code == 0 and "warning" not in out


def test_check_invalid_prints_file_line_errors(policy, monkeypatch):
    policy.write_text(policy.read_text().replace("action: block, match: {list: mail}", "action: blok, match: {list: mail}"))
    code, out, err = run(["policy", "check", str(policy)], monkeypatch)
    assert code == 2 and out == ""   # a policy with errors is bad input (issue #19: it was 1 here, 2 in `test`)
    assert f"{policy}:6: rules[1].action:" in err
    assert "ポリシーにエラー" in err and "nothing applied" in err  # both languages by default


def test_test_json_one_object_per_line(policy, monkeypatch):
    code, out, _ = run(["policy", "test", "--policy", str(policy), "--json", "https://mail.gmail.com/x", "https://news.example/"], monkeypatch)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"url": "https://mail.gmail.com/x", "verdict": "block", "rule": "webmail", "explain": lines[0]["explain"]}
    assert "webmail" in lines[0]["explain"]
    assert lines[1]["verdict"] == "allow" and lines[1]["rule"] is None
    assert len(lines) == 2


def test_test_device_arguments_change_the_verdict(policy, monkeypatch):
    code, out, _ = run(["policy", "test", "--policy", str(policy), "--ownership", "byod", "--group", "byod", "--json",
                        "https://news.example/"], monkeypatch)
    assert code == 0 and json.loads(out)["rule"] == "byod-news"
    args = parse(["policy", "test", "--policy", "x", "--device-group", "a", "--group", "b", "--platform", "iOS",
                  "--os-version", "17.1", "--jailbroken", "--underlay-ip", "203.0.113.9", "u"])
    dev = device_context_from_args(args)
    assert dev.groups == {"a", "b"} and dev.platform == "ios" and dev.jailbroken and str(dev.underlay_ip) == "203.0.113.9"


def test_test_reads_urls_from_stdin(policy, monkeypatch):
    code, out, _ = run(["policy", "test", "--policy", str(policy), "--json"], monkeypatch,
                       stdin="# a comment\nhttps://gmail.com/\n\nhttps://ok.example/\n")
    assert code == 0
    assert [json.loads(x)["verdict"] for x in out.splitlines()] == ["block", "allow"]


def test_test_plain_output_and_input_errors(policy, monkeypatch):
    code, out, _ = run(["policy", "test", "--policy", str(policy), "https://gmail.com/"], monkeypatch)
    assert code == 0 and out.startswith("block\twebmail\thttps://gmail.com/\t")
    code, _, err = run(["policy", "test", "--policy", str(policy)], monkeypatch, stdin="")
    assert code == 2 and "no URLs" in err
    code, _, err = run(["policy", "test", "--policy", str(policy), "--underlay-ip", "nope", "https://a/"], monkeypatch)
    assert code == 2 and "--underlay-ip is not an IP address: nope" in err and "IP アドレスではありません" in err
    code, _, err = run(["policy", "test", "--policy", str(policy.parent / "none.yaml"), "https://a/"], monkeypatch)
    assert code == 2 and "cannot read file" in err


def test_diff_lists_changed_urls(policy, tmp_path, monkeypatch):
    new = tmp_path / "new.yaml"
    new.write_text(policy.read_text().replace("{domain: soon.example}", "{domain: soon.example}}\n  - {id: ok-block, action: block, match: {domain: ok.example}"))
    urls = tmp_path / "urls.txt"
    urls.write_text("https://gmail.com/\nhttps://ok.example/a\nhttps://other.example/\n")
    code, out, _ = run(["policy", "diff", str(policy), str(new), "--urls", str(urls)], monkeypatch)
    assert code == 0
    changed = [line for line in out.splitlines() if line.startswith("https://")]
    assert changed == ["https://ok.example/a\tallow (default) -> block (ok-block)"]
    assert "1 of 3" in out
    code, out, err = run(["policy", "diff", str(policy), str(new), "--urls", str(urls), "--json"], monkeypatch)
    (obj,) = [json.loads(x) for x in out.splitlines()]
    assert obj["old"]["verdict"] == "allow" and obj["new"]["rule"] == "ok-block"
    code, _, err = run(["policy", "diff", str(policy), str(new), "--urls", str(tmp_path / "nope.txt")], monkeypatch)
    assert code == 2 and "URL" in err
