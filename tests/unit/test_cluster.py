"""gateway/registry/outbox.py, gateway/runtime/clusternode.py, gateway/cli/cluster.py: the gateway's registry view through a PostgreSQL outage (keeps the last
state, refuses changes, queues revocations locally and replays them), node status, commands.
A private PostgreSQL server is started for this module (skips without it; fails with CI=true)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from wireguard_tools import WireguardKey

from gateway.runtime import clusternode as cluster
from gateway.registry import factory, outbox
from gateway.cli import cluster as cluster_cli
from gateway.cli.cluster import node_rows
from gateway.registry.outbox import LocalOutbox, OutageTolerantRegistry, apply_queued
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus


@pytest.fixture
def db(postgres, request):
    name = "c_" + request.node.name.lower().replace("[", "_").replace("]", "").replace("-", "_")[:40]
    url = postgres.create_database(name)
    yield url
    postgres.start()   # a test that stopped the server leaves it running for the next one


def key() -> str:
    return str(WireguardKey.generate().public_key())


def rec(i: int) -> DeviceRecord:
    return DeviceRecord(f"d{i}", key(), ipaddress.IPv4Address(f"10.77.0.{i + 10}"))


def test_a_queued_change_never_undoes_a_revocation():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    change = outbox.QueuedChange(1, "d1", DeviceStatus.SUSPENDED, "check", now + timedelta(hours=1), "op", now, "a")
    revoked = replace(rec(1), status=DeviceStatus.REVOKED, status_reason="lost")
    assert apply_queued(revoked, change) == revoked
    suspended = apply_queued(rec(1), change)
    assert (suspended.status, suspended.suspended_until, suspended.status_reason) == \
        (DeviceStatus.SUSPENDED, now + timedelta(hours=1), "check")


def test_outbox_refuses_changes_that_are_not_restrictive(tmp_path):
    box = LocalOutbox(tmp_path / "o.sqlite3")
    with pytest.raises(ValueError):
        box.queue("d1", DeviceStatus.ACTIVE, "", "op", "a")
    assert box.pending() == []


def test_outage_keeps_the_last_state_refuses_writes_and_replays_queued_revocations(postgres, db, tmp_path):
    from gateway.registry.postgres import PgRegistry, RegistryUnavailable

    admin = PgRegistry(db, node="admin")
    for i in range(3):
        admin.add(rec(i))
    states: list[bool] = []
    view = OutageTolerantRegistry(PgRegistry(db, node="node-a", connect_timeout=1), LocalOutbox(tmp_path / "o.sqlite3"),
                                  on_state=lambda up, detail: states.append(up))
    probe = PgRegistry(db, node="probe", connect_timeout=1)
    start_rev = view.revision()
    assert [r.device_id for r in view.all()] == ["d0", "d1", "d2"]

    postgres.stop()
    view.probe(probe)
    assert states == [False] and view.revision() < 0           # outage noticed, no real revision claimed
    before = view.revision()
    assert [r.status for r in view.all()] == [DeviceStatus.ACTIVE] * 3   # the last known state
    with pytest.raises(RegistryUnavailable) as refused:
        view.update(replace(rec(1), status=DeviceStatus.REVOKED))
    assert "接続できません" in str(refused.value) and "unreachable" in str(refused.value)
    view.outbox.queue("d1", DeviceStatus.REVOKED, "lost", "sato", "node-a")
    assert view.revision() != before                            # the reconciler is due
    rev, changed = view.changed_since(start_rev)
    assert rev < 0 and [(r.device_id, r.status) for r in changed] == [("d1", DeviceStatus.REVOKED)]
    assert view.changed_since(rev) == (view.revision(), [])    # handed out once
    assert {r.device_id: r.status for r in view.all()}["d1"] is DeviceStatus.REVOKED

    postgres.start()
    view.probe(probe)
    assert states == [False, True] and view.revision() >= start_rev
    rev, changed = view.changed_since(rev)                       # continues from the last real revision
    assert rev > start_rev and [(r.device_id, r.status) for r in changed] == [("d1", DeviceStatus.REVOKED)]
    assert admin.get("d1").status is DeviceStatus.REVOKED
    audit = [e for e in admin.unshipped_audit() if e.device_id == "d1"]
    assert audit[-1].action == "device-revoked" and audit[-1].actor == "sato" and "registry outage" in audit[-1].reason
    assert view.outbox.pending() == [] and view.outbox.history()[0][4] == "applied"


def test_replay_stops_at_an_outage_and_loses_nothing(postgres, db, tmp_path):
    from gateway.registry.postgres import PgRegistry, RegistryUnavailable

    admin = PgRegistry(db)
    admin.add(rec(1))
    admin.add(rec(2))
    box = LocalOutbox(tmp_path / "o.sqlite3")
    box.queue("d1", DeviceStatus.REVOKED, "lost", "op", "a")
    box.queue("ghost", DeviceStatus.REVOKED, "typo", "op", "a")
    box.queue("d2", DeviceStatus.QUARANTINED, "malware", "op", "a")
    postgres.stop()
    with pytest.raises(RegistryUnavailable):
        outbox.replay_outbox(_lazy(db), box)
    assert len(box.pending()) == 3
    postgres.start()
    assert outbox.replay_outbox(PgRegistry(db), box) == [(1, "applied"), (2, "unknown device"), (3, "applied")]
    assert admin.get("d2").status is DeviceStatus.QUARANTINED and box.pending() == []


def _lazy(url):
    """A registry opened before the outage (its connection then breaks)."""
    from gateway.registry.postgres import PgRegistry

    class Late:
        def get(self, device_id):
            return PgRegistry(url, connect_timeout=1).get(device_id)

        def update(self, *a, **kw):
            raise AssertionError("not reached")
    return Late()


def test_node_rows_flag_stale_nodes_and_policy_drift():
    from gateway.registry.postgres import NodeReport

    now = datetime(2026, 1, 1, tzinfo=UTC)
    nodes = [NodeReport("a", "0.1.0", "v2", 10, 5, now, now, {"registry_up": True}, age_seconds=1.0),
             NodeReport("b", "0.1.0", "v1", 9, 5, now, now, {"registry_up": True}, age_seconds=1.0),
             NodeReport("c", "0.1.0", "v2", 0, 3, None, now, {"registry_up": False}, age_seconds=60.0)]
    rows = node_rows(nodes, "v2", 5)
    assert [r["state"] for r in rows] == ["ok", "policy-differs", "stale,registry-down"]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cluster_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def config(tmp_path, db, monkeypatch):
    monkeypatch.setenv(factory.REGISTRY_URL_ENV, db)
    path = tmp_path / "kanmon.yaml"
    path.write_text(f"node: {{name: node-a}}\nstate_dir: {tmp_path / 'state'}\n"
                    "tunnel: {interface: kmwg, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}\nuplink: {interface: eth0}\n")
    return str(path)


def test_status_lists_every_node_and_fails_when_one_is_stale(db, config, capsys):
    from gateway.registry.postgres import NodeReport, PgRegistry

    reg = PgRegistry(db)
    now = datetime.now(UTC)
    reg.report_node(NodeReport("node-a", "0.1.0", None, 3, reg.revision(), now, now, {"registry_up": True}))
    args = _args(["cluster", "status", "--config", config, "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(n["name"], n["peers"], n["state"]) for n in out["nodes"]] == [("node-a", 3, "ok")]
    reg.report_node(NodeReport("node-b", "0.1.0", None, 0, 0, None, now, {"registry_up": False}))
    args = _args(["cluster", "status", "--config", config])
    assert args.func(args) == 1
    text = capsys.readouterr().out
    assert "node-b" in text and "registry-down" in text and "登録リビジョン" in text


def test_status_without_a_registry_url_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(factory.REGISTRY_URL_ENV, raising=False)
    path = tmp_path / "k.yaml"
    path.write_text(f"state_dir: {tmp_path}\ntunnel: {{interface: kmwg, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}}\n"
                    "uplink: {interface: eth0}\n")
    args = _args(["cluster", "status", "--config", str(path)])
    assert args.func(args) == 2
    assert "KANMON_REGISTRY_URL" in capsys.readouterr().err


def test_revoke_command_revokes_or_queues_during_an_outage(postgres, db, config, tmp_path, capsys):
    from gateway.registry.postgres import PgRegistry

    reg = PgRegistry(db)
    reg.add(rec(1))
    reg.add(rec(2))
    args = _args(["cluster", "revoke", "d1", "--reason", "lost", "--config", config])
    assert args.func(args) == 0
    assert reg.get("d1").status is DeviceStatus.REVOKED
    postgres.stop()
    args = _args(["cluster", "revoke", "d2", "--reason", "stolen", "--config", config])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "接続できません" in err and "queued on this node" in err
    box = LocalOutbox(tmp_path / "state" / "registry-outbox.sqlite3")
    assert [(c.device_id, c.status, c.reason) for c in box.pending()] == [("d2", DeviceStatus.REVOKED, "stolen")]
    postgres.start()
    outbox.replay_outbox(PgRegistry(db), box)
    assert reg.get("d2").status is DeviceStatus.REVOKED


def test_policy_apply_refuses_a_broken_policy_with_file_and_line(config, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - {id: x, action: explode}\n")
    args = _args(["cluster", "policy-apply", str(bad), "--config", config, "--timeout", "1"])
    assert args.func(args) == 2   # bad input, as from `policy check` and `policy apply` (issue #19)
    err = capsys.readouterr().err
    assert "bad.yaml:3" in err and "nothing was applied" in err
    from gateway.registry.postgres import PolicyStore
    assert PolicyStore(os.environ[factory.REGISTRY_URL_ENV]).current() is None


def test_audit_written_with_queued_replay_names_the_operator(db, tmp_path):
    from gateway.registry.postgres import PgRegistry

    reg = PgRegistry(db)
    reg.add(rec(1), audit=AuditEntry("admin", "device-added"))
    box = LocalOutbox(tmp_path / "o.sqlite3")
    box.queue("d1", DeviceStatus.SUSPENDED, "check", "suzuki", "node-b", datetime(2030, 1, 1, tzinfo=UTC))
    outbox.replay_outbox(reg, box)
    last = reg.unshipped_audit()[-1]
    assert (last.actor, last.action, last.after["status"]) == ("suzuki", "device-suspended", "suspended")
    assert reg.get("d1").suspended_until == datetime(2030, 1, 1, tzinfo=UTC)


def _node(config_path, sent=None):
    """A ClusterNode with the callbacks the gateway process gives it (no application)."""
    from gateway.config import load_config
    from gateway.metrics import GatewayMetrics

    async def reload_policy():
        return None

    metrics = GatewayMetrics()
    node = cluster.ClusterNode(load_config(config_path), metrics.registry, cluster.NodeCallbacks(
        request_reconcile=lambda: None, reload_policy=reload_policy, policy_version=lambda: None,
        send_alert=(sent.append if sent is not None else lambda event: None)))
    return node, metrics


def test_a_node_reports_itself_and_refuses_to_start_without_the_registry(postgres, db, config):
    from gateway.runtime.errors import StartupError
    from gateway.runtime.reconcile import ReconcileReport
    from gateway.registry.postgres import PgRegistry

    node, metrics = _node(config)
    registry = node.open_registry()
    try:
        node.reconciled(ReconcileReport(3, True, 2, 0, frozenset(), frozenset(), (), frozenset({"a", "b"}), None, 0.01))
        PgRegistry(db).report_node(node.node_report())
        [row] = PgRegistry(db).nodes()
        assert (row.name, row.peers, row.details["registry_up"]) == ("node-a", 2, True)
        assert row.last_reconcile_at == node.last_reconcile_at
        assert 'kanmon_node_info{node="node-a"' in _metrics_text(metrics)
    finally:
        node.stop()
        registry.close()
    postgres.stop()
    with pytest.raises(StartupError) as refused:
        _node(config)[0].open_registry()
    assert "接続できません" in str(refused.value) and "unreachable" in str(refused.value)


def _metrics_text(metrics) -> str:
    from prometheus_client import generate_latest
    return generate_latest(metrics.registry).decode()


def test_watcher_reports_the_outage_and_asks_for_a_pass_after_reconnecting(postgres, db):
    import time

    from gateway.registry.postgres import POLICY_CHANNEL, REGISTRY_CHANNEL, RegistryWatcher

    states, heard = [], []
    watcher = RegistryWatcher(db, lambda ch, p: heard.append((ch, p)), on_state=lambda up, d: states.append(up),
                              retry_seconds=0.2).start()

    def until(predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.02)
        return predicate()
    try:
        assert until(lambda: states == [True])
        postgres.stop()
        assert until(lambda: states == [True, False])
        postgres.start()
        assert until(lambda: states == [True, False, True])
        assert until(lambda: {(REGISTRY_CHANNEL, "reconnected"), (POLICY_CHANNEL, "reconnected")} <= set(heard))
    finally:
        watcher.stop()


def test_the_node_reaches_the_gateway_only_through_its_callbacks(config):
    """Issue #16: ClusterNode gets callbacks, not the application: an outage is an alert and a
    gauge, the recovery asks the event loop for a reconcile pass."""
    import asyncio

    sent: list = []
    node, metrics = _node(config, sent)
    node._registry_state(False, "connection refused")
    assert [(e.kind, e.details["error.message"]) for e in sent] == [("registry-unreachable", "connection refused")]
    assert "kanmon_registry_up 0.0" in _metrics_text(metrics)

    asked = []

    async def recover():
        node.callbacks = cluster.NodeCallbacks(request_reconcile=lambda: asked.append("pass"),
                                               reload_policy=node.callbacks.reload_policy,
                                               policy_version=lambda: "v7", send_alert=sent.append)
        node._loop = asyncio.get_running_loop()
        node._registry_state(True, "")
        await asyncio.sleep(0)
    asyncio.run(recover())
    assert asked == ["pass"] and len(sent) == 1
    assert "kanmon_registry_up 1.0" in _metrics_text(metrics)
