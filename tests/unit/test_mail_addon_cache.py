"""Issue #16: the mail addon's cache of judged messages is used from several worker threads at
once (each mail connection judges in its own thread). Without a lock, a thread that found its
message in the cache can see it evicted by another thread before it moves it to the end:
KeyError, and the connection is cut by the fail-closed guard for nothing."""

from __future__ import annotations

import collections
import threading
import time
from types import SimpleNamespace

import addons.mail as mail_addon
from gateway.mail.engine import MailContext
from tests.unit.test_mail_adapters_addon import CORPUS, make_filter


class SlowGet(collections.OrderedDict):
    """Widens the race window: looking up ``slow_key`` takes a while."""

    slow_key = None

    def get(self, key, default=None):
        value = super().get(key, default)
        if key == self.slow_key:
            time.sleep(0.3)
        return value


def _flow():
    return SimpleNamespace(metadata={}, server_conn=SimpleNamespace(address=("198.51.100.25", 993)),
                           client_conn=SimpleNamespace(peername=("10.0.0.2", 50000), sni="mail.city.example"))


def test_cache_hit_and_eviction_from_two_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(mail_addon, "JUDGED_CACHE_SIZE", 1)
    f, sink = make_filter(tmp_path)
    slow = SlowGet()
    f._judged = slow
    judge = f._judge_for(_flow(), "imap")
    first, second = CORPUS.by_name("clean-ascii").raw, CORPUS.by_name("clean-iso2022jp").raw
    judge(first, MailContext("inbound"))                 # cached
    key = next(iter(slow))
    slow.slow_key = key
    errors: list[BaseException] = []

    def again():
        try:
            judge(first, MailContext("inbound"))          # a hit, slow to look up
        except BaseException as exc:  # noqa: BLE001 — collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=again)
    t.start()
    time.sleep(0.1)
    judge(second, MailContext("inbound"))                # evicts the first message meanwhile
    t.join(10)
    assert not errors, errors
    records = [r for _, r in sink.records]
    assert len(records) == 3 and sum(r["kanmon.mail.repeated"] for r in records) == 1
    assert len(f._judged) == 1
