"""Automatic quarantine: the trigger engine (pure, explicit time) and the service that carries
its orders out on the same registry path as `kanmon device quarantine` (audit entry, status,
reconciler poked), alerting with device, user, trigger and evidence, never blocking its caller."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.autoquarantine.service import AutoQuarantiner
from gateway.autoquarantine.triggers import (AUTO_ACTOR, AUTO_REASON_PREFIX, AutoQuarantineSettings, RepeatedBlocks,
                                             Trigger, TriggerEngine, auto_quarantine_settings)
from gateway.config import load_config_text
from gateway.metrics import GatewayMetrics
from gateway.registry.model import DeviceRecord, DeviceStatus
from gateway.registry.sqlite import SqliteRegistry
from gateway.reports.alerting import (AlertDispatcher, auto_quarantine_event, event_from_audit, webhook_payload)
from gateway.yamlsource import SourceErrors

T0 = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def test_virus_triggers_follow_the_settings():
    engine = TriggerEngine(AutoQuarantineSettings(mail_virus=False))
    order = engine.virus(Trigger.DOWNLOAD_VIRUS, "d1", "alice", {"signature": "Kanmon.Test"}, T0)
    assert order.trigger is Trigger.DOWNLOAD_VIRUS and order.device_id == "d1" and order.user == "alice"
    assert order.reason.startswith(AUTO_REASON_PREFIX + "download-virus") and "Kanmon.Test" in order.reason
    assert engine.virus(Trigger.MAIL_VIRUS, "d1", "alice", {"signature": "x"}, T0) is None


def test_a_listed_category_quarantines_at_once_others_never():
    engine = TriggerEngine(AutoQuarantineSettings())
    order = engine.blocked("d1", None, "Malware", {"destination": "evil.test"}, T0)
    assert order.trigger is Trigger.CATEGORY and order.evidence["category"] == "malware"
    assert "evil.test" in order.summary.en and "evil.test" in order.summary.ja
    assert engine.blocked("d1", None, "webmail", {}, T0) is None
    assert engine.blocked("d1", None, None, {}, T0) is None


def test_n_blocks_within_m_minutes_slide_with_time():
    engine = TriggerEngine(AutoQuarantineSettings(categories=frozenset(),
                                                  repeated_blocks=(RepeatedBlocks("sideload", 3, 10),)))
    times = [T0, T0 + timedelta(minutes=4), T0 + timedelta(minutes=11)]   # first one slides out
    assert [engine.blocked("d1", None, "sideload", {}, t) for t in times] == [None, None, None]
    # another device's blocks do not count for d1
    assert engine.blocked("d2", None, "sideload", {}, T0 + timedelta(minutes=12)) is None
    order = engine.blocked("d1", None, "sideload", {"destination": "apk.test"}, T0 + timedelta(minutes=12))
    assert order.trigger is Trigger.REPEATED_BLOCKS
    assert order.evidence["count"] == 3 and order.evidence["first_block"] == times[1].isoformat()
    assert "3" in order.summary.ja and "10" in order.summary.en
    # counting starts again after an order
    assert engine.blocked("d1", None, "sideload", {}, T0 + timedelta(minutes=13)) is None


BASE = """
state_dir: /tmp/kanmon-test
tunnel: {interface: wg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}
uplink: {interface: eth0}
"""


def test_config_section():
    cfg = load_config_text(BASE + """
auto_quarantine:
  mail_virus: false
  categories: [Malware, c2]
  repeated_blocks: [{category: sideload, count: 5, minutes: 10}]
