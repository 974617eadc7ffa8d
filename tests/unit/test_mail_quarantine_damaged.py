"""One damaged quarantine meta.json never hides the other quarantined messages (issue #15):
`mail quarantine list` lists the readable ones, names the damaged one (bilingual) and exits 1;
the damaged entry's message stays on disk."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.cli import mail as commands
from gateway.mail.engine import evaluate_message
from gateway.mail.policy import load_mail_policy
from gateway.mail.quarantine import QuarantineStore
from tests.mailcorpus.build import build_corpus

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
MAIL = build_corpus().by_name("executable-by-content")


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("damage", [b'{"id": "trunc', b"\xff\xfe not utf-8", b"[1, 2, 3]", b"[" * 100_000])
def test_one_damaged_meta_json_is_reported_and_the_others_listed(tmp_path, capsys, damage):
    store = QuarantineStore(tmp_path)
    verdict = evaluate_message(MAIL.raw, POLICY)
    ids = [store.put(MAIL.raw, verdict, now=datetime(2026, 4, day, 9, 0, tzinfo=UTC)) for day in (1, 2, 3)]
    (tmp_path / ids[1] / "meta.json").write_bytes(damage)
    assert [e.id for e in store.list()] == [ids[0], ids[2]]
    assert [entry_id for entry_id, _ in store.damaged] == [ids[1]]
    assert run(["mail", "quarantine", "list", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [ids[0], ids[2]]
    assert ids[1] in captured.err and "meta.json" in captured.err and "読めません" in captured.err
    assert (tmp_path / ids[1] / "message.eml").read_bytes() == MAIL.raw      # nothing was removed
