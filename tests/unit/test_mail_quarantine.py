"""The quarantine store: entries survive intact, ids are checked, tampering is noticed, and
release removes an entry only after the message was handed on."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.mail.engine import MailContext, evaluate_message
from gateway.mail.policy import load_mail_policy
from gateway.mail.quarantine import QuarantineError, QuarantineStore
from tests.mailcorpus.build import build_corpus

REPO = Path(__file__).resolve().parents[2]
POLICY = load_mail_policy(REPO / "policies" / "mail.yaml")
MAIL = build_corpus().by_name("executable-by-content")


def test_put_list_show_read(tmp_path):
    store = QuarantineStore(tmp_path / "q")
    assert store.list() == []
    verdict = evaluate_message(MAIL.raw, POLICY)
    ctx = MailContext(direction="inbound", device="phone-042", rcpt_to=("taro@city.kanmon.example.jp",))
    entry_id = store.put(MAIL.raw, verdict, ctx, now=datetime(2024, 4, 1, 9, 0, tzinfo=UTC))
    assert entry_id.startswith("20240401T090000Z-")
    (entry,) = store.list()
    assert entry.id == entry_id
    assert entry.meta["verdict"] == "neutralize" and entry.meta["context"]["device"] == "phone-042"
    assert entry.meta["indicators"][0]["evidence_ja"]
    assert store.read(entry_id) == MAIL.raw
    assert not list((tmp_path / "q").glob(".tmp-*"))


def test_tampered_message_is_refused(tmp_path):
    store = QuarantineStore(tmp_path)
    entry_id = store.put(MAIL.raw, evaluate_message(MAIL.raw, POLICY))
    (tmp_path / entry_id / "message.eml").write_bytes(MAIL.raw + b"extra")
    with pytest.raises(QuarantineError, match="sha256"):
        store.read(entry_id)


def test_release_keeps_the_entry_when_delivery_fails(tmp_path):
    store = QuarantineStore(tmp_path)
    entry_id = store.put(MAIL.raw, evaluate_message(MAIL.raw, POLICY))

    def broken(raw: bytes) -> None:
        raise OSError("smtp down")

    with pytest.raises(OSError):
        store.release(entry_id, broken)
    assert [e.id for e in store.list()] == [entry_id]
    delivered: list[bytes] = []
    store.release(entry_id, delivered.append)
    assert delivered == [MAIL.raw] and store.list() == []


@pytest.mark.parametrize("bad", ["..", "../x", "20240401T090000Z-zzzzzzzzzzzz", ""])
def test_bad_ids(tmp_path, bad):
    with pytest.raises(QuarantineError):
        QuarantineStore(tmp_path).show(bad)


def test_corrupt_metadata_is_reported(tmp_path):
    store = QuarantineStore(tmp_path)
    entry_id = store.put(MAIL.raw, evaluate_message(MAIL.raw, POLICY))
    (tmp_path / entry_id / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(QuarantineError, match="cannot read metadata"):
        store.show(entry_id)
    assert (tmp_path / entry_id / "message.eml").read_bytes() == MAIL.raw
