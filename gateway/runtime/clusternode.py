"""The gateway process's side of several nodes on one PostgreSQL registry (issue #8): node
identity and health, policy distribution, the registry view that survives an outage
(gateway/registry/outbox.py). The commands are gateway/cli/cluster.py.

Deployment decisions (see the report / README section):
- Tunnel addresses are allocated in the shared registry (`PgRegistry.allocate_addresses`,
  leased under an advisory lock), so they never collide across nodes.
- One WireGuard server key per deployment: every node has the same `tunnel.private_key_file`
  (copied by the operator like any other secret; never stored in the database, so reading the
  registry does not let anyone impersonate the gateway). Every node has every admitted device
  as a peer, so a device may use any node with the same configuration; only the endpoint
  differs (one DNS name for all nodes, or one per site). A device moves between nodes by
  roaming (WireGuard follows the new endpoint) without re-enrollment.
- Registry unreachable: each node keeps enforcing the last state it applied (the reconciler's
  records and the host's peers/drop sets stay; usage periods and suspensions still end on time),
  every change is refused with `RegistryUnavailable` (bilingual), `kanmon_registry_up` drops to 0
  and an alert is sent. Revocations/suspensions/quarantines issued meanwhile with `kanmon cluster
  revoke|suspend|quarantine` go into a local SQLite outbox (state_dir/registry-outbox.sqlite3):
  the node they were issued on applies them at once, and they are replayed into the registry
  (with their audit entries) as soon as it answers again, then reach every node. Nothing queued is
  lost: an entry is marked replayed only in the same step that wrote it to PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from gateway.i18n import Text
from gateway.registry.factory import open_registry, registry_url_of
from gateway.registry.model import RegistryError
from gateway.registry.outbox import OutageTolerantRegistry
from gateway.runtime.errors import StartupError

log = logging.getLogger("kanmon.cluster")

REPORT_SECONDS = 2.0           # how often a node writes its row in `nodes`
STALE_SECONDS = 10.0           # a node silent for longer is shown as stale
# -- node health -------------------------------------------------------------------------------

class NodeReporter:
    """Writes this node's row in `nodes` every REPORT_SECONDS (own connection, daemon thread);
    failures are only logged (the registry may be down: the node keeps working)."""

    def __init__(self, url: str, snapshot: Callable[[], object], interval: float = REPORT_SECONDS):
        self.url = url
        self.snapshot = snapshot
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registry = None

    def start(self) -> "NodeReporter":
        self._thread = threading.Thread(target=self._run, name="node-reporter", daemon=True)
        self._thread.start()
        return self

    def report_once(self) -> None:
        from gateway.registry.postgres import PgRegistry
        if self._registry is None:
            self._registry = PgRegistry(self.url, node="reporter")
        self._registry.report_node(self.snapshot())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.report_once()
            except RegistryError as exc:
                log.debug("node report failed: %s", exc)
            except Exception:
                log.exception("node report failed")
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)
        if self._registry is not None:
            self._registry.close()


class ClusterMetrics:
    """Cluster gauges on the gateway's own Prometheus registry (GatewayMetrics.registry)."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge
        self.registry_up = Gauge("kanmon_registry_up", "1 while the shared registry (PostgreSQL) answers.", registry=registry)
        self.notifications = Counter("kanmon_registry_notifications_total", "LISTEN/NOTIFY messages received, by channel.",
                                     ["channel"], registry=registry)
        self.outbox_pending = Gauge("kanmon_registry_outbox_pending",
                                    "Status changes queued locally during a registry outage, not yet replayed.", registry=registry)
        self.node_info = Gauge("kanmon_node_info", "This node (value 1), by name, version and policy version.",
                               ["node", "version", "policy_version"], registry=registry)
        self.last_reconcile = Gauge("kanmon_last_reconcile_timestamp_seconds", "Unix time of the last reconcile pass.",
                                    registry=registry)
        self.registry_up.set(1)


def registry_outage_event(node: str, detail: str, at: datetime):
    from gateway.reports.alerting import SEVERITY_CRITICAL, AlertEvent
    return AlertEvent("registry-unreachable", SEVERITY_CRITICAL,
                      Text("ノード {n}: 端末登録データベースに接続できません。最後の状態で制御を継続し、変更は受け付けません",
                           "node {n}: the device registry is unreachable; enforcing the last known state, refusing changes")
                      .format(n=node), at, {"error.message": detail}, guideline="IPA SME 技術的対策 3.3")


# -- policy distribution -----------------------------------------------------------------------