""", "k.yaml")
    s = cfg.auto_quarantine
    assert s.download_virus and not s.mail_virus and s.categories == {"malware", "c2"}
    assert s.repeated_blocks == (RepeatedBlocks("sideload", 5, 10.0),)
    assert load_config_text(BASE, "k.yaml").auto_quarantine is None and auto_quarantine_settings(None) is None
    with pytest.raises(SourceErrors) as err:
        load_config_text(BASE + "auto_quarantine:\n  repeated_blocks: [{category: x, count: 1, minutes: 5}]\n", "k.yaml")
    assert err.value.errors[0].line == 6


# -- the service ---------------------------------------------------------------------------

def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _registry(tmp_path, status=DeviceStatus.ACTIVE):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    rec = reg.add(DeviceRecord("dev-1", _key(), ipaddress.ip_address("10.77.0.2"), owner="alice@example.test"))
    if status is not DeviceStatus.ACTIVE:
        rec = reg.update(replace(rec, status=status))
    return reg, rec


def _service(reg, **kw):
    alerts, pokes = [], []
    metrics = GatewayMetrics()
    svc = AutoQuarantiner(TriggerEngine(AutoQuarantineSettings()), reg, poke=lambda: pokes.append(1),
                          alert=lambda order, done: alerts.append((order, done)), metrics=metrics, **kw)
    return svc, alerts, pokes, metrics


def test_virus_in_a_download_quarantines_through_the_registry_and_alerts(tmp_path):
    reg, rec = _registry(tmp_path)
    svc, alerts, pokes, metrics = _service(reg)

    async def main():
        svc.bind(asyncio.get_running_loop())
        order = svc.virus(Trigger.DOWNLOAD_VIRUS, rec, "alice", {"signature": "Kanmon.Test.Signature", "url": "http://x/a"})
        assert order is not None
        await svc.drain()

    asyncio.run(main())
    now = reg.get("dev-1")
    assert now.status is DeviceStatus.QUARANTINED and "Kanmon.Test.Signature" in now.status_reason
    [audit] = [e for e in reg.unshipped_audit() if e.action == "device-quarantined"]
    assert audit.actor == AUTO_ACTOR and audit.device_id == "dev-1" and "download-virus" in audit.reason
    assert pokes == [1]
    [(order, done)] = alerts
    assert done and order.evidence["url"] == "http://x/a"
    assert metrics.auto_quarantines.labels("download-virus")._value.get() == 1


@pytest.mark.parametrize("status", [DeviceStatus.QUARANTINED, DeviceStatus.REVOKED, DeviceStatus.SUSPENDED])
def test_only_an_active_device_is_quarantined(tmp_path, status):
    reg, rec = _registry(tmp_path, status)
    svc, alerts, pokes, _ = _service(reg)
    assert svc.virus(Trigger.DOWNLOAD_VIRUS, rec, None, {"signature": "x"}) is None
    # the in-memory record said active, the registry says otherwise: the registry wins
    stale = replace(rec, status=DeviceStatus.ACTIVE)

    async def main():
        svc.bind(asyncio.get_running_loop())
        svc.virus(Trigger.DOWNLOAD_VIRUS, stale, None, {"signature": "x"})
        await svc.drain()

    asyncio.run(main())
    assert reg.get("dev-1").status is status and alerts == [] and pokes == []


class BrokenRegistry:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def get(self, device_id):
        return self.inner.get(device_id)

    def update(self, record, audit=None):
        self.calls += 1
        raise OSError("disk full")


def test_a_failed_registry_write_is_retried_counted_and_alerted(tmp_path, monkeypatch):
    monkeypatch.setattr("gateway.autoquarantine.service.RETRY_SECONDS", 0.01)
    reg, rec = _registry(tmp_path)
    broken = BrokenRegistry(reg)
    svc, alerts, pokes, metrics = _service(broken)

    async def main():
        svc.bind(asyncio.get_running_loop())
        svc.virus(Trigger.DOWNLOAD_VIRUS, rec, None, {"signature": "x"})
        await svc.drain()

    asyncio.run(main())
    assert broken.calls == 3 and pokes == []
    [(order, done)] = alerts
    assert not done
    assert metrics.auto_quarantine_errors._value.get() == 1


def test_orders_from_another_thread_run_on_the_loop(tmp_path):
    reg, rec = _registry(tmp_path)
    svc, alerts, _, _ = _service(reg)

    async def main():
        svc.bind(asyncio.get_running_loop())
        await asyncio.to_thread(svc.virus, Trigger.MAIL_VIRUS, rec, "alice", {"signature": "x"})
        for _ in range(200):
            if alerts:
                break
            await asyncio.sleep(0.01)
            await svc.drain()

    asyncio.run(main())
    assert reg.get("dev-1").status is DeviceStatus.QUARANTINED and alerts[0][0].trigger is Trigger.MAIL_VIRUS


def test_unbound_service_counts_instead_of_dropping_silently(tmp_path):
    reg, rec = _registry(tmp_path)
    svc, _, _, metrics = _service(reg)
    svc.virus(Trigger.DOWNLOAD_VIRUS, rec, None, {"signature": "x"})
    assert metrics.auto_quarantine_errors._value.get() == 1 and reg.get("dev-1").status is DeviceStatus.ACTIVE


def test_a_workers_order_is_handed_to_the_gateway_process_and_carried_out_there(tmp_path):
    # issue #22: the worker counts; its order crosses the socket (a pickle) and the gateway
    # process's service writes the registry, pokes, alerts and counts -- the worker writes nothing
    import pickle

    reg, rec = _registry(tmp_path)
    worker, w_alerts, w_pokes, w_metrics = _service(reg)
    sent: list[bytes] = []
    worker.hand_over = lambda order: sent.append(pickle.dumps(order))
    settings = AutoQuarantineSettings(repeated_blocks=(RepeatedBlocks("sideload", 2, 5),))
    worker.engine = TriggerEngine(settings)
    assert worker.blocked(rec, "alice", "sideload", {"destination": "tracker.test"}) is None
    assert sent == [] and reg.get("dev-1").status is DeviceStatus.ACTIVE   # one block: below the threshold
    assert worker.blocked(rec, "alice", "sideload", {"destination": "tracker.test"}) is not None
    assert len(sent) == 1 and reg.get("dev-1").status is DeviceStatus.ACTIVE and w_pokes == [] and w_alerts == []
    parent, alerts, pokes, metrics = _service(reg)

    async def main():
        parent.bind(asyncio.get_running_loop())
        parent.carry_out(pickle.loads(sent[0]))
        await parent.drain()

    asyncio.run(main())
    assert reg.get("dev-1").status is DeviceStatus.QUARANTINED and pokes == [1]
    assert alerts[0][0].trigger is Trigger.REPEATED_BLOCKS and alerts[0][0].evidence["count"] == 2
    assert metrics.auto_quarantines.labels("repeated-blocks")._value.get() == 1
    assert w_metrics.auto_quarantines.labels("repeated-blocks")._value.get() == 0


def test_a_worker_that_cannot_hand_over_counts_the_error(tmp_path):
    reg, rec = _registry(tmp_path)
    worker, _, _, metrics = _service(reg)

    def gone(order):
        raise BrokenPipeError("the gateway process is gone")

    worker.hand_over = gone
    assert worker.virus(Trigger.DOWNLOAD_VIRUS, rec, None, {"signature": "x"}) is not None
    assert metrics.auto_quarantine_errors._value.get() == 1 and reg.get("dev-1").status is DeviceStatus.ACTIVE


def test_alert_carries_device_user_trigger_evidence_and_audit_does_not_duplicate_it():
    engine = TriggerEngine(AutoQuarantineSettings())
    order = engine.virus(Trigger.DOWNLOAD_VIRUS, "dev-1", "alice", {"signature": "Kanmon.Test.Signature"}, T0)
    event = auto_quarantine_event(order.device_id, user=order.user, trigger=str(order.trigger),
                                  summary=order.summary, evidence=order.evidence, at=order.at)
    body = json.loads(webhook_payload(event, "gw-1"))
    assert body["kind"] == "device-auto-quarantined" and body["severity"] == "critical"
    assert body["details"] == {"device.id": "dev-1", "user.name": "alice", "kanmon.trigger": "download-virus",
                               "kanmon.evidence": {"signature": "Kanmon.Test.Signature"}}
    assert "Kanmon.Test.Signature" in body["text"] and "自動隔離" in body["text"]
    from gateway.reports.alerting import AUTO_QUARANTINE_ACTOR
    assert AUTO_QUARANTINE_ACTOR == AUTO_ACTOR   # the alerting module names the same actor
    audit = {"event.action": "device-quarantined", "device.id": "dev-1", "user.name": AUTO_ACTOR}
    assert event_from_audit(audit, at=T0) is None
    assert event_from_audit({**audit, "user.name": "operator"}, at=T0) is not None


class FlakyChannel:
    name = "webhook"

    def __init__(self, failures):
        self.failures, self.got = failures, []

    def deliver(self, event):
        if self.failures:
            self.failures -= 1
            raise OSError("receiver down")
        self.got.append(event)


def test_alert_delivery_outcomes_are_reported_for_metrics():
    outcomes = []
    channel = FlakyChannel(2)
    d = AlertDispatcher([channel], retries=3, retry_base=0.01, retry_max=0.01,
                        on_outcome=lambda ch, o: outcomes.append((ch, o))).start()
    event = auto_quarantine_event("d", user=None, trigger="category", summary=TriggerEngine(AutoQuarantineSettings())
                                  .blocked("d", None, "malware", {"destination": "x"}, T0).summary, evidence={}, at=T0)
    d.send(event)
    d.close(timeout=5)
    assert outcomes == [("webhook", "retried"), ("webhook", "retried"), ("webhook", "delivered")]
    assert channel.got == [event]


def test_with_a_shared_registry_down_the_quarantine_goes_to_the_local_outbox(tmp_path):
    """gateway/registry/outbox.py: like `kanmon cluster quarantine`, applied by this node at once and
    replayed into PostgreSQL when it answers again."""
    from gateway.registry.outbox import LocalOutbox

    reg, rec = _registry(tmp_path)

    class DownRegistry(BrokenRegistry):
        def __init__(self, inner):
            super().__init__(inner)
            self.outbox = LocalOutbox(tmp_path / "outbox.sqlite3")

    down = DownRegistry(reg)
    svc, alerts, pokes, metrics = _service(down)
    svc.node = "gw-2"

    async def main():
        svc.bind(asyncio.get_running_loop())
        svc.virus(Trigger.DOWNLOAD_VIRUS, rec, None, {"signature": "x"})
        await svc.drain()

    asyncio.run(main())
    [queued] = down.outbox.pending()
    assert queued.device_id == "dev-1" and queued.status is DeviceStatus.QUARANTINED
    assert queued.actor == AUTO_ACTOR and queued.node == "gw-2" and queued.reason.startswith(AUTO_REASON_PREFIX)
    assert pokes == [1] and alerts[0][1] is True and metrics.auto_quarantine_errors._value.get() == 0
    down.outbox.close()
