"""`kanmon mail ...` handlers, called with parsed argparse namespaces; bad input gets a
bilingual error and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.cli.mail import register
from gateway.mail.engine import evaluate_message
from gateway.mail.indicators import ALL_NAMES
from gateway.mail.policy import load_mail_policy
from gateway.mail.quarantine import QuarantineStore
from tests.mailcorpus.build import build_corpus

REPO = Path(__file__).resolve().parents[2]
POLICY_PATH = REPO / "policies" / "mail.yaml"
CORPUS = build_corpus()


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def scan(path: Path, *extra: str) -> list[str]:
    return ["mail", "scan", str(path), "--policy", str(POLICY_PATH), "--no-virus-scan", "--no-dns", *extra]


def test_scan_json_is_one_object_with_every_indicator(tmp_path, capsys):
    mail = CORPUS.by_name("combo-phish-link-lookalike")
    path = tmp_path / "m.eml"
    path.write_bytes(mail.raw)
    assert run(scan(path, "--json")) == 1
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert set(doc) == {"verdict", "indicators"} and doc["verdict"] == "quarantine"
    assert {i["name"] for i in doc["indicators"]} == set(mail.expect)
    for ind in doc["indicators"]:
        assert set(ind) == {"name", "weight", "evidence"} and ind["name"] in ALL_NAMES
        assert isinstance(ind["weight"], int) and ind["evidence"]


def test_scan_clean_mail_exits_0_and_prints_both_languages(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KANMON_LANG", raising=False)
    path = tmp_path / "m.eml"
    path.write_bytes(CORPUS.by_name("clean-iso2022jp").raw)
    assert run(scan(path)) == 0
    out = capsys.readouterr().out
    assert "判定: deliver" in out and "verdict: deliver" in out


def test_scan_text_lists_indicators(tmp_path, capsys):
    path = tmp_path / "m.eml"
    path.write_bytes(CORPUS.by_name("archive-with-exe").raw)
    assert run(scan(path)) == 1
    out = capsys.readouterr().out
    assert "archive-threat (60)" in out and "資料.scr" in out


@pytest.mark.parametrize("content,reason_en", [
    (b"", "the message is empty"),
    (b"\x00\x01\x02\xff\xfe garbage \x89PNG\r\n", "no header section"),
    (b"From: a@b.example\nSubject: x\nContent-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: applic", "truncated"),
])
def test_bad_eml_gets_a_bilingual_error(tmp_path, capsys, content, reason_en):
    path = tmp_path / "bad.eml"
    path.write_bytes(content)
    assert run(scan(path)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "判定できません" in captured.err and reason_en in captured.err
    assert "Traceback" not in captured.err


def test_truncated_corpus_mail_is_an_error(tmp_path, capsys):
    raw = CORPUS.by_name("archive-with-exe").raw
    path = tmp_path / "cut.eml"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    assert run(scan(path)) == 2
    assert "truncated" in capsys.readouterr().err


def test_missing_file_and_bad_policy(tmp_path, capsys):
    assert run(scan(tmp_path / "nope.eml")) == 2
    err = capsys.readouterr().err
    assert "ファイルを読めません" in err and "cannot read file" in err
    bad = tmp_path / "mail.yaml"
    bad.write_text("version: 1\nthresholds: [\n", encoding="utf-8")
    path = tmp_path / "m.eml"
    path.write_bytes(CORPUS.by_name("clean-ascii").raw)
    assert run(["mail", "scan", str(path), "--policy", str(bad), "--no-dns"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "the mail policy has errors" in err


def test_quarantine_commands(tmp_path, capsys):
    policy = load_mail_policy(POLICY_PATH)
    store = QuarantineStore(tmp_path / "q")
    mail = CORPUS.by_name("combo-freemail-impersonation-exe")
    entry_id = store.put(mail.raw, evaluate_message(mail.raw, policy))
    qdir = str(tmp_path / "q")

    assert run(["mail", "quarantine", "list", "--dir", qdir]) == 0
    out = capsys.readouterr().out
    assert entry_id in out and "人事異動のお知らせ" in out

    assert run(["mail", "quarantine", "show", entry_id, "--dir", qdir]) == 0
    out = capsys.readouterr().out
    assert "double-extension" in out and "二重拡張子" in out

    assert run(["mail", "quarantine", "show", "../../etc", "--dir", qdir]) == 2
    assert "malformed quarantine id" in capsys.readouterr().err

    out_file = tmp_path / "released.eml"
    assert run(["mail", "quarantine", "release", entry_id, "--dir", qdir, "--out", str(out_file)]) == 0
    assert out_file.read_bytes() == mail.raw
    assert store.list() == []

    entry_id = store.put(mail.raw, evaluate_message(mail.raw, policy))
    # release to an existing file fails and keeps the entry
    assert run(["mail", "quarantine", "release", entry_id, "--dir", qdir, "--out", str(out_file)]) == 2
    assert [e.id for e in store.list()] == [entry_id]
    capsys.readouterr()
    assert run(["mail", "quarantine", "delete", entry_id, "--dir", qdir]) == 0
    assert run(["mail", "quarantine", "delete", entry_id, "--dir", qdir]) == 2
    assert "no quarantined message" in capsys.readouterr().err