class PolicySync:
    """Brings the node's applied-policy link to the cluster's current policy: materializes it
    under state_dir/cluster-policies/<version>/ and swaps the link atomically (the same link
    `kanmon policy apply` uses); the caller then reloads (SIGHUP path: compile, swap)."""

    def __init__(self, url: str, cfg):
        self.url = url
        self.cfg = cfg
        self._store = None

    def store(self):
        from gateway.registry.postgres import PolicyStore
        if self._store is None:
            self._store = PolicyStore(self.url)
        return self._store

    def sync_files(self) -> str | None:
        """The current version id if the link now points at a different policy than before
        (a reload is needed), else None. RegistryUnavailable when the server is down."""
        from gateway.registry.postgres import materialize
        current = self.store().current()
        if current is None:
            return None
        path = materialize(current, self.cfg.state_dir / "cluster-policies")
        if self.cfg.active_policy_path() == path:
            return None
        link = self.cfg.applied_policy_link
        tmp = link.with_name(link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        os.replace(tmp, link)
        log.info("cluster policy %s linked in", current.version_id)
        return current.version_id


# -- the gateway process with a shared registry ----------------------------------------------------

@dataclass(frozen=True)
class NodeCallbacks:
    """What the cluster node may ask of the gateway process (never its internals)."""

    request_reconcile: Callable[[], None]              # run on the event loop: reconcile now
    reload_policy: Callable[[], Awaitable[object]]     # compile and swap the linked policy
    policy_version: Callable[[], str | None]           # the version in force, None before the first
    send_alert: Callable[[object], None]               # an AlertEvent (dropped when alerts are off)


class ClusterNode:
    """What a gateway process adds when it shares a registry; app.py calls it in five places
    (see the module docstring and the issue #8 report):

        self.cluster = ClusterNode(cfg, metrics.registry, NodeCallbacks(...)) if registry_url_of(cfg) else None
        self.registry = self.cluster.open_registry() if self.cluster else open_registry(cfg)
                                                      # prepare_host, BEFORE load_initial_policy()
        if self.cluster: self.cluster.reconciled(report)                           # _apply_reconcile
        if self.cluster: self.cluster.start(asyncio.get_running_loop())            # run(), when ready
        if self.cluster: self.cluster.stop()                                       # teardown
    """

    def __init__(self, cfg, metrics_registry, callbacks: NodeCallbacks):
        self.callbacks = callbacks
        self.cfg = cfg
        self.url = registry_url_of(self.cfg)
        self.metrics = ClusterMetrics(metrics_registry)
        self.started_at = datetime.now(UTC)
        self.last_reconcile_at: datetime | None = None
        self.admitted_count = 0
        self.policy_sync = PolicySync(self.url, self.cfg)
        self.registry: OutageTolerantRegistry | None = None
        self.watcher = None
        self.reporter: NodeReporter | None = None
        self._probe = None
        self._loop = None

    def open_registry(self) -> OutageTolerantRegistry:
        """Link the cluster's policy (so the first load is the cluster's), open the registry
        view and start its probe. Raises RegistryUnavailable when the server cannot be reached
        at start (a node that never saw the registry has no state to keep enforcing)."""
        from gateway.registry.postgres import PgRegistry, RegistryUnavailable
        try:
            self.policy_sync.sync_files()
        except RegistryUnavailable as exc:
            log.error("cannot read the cluster policy; starting with the local one: %s", exc.detail)
        try:
            registry = open_registry(self.cfg, gateway=True)
            self._probe = PgRegistry(self.url, node=self.cfg.node_name)
        except RegistryUnavailable as exc:
            # Fail closed: a node that never read the registry has no state to enforce.
            raise StartupError(exc.text.render()) from None
        registry.on_state = self._registry_state
        registry.start_probe(self._probe)
        self.registry = registry
        return registry

    def reconciled(self, report) -> None:
        self.admitted_count = len(report.admitted_ids)
        self.last_reconcile_at = datetime.now(UTC)
        self.metrics.last_reconcile.set(self.last_reconcile_at.timestamp())
        if self.registry is not None:
            self.metrics.outbox_pending.set(len(self.registry.outbox.pending()))

    def start(self, loop) -> None:
        from gateway.registry.postgres import RegistryWatcher
        self._loop = loop
        self.watcher = RegistryWatcher(self.url, self._on_notify).start()
        self.reporter = NodeReporter(self.url, self.node_report).start()

    def stop(self) -> None:
        for part in (self.watcher, self.reporter):
            if part is not None:
                part.stop()
        if self._probe is not None:
            self._probe.close()

    def _registry_state(self, up: bool, detail: str) -> None:
        self.metrics.registry_up.set(1 if up else 0)
        if not up:
            self.callbacks.send_alert(registry_outage_event(self.cfg.node_name, detail, datetime.now(UTC)))
        if up and self._loop is not None:
            self._loop.call_soon_threadsafe(self.callbacks.request_reconcile)

    def _on_notify(self, channel: str, payload: str) -> None:
        import asyncio

        from gateway.registry.postgres import POLICY_CHANNEL, REGISTRY_CHANNEL
        self.metrics.notifications.labels(channel).inc()
        if self._loop is None:
            return
        if channel == REGISTRY_CHANNEL:
            if payload.isdigit() and self.registry is not None:
                self.registry.note_revision(int(payload))
            self._loop.call_soon_threadsafe(self.callbacks.request_reconcile)
        elif channel == POLICY_CHANNEL:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._sync_policy()))

    async def _sync_policy(self) -> None:
        import asyncio

        from gateway.registry.postgres import RegistryUnavailable
        try:
            changed = await asyncio.to_thread(self.policy_sync.sync_files)
        except RegistryUnavailable as exc:
            log.error("cluster policy not readable: %s", exc.detail)
            return
        if changed:
            await self.callbacks.reload_policy()

    def node_report(self):
        from gateway import __version__
        from gateway.registry.postgres import NodeReport
        policy_version = self.callbacks.policy_version()
        self.metrics.node_info.clear()
        self.metrics.node_info.labels(self.cfg.node_name, __version__, policy_version or "").set(1)
        registry = self.registry
        return NodeReport(
            name=self.cfg.node_name, version=__version__, policy_version=policy_version, peers=self.admitted_count,
            registry_revision=registry.consumed_revision if registry else None,
            last_reconcile_at=self.last_reconcile_at, started_at=self.started_at,
            details={"endpoint": self.cfg.endpoint, "registry_up": bool(registry.up) if registry else False,
                     "outbox_pending": len(registry.outbox.pending()) if registry else 0})
