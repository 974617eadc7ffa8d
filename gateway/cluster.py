"""Several gateway nodes on one PostgreSQL registry (issue #8): node identity and health,
behaviour while the registry is unreachable, policy distribution, `kanmon cluster ...`.

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

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from gateway.i18n import Text
from gateway.registry.factory import REGISTRY_URL_ENV, open_registry, outbox_path, registry_url_of
from gateway.registry.model import AuditEntry, DeviceStatus, RegistryError
from gateway.registry.outbox import QUEUEABLE, LocalOutbox, OutageTolerantRegistry

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

class ClusterNode:
    """What a gateway process adds when it shares a registry; app.py calls it in five places
    (see the module docstring of gateway/cluster.py and the issue #8 report):

        self.cluster = ClusterNode(self) if registry_url_of(self.cfg) else None     # __post_init__
        self.registry = self.cluster.open_registry() if self.cluster else SqliteRegistry(...)
                                                      # prepare_host, BEFORE load_initial_policy()
        if self.cluster: self.cluster.reconciled(report)                           # _apply_reconcile
        if self.cluster: self.cluster.start(asyncio.get_running_loop())            # run(), when ready
        if self.cluster: self.cluster.stop()                                       # teardown
    """

    def __init__(self, app):
        self.app = app
        self.cfg = app.cfg
        self.url = registry_url_of(self.cfg)
        self.metrics = ClusterMetrics(app.metrics.registry)
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
            from gateway.app import StartupError
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
        if not up and self.app.alerts is not None:
            self.app.alerts.send(registry_outage_event(self.cfg.node_name, detail, datetime.now(UTC)))
        if up and self._loop is not None:
            self._loop.call_soon_threadsafe(self.app._reconcile_now.set)

    def _on_notify(self, channel: str, payload: str) -> None:
        import asyncio

        from gateway.registry.postgres import POLICY_CHANNEL, REGISTRY_CHANNEL
        self.metrics.notifications.labels(channel).inc()
        if self._loop is None:
            return
        if channel == REGISTRY_CHANNEL:
            if payload.isdigit() and self.registry is not None:
                self.registry.note_revision(int(payload))
            self._loop.call_soon_threadsafe(self.app._reconcile_now.set)
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
            await self.app.reload_policy()

    def node_report(self):
        from gateway import __version__
        from gateway.registry.postgres import NodeReport
        policy = self.app.policy
        policy_version = policy.current.snapshot.version if policy is not None else None
        self.metrics.node_info.clear()
        self.metrics.node_info.labels(self.cfg.node_name, __version__, policy_version or "").set(1)
        registry = self.registry
        return NodeReport(
            name=self.cfg.node_name, version=__version__, policy_version=policy_version, peers=self.admitted_count,
            registry_revision=registry.consumed_revision if registry else None,
            last_reconcile_at=self.last_reconcile_at, started_at=self.started_at,
            details={"endpoint": self.cfg.endpoint, "registry_up": bool(registry.up) if registry else False,
                     "outbox_pending": len(registry.outbox.pending()) if registry else 0})


# -- commands ----------------------------------------------------------------------------------

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _config(args):
    from gateway.cli import load_config_or_exit
    return load_config_or_exit(args.config)


def _url_or_error(cfg) -> str | None:
    url = registry_url_of(cfg)
    if url is None:
        print(Text("共有の端末登録データベースが設定されていません (registry.url または KANMON_REGISTRY_URL)。",
                   "No shared registry is configured (registry.url or KANMON_REGISTRY_URL).").render(), file=sys.stderr)
    return url


def node_rows(nodes, current_policy: str | None, now_revision: int | None) -> list[dict]:
    """Pure: the status table, one dict per node, with what is wrong with it."""
    rows = []
    for n in nodes:
        problems = []
        if n.age_seconds is not None and n.age_seconds > STALE_SECONDS:
            problems.append("stale")
        if current_policy is not None and n.policy_version != current_policy:
            problems.append("policy-differs")
        if not n.details.get("registry_up", True):
            problems.append("registry-down")
        rows.append({"name": n.name, "version": n.version, "policy_version": n.policy_version, "peers": n.peers,
                     "registry_revision": n.registry_revision, "cluster_revision": now_revision,
                     "last_reconcile_at": n.last_reconcile_at.isoformat() if n.last_reconcile_at else None,
                     "reported_seconds_ago": round(n.age_seconds, 1) if n.age_seconds is not None else None,
                     "endpoint": n.details.get("endpoint"), "outbox_pending": n.details.get("outbox_pending", 0),
                     "state": ",".join(problems) or "ok"})
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.registry.postgres import PolicyStore, RegistryUnavailable
    cfg = _config(args)
    url = _url_or_error(cfg)
    if url is None:
        return EXIT_USAGE
    try:
        reg = open_registry(cfg)          # url is set: the shared PostgreSQL registry
        nodes, revision = reg.nodes(), reg.revision()
        current = PolicyStore(url).current()
    except RegistryUnavailable as exc:
        print(exc.text.render(), file=sys.stderr)
        return EXIT_FAIL
    rows = node_rows(nodes, current.version_id if current else None, revision)
    if args.json:
        print(json.dumps({"registry_revision": revision, "policy_version": current.version_id if current else None,
                          "nodes": rows}, ensure_ascii=False, indent=2))
    else:
        print(Text("登録リビジョン {r} / クラスタのポリシー {p}", "registry revision {r} / cluster policy {p}")
              .format(r=revision, p=current.version_id if current else "-").render())
        print(f"{'NODE':<12} {'VERSION':<8} {'POLICY':<17} {'PEERS':>5} {'REV':>6} {'SEEN':>6}  STATE")
        for r in rows:
            print(f"{r['name']:<12} {r['version']:<8} {(r['policy_version'] or '-'):<17} {r['peers']:>5} "
                  f"{r['registry_revision'] if r['registry_revision'] is not None else '-':>6} "
                  f"{r['reported_seconds_ago']:>5}s  {r['state']}")
    return EXIT_OK if rows and all(r["state"] == "ok" for r in rows) else EXIT_FAIL


def _operator() -> str:
    import getpass
    return os.environ.get("SUDO_USER") or getpass.getuser()


def queue_status_change(cfg, device_id: str, status: DeviceStatus, reason: str, actor: str,
                        until: datetime | None = None) -> int:
    """Queue a restrictive change in the node's local outbox (registry unreachable)."""
    outbox = LocalOutbox(outbox_path(cfg))
    try:
        return outbox.queue(device_id, status, reason, actor, cfg.node_name, until)
    finally:
        outbox.close()


def _status_command(status: DeviceStatus):
    def handler(args: argparse.Namespace) -> int:
        from gateway.gatewayprocess import poke_reconcile
        from gateway.registry.postgres import RegistryUnavailable
        cfg = _config(args)
        url = _url_or_error(cfg)
        if url is None:
            return EXIT_USAGE
        until = datetime.fromisoformat(args.until) if getattr(args, "until", None) else None
        try:
            reg = open_registry(cfg)          # url is set: the shared PostgreSQL registry
            rec = reg.get(args.id)
            if rec is None:
                print(Text("端末がありません: {d}", "No such device: {d}").format(d=args.id).render(), file=sys.stderr)
                return EXIT_FAIL
            if rec.status is DeviceStatus.REVOKED:
                print(Text("既に失効しています: {d}", "already revoked: {d}").format(d=args.id).render())
                return EXIT_OK
            reg.update(replace(rec, status=status, status_reason=args.reason, suspended_until=until),
                       audit=AuditEntry(_operator(), QUEUEABLE[status], args.reason))
            print(f"{rec.device_id} {status}")
        except RegistryUnavailable as exc:
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            seq = queue_status_change(cfg, args.id, status, args.reason, _operator(), until)
            print(exc.text.render(), file=sys.stderr)
            print(Text("この変更 ({s}: {d}) はこのノードに保存しました (#{n})。このノードでは直ちに適用し、"
                       "データベースの復旧後に全ノードへ反映します。",
                       "This change ({s}: {d}) is queued on this node (#{n}): applied here at once, and on "
                       "every node when the registry is back.").format(s=status, d=args.id, n=seq).render(), file=sys.stderr)
            poke_reconcile(cfg.pid_path)
            return EXIT_FAIL
        poke_reconcile(cfg.pid_path)
        return EXIT_OK
    return handler


def cmd_policy_apply(args: argparse.Namespace) -> int:
    """Compile, store in the registry and make current; every node loads it (NOTIFY). Waits
    until every node reporting recently runs this version."""
    from gateway.registry.postgres import PolicyError, PolicyStore, RegistryUnavailable
    from gateway.yamlsource import SourceErrors
    cfg = _config(args)
    url = _url_or_error(cfg)
    if url is None:
        return EXIT_USAGE
    try:
        version = PolicyStore(url).publish(Path(args.path).resolve(), actor=_operator(), node=cfg.node_name)
    except SourceErrors as exc:
        print(Text("ポリシーに誤りがあります。適用していません:", "The policy is invalid; nothing was applied:").render(), file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return EXIT_FAIL
    except PolicyError as exc:
        print(exc.text.render(), file=sys.stderr)
        return EXIT_FAIL
    except RegistryUnavailable as exc:
        print(exc.text.render(), file=sys.stderr)
        return EXIT_FAIL
    deadline = time.monotonic() + args.timeout
    reg = open_registry(cfg)          # url is set: the shared PostgreSQL registry
    lagging: list[str] = []
    while time.monotonic() < deadline:
        live = [n for n in reg.nodes() if (n.age_seconds or 0) <= STALE_SECONDS]
        lagging = [n.name for n in live if n.policy_version != version]
        if not lagging:
            print(Text("全ノード ({n} 台) でバージョン {v} が有効です。", "version {v} is in force on all {n} nodes.")
                  .format(v=version, n=len(live)).render())
            return EXIT_OK
        time.sleep(0.1)
    print(Text("保存しましたが、次のノードはまだ切り替わっていません: {l}", "stored, but these nodes have not switched yet: {l}")
          .format(l=", ".join(lagging)).render(), file=sys.stderr)
    return EXIT_FAIL


def register(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser("cluster", help="several nodes on one registry / 複数ノード構成")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    status = csub.add_parser("status", help="every node's version, policy, peers, last reconcile")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    for name, st in (("revoke", DeviceStatus.REVOKED), ("suspend", DeviceStatus.SUSPENDED),
                     ("quarantine", DeviceStatus.QUARANTINED)):
        p = csub.add_parser(name, help=f"{name} a device; queued on this node while the registry is unreachable")
        p.add_argument("id")
        p.add_argument("--config", required=True)
        p.add_argument("--reason", required=True)
        if st is DeviceStatus.SUSPENDED:
            p.add_argument("--until")
        p.set_defaults(func=_status_command(st))
    apply = csub.add_parser("policy-apply", help="store a policy in the registry; every node loads it")
    apply.add_argument("path")
    apply.add_argument("--config", required=True)
    apply.add_argument("--timeout", type=float, default=15.0)
    apply.set_defaults(func=cmd_policy_apply)


# -- launcher: `python -m gateway.cluster [--registry-url URL] <kanmon arguments>` ------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.cluster [--registry-url URL] <kanmon arguments>`: `kanmon` with the
    shared registry given on the command line instead of `registry.url` in the config
    (the lab's two-node tests use it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--registry-url"]:
        os.environ[REGISTRY_URL_ENV] = argv[1]
        argv = argv[2:]
    from gateway import cli
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
