"""`kanmon run`: bring up the data path, serve, tear down.

Start-up order is chosen so that no device packet can pass before enforcement is ready:
firewall table first (redirects point at listeners not yet bound: connections are refused),
then the tunnel and its peers, then the proxy listeners. Every step is idempotent, so a
restart after a crash (stale table, stale interface, stale control socket) recovers by itself.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from addons.chain import ChainError, ChainParts, build_chain, chain_names, layer_decision
from addons.cutoff import ConnectionCutter
from gateway.signin.service import SignInService
from gateway.net.underlay import UnderlayAddresses
from gateway.signin.store import open_session_store
from addons.identity import DeviceDirectory
from addons.policy import PolicyHolder
from gateway.net import limitsnft, steering
from gateway.runtime import allocator, diagnostics, heaptrim
from gateway.config import GatewayConfig
from gateway.runtime.clusternode import ClusterNode, NodeCallbacks
from gateway.runtime.errors import StartupError
from gateway.registry.factory import open_registry, registry_url_of
from gateway.proxy.connections import LiveConnections
from gateway.enroll.server import EnrollmentServer
from gateway.feeds.runner import FeedRunner
from gateway.runtime.gatewayprocess import write_applied
from gateway.logstore import LogStore, SyslogForwarder, purge
from gateway.logstore.anchor import ANCHOR_SUBDIR, AnchorError
from gateway.metrics import GatewayMetrics
from gateway.policy import PolicySnapshot, load_policy
from gateway.proxy.dnsbinding import DnsBindings
from gateway.proxy.master import ProxySettings, build_master, wait_for_listeners
from gateway.runtime.reconcile import Reconciler, cut_changed_devices
from gateway.registry.model import DeviceRegistry
from gateway.registry.sqlite import SqliteRegistry
from gateway.reports.alerting import AlertDispatcher, AlertSettings, event_from_audit, log_failure_event
from gateway.net.tunnel import TunnelError, load_or_create_private_key
from gateway.net.tunnelshards import ShardedTunnel
from gateway.net.firewalllog_reader import FirewallLogReader, FirewallLogReaderError
from gateway.net.tunnellog import DeviceInfo, TunnelEvents, peer_change_records
from gateway.runtime.policycache import PolicyCache  # issue #22
from gateway.runtime import workers as inspection_workers   # issue #22: proxy.workers > 1
from gateway.autoquarantine.assembly import build_quarantiner   # issue #18
from gateway.i18n import Text
from gateway.yamlsource import SourceErrors, errors_text

log = logging.getLogger("kanmon.app")

RECONCILE_POLL_SECONDS = 0.05   # registry revision poll: one indexed read, cheap
RECONCILE_SAFETY_SECONDS = 30   # full pass even without a visible change
UNDERLAY_REFRESH_SECONDS = 1.0  # peer endpoint poll (one UAPI/netlink read of the peer list)
LOG_ROTATION_CHECK_SECONDS = 60


def sd_notify(message: str) -> None:
    """systemd's readiness protocol: one datagram to $NOTIFY_SOCKET. Ten lines of stdlib are
    simpler than a dependency for it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def _not_admitted_because(rec, now: datetime) -> str:
    status = str(rec.effective_status(now))
    if status != "active":
        return status
    return "no key" if rec.wg_public_key is None else "outside its usage period"


@dataclass
class GatewayApp:
    cfg: GatewayConfig
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)

    def __post_init__(self) -> None:
        self.connections = LiveConnections()
        self.directory = DeviceDirectory()
        self.tunnel = ShardedTunnel(self.cfg.tunnel_shards, self.cfg.wg_implementation)   # issue #22: >65,536 devices
        self.cutter = ConnectionCutter()
        self.fatal_reason: str | None = None
        self._stop = asyncio.Event()
        self.master = None
        self.workers: inspection_workers.WorkerPool | None = None   # issue #22: proxy.workers > 1
        self.registry: DeviceRegistry | None = None
        self.logstore: LogStore | None = None
        self.policy: PolicyHolder | None = None
        self._reload_lock = asyncio.Lock()
        self._reconcile_now = asyncio.Event()
        self._applied_revision: int | None = None   # the revision last written for waiting commands
        self.enrollment: EnrollmentServer | None = None
        self.alerts: AlertDispatcher | None = None
        self.autoquarantine = None   # issue #18: gateway/autoquarantine (built in prepare_host)
        self._log_alert_sent: dict[str, float] = {}
        # Several nodes on one PostgreSQL registry (registry.url): NOTIFY-driven reconcile,
        # node reports, cluster policy, outage tolerance (gateway/runtime/clusternode.py). The node
        # gets the callbacks it needs, not the application.
        self.cluster = ClusterNode(self.cfg, self.metrics.registry, NodeCallbacks(
            request_reconcile=lambda: self._reconcile_now.set(),
            reload_policy=self.reload_policy,
            policy_version=lambda: self.policy.current.snapshot.version if self.policy is not None else None,
            send_alert=lambda event: self.alerts.send(event) if self.alerts is not None else None,
        )) if registry_url_of(self.cfg) else None
        self.syslog: SyslogForwarder | None = None
        self.signin: SignInService | None = None   # issue #9: user sign-in (OIDC), when configured
        # Each peer's current outer address, for `underlay_network` policy conditions (approved lines).
        self._underlay_now = asyncio.Event()
        self.dns_bindings = DnsBindings()   # no-inspect only to addresses our resolver gave (issue #14)
        # Evidence (issue #18): every device record seen (revoked ones too), by tunnel address
        # and by WireGuard key, so the firewall and tunnel logs name the device.
        self._known_by_ip: dict[str, Any] = {}
        self._known_by_key: dict[str, Any] = {}
        self._peer_ids: set[str] | None = None   # devices with a peer after the last reconcile
        self.tunnel_events = TunnelEvents(self._tunnel_device)
        self.firewall_log: FirewallLogReader | None = None
        self.underlay = UnderlayAddresses(read_peers=self._read_peers, on_change=self._underlay_changed,
                                          on_miss=self._underlay_now.set)
        # Category feeds (issue #17): refreshed in the background, the policy swapped on a new copy.
        self.feeds = FeedRunner(self.cfg.state_dir / "feeds", self.cfg.active_policy_path, self.metrics,
                                self.reload_policy)

    # -- assembly ------------------------------------------------------------------------
    def internal_networks(self) -> list:
        nets = [self.cfg.ipv4_prefix]
        if self.cfg.ipv6_prefix is not None:
            nets.append(self.cfg.ipv6_prefix)
        mgmt = ipaddress.ip_address(self.cfg.management_host)
        nets.append(ipaddress.ip_network(f"{mgmt}/{mgmt.max_prefixlen}"))
        console = getattr(self.cfg, "console", None)   # issue #21: the proxy never connects to the console
        if console is not None and not ipaddress.ip_address(console.host).is_unspecified:
            nets.append(ipaddress.ip_network(f"{console.host}/{ipaddress.ip_address(console.host).max_prefixlen}"))
        return nets

    def build_chain(self) -> list[Any]:
        """The production chain (addons/chain.py, the one builder); a part that cannot be built
        stops the start."""
        try:
            chain = build_chain(self.chain_parts())
        except ChainError as exc:
            raise StartupError(exc.text) from None
        log.info("addon chain: %s", ", ".join(chain_names(chain)))
        return chain

    def chain_parts(self) -> ChainParts:
        return ChainParts(self.cfg, self.connections, self.directory, self.metrics, self.logstore, self.cutter,
                          self.internal_networks(), self.dns_bindings, self.fail, underlay=self.underlay,
                          policy=self.policy, signin=self.signin,
                          autoquarantine=self.autoquarantine)

    def open_signin(self) -> None:
        """Sessions live beside the device registry (gateway/signin/store.py)."""
        if self.cfg.signin is None:
            return
        store = open_session_store(self.cfg)
        self.signin = SignInService(self.cfg.signin, store, self.logstore, metrics=self.metrics,
                                    on_sessions_changed=self._sessions_changed)
        self.signin.refresh()
        log.info("user sign-in required (issuer %s, portal https://%s/)", self.cfg.signin.issuer,
                 self.cfg.signin.portal_host)

    def _sessions_changed(self, device_ids: set[str]) -> None:
        """A sign-in, sign-out or expiry changes what the device's user may do: drop the
        device's cached host verdicts."""
        if self.policy is not None:
            for device_id in device_ids:
                self.policy.invalidate_device(device_id)
        if self.signin is not None:
            self.metrics.user_sessions.set(len(self.signin.directory))

    def _cut_devices(self, device_ids: set[str], reason: str) -> None:
        for state in self.connections.all():
            if state.device is not None and state.device.device_id in device_ids:
                if self.cutter.cut(state.client_id, reason):
                    self.metrics.connections_cut.inc()

    async def refresh_sessions(self) -> None:
        if self.signin is None:
            return
        ended = await asyncio.to_thread(self.signin.refresh)
        if ended:
            self._cut_devices(ended, "user session ended")
            if self.workers is not None:   # issue #22: cut in the worker that holds the device
                await self.workers.sessions_ended(ended)

    def fail(self, reason: str) -> None:
        """An addon failed to load or configure: stop serving (systemd restarts us)."""
        log.critical("fatal: %s", reason)
        self.fatal_reason = reason
        self._stop.set()

    # -- lifecycle -----------------------------------------------------------------------
    # -- policy --------------------------------------------------------------------------
    def _policy_loaded(self, snapshot: PolicySnapshot, path) -> None:
        self.metrics.policy_reloads.labels("success").inc()
        self.metrics.policy_rules.set(len(snapshot.rules))
        self.metrics.policy_rules_expiring.labels("7").set(len(snapshot.expiring(datetime.now(UTC), 7)))
        self.metrics.policy_info.clear()
        self.metrics.policy_info.labels(snapshot.version).set(1)
        self._write_policy_status({"result": "success", "version": snapshot.version, "path": str(path)})
        log.info("policy %s in force (version %s)", path, snapshot.version)

    def _write_policy_status(self, status: dict) -> None:
        tmp = self.cfg.policy_status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, ensure_ascii=False))
        os.replace(tmp, self.cfg.policy_status_path)

    def _policy_cache(self) -> PolicyCache:
        """issue #22: the prepared-policy cache in the state directory (gateway/runtime/policycache.py)."""
        cache = getattr(self, "_prepared_cache", None)
        if cache is None:
            cache = self._prepared_cache = PolicyCache(self.cfg.state_dir / "policy-cache",
                                                       lambda result: self.metrics.policy_cache.labels(result).inc())
        return cache

    def load_initial_policy(self) -> None:
        """A policy that does not compile stops the start (fail closed): the gateway does not
        serve with a guessed policy. The errors name file and line."""
        path = self.cfg.active_policy_path()
        if path is None:
            return
        try:
            snapshot = load_policy(path, feeds_dir=self.feeds.directory, cache=self._policy_cache(),  # issue #22
                                   release_memory=heaptrim.give_back_freed_memory)
        except SourceErrors as exc:
            self.metrics.policy_reloads.labels("failure").inc()
            raise StartupError(errors_text(Text("ポリシーをコンパイルできません:", "the policy does not compile:"),
                                           exc.errors)) from None
        except Exception as exc:  # noqa: BLE001 - a loader bug still stops the start with a clear line
            self.metrics.policy_reloads.labels("failure").inc()
            log.exception("loading the policy %s failed", path)
            raise StartupError(Text(f"ポリシーを読み込めません: {path}: 内部エラー ({type(exc).__name__})",
                                    f"the policy does not load: {path}: internal error ({type(exc).__name__})")) from None
        self.policy = PolicyHolder(snapshot, str(path))
        self._policy_loaded(snapshot, path)

    async def reload_policy(self) -> bool:
        """SIGHUP / `kanmon policy apply`: compile off the loop, then swap in one assignment.
        A policy that does not compile is refused and the old one keeps serving."""
        async with self._reload_lock:
            path = self.cfg.active_policy_path()
            if path is None or self.policy is None:
                log.warning("reload asked, but the gateway runs without a policy file (built-in host rules)")
                return False
            try:
                snapshot = await asyncio.to_thread(load_policy, path, None, self.feeds.directory,
                                                   self._policy_cache(), heaptrim.give_back_freed_memory)  # issue #22
            except Exception as exc:  # noqa: BLE001 - any failure (SourceErrors or a bug): refused, counted, old one serves
                self.metrics.policy_reloads.labels("failure").inc()
                errors = ([str(e) for e in exc.errors] if isinstance(exc, SourceErrors)
                          else [f"{path}: internal error while loading ({type(exc).__name__}); see the gateway log"])
                if not isinstance(exc, SourceErrors):
                    log.exception("policy reload of %s failed", path)
                log.error("policy reload refused; the old policy (version %s) keeps serving:\n  %s",
                          self.policy.current.snapshot.version, "\n  ".join(errors))
                self._write_policy_status({"result": "failure", "errors": errors, "path": str(path),
                                           "version": self.policy.current.snapshot.version})
                return False
            self.policy.swap(snapshot)
            if self.workers is not None:   # issue #22: every worker switches before it is reported in force
                await self.workers.switch_policy(snapshot.version)
            self._policy_loaded(snapshot, path)
            return True

    def prepare_host(self) -> Reconciler:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.cluster is not None:
            self.registry = self.cluster.open_registry()  # before the policy: links the cluster's
        self.feeds.fetch_missing()  # a feed without a last good copy is fetched before the policy compiles
        self.load_initial_policy()
        cfg.mitmproxy_confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.registry = self.registry or open_registry(cfg)  # no cluster: the embedded SQLite file
        if cfg.alerts:
            self.alerts = AlertDispatcher.from_settings(
                AlertSettings.from_mapping(cfg.alerts),
                on_outcome=lambda channel, outcome: self.metrics.alert_deliveries.labels(channel, outcome).inc()).start()
        self.autoquarantine = build_quarantiner(cfg, self.registry, self.alerts, self.metrics,
                                                self._reconcile_now.set)   # issue #18
        if cfg.syslog:
            self.syslog = SyslogForwarder(cfg.syslog["host"], cfg.syslog.get("port", 514),
                                          transport=cfg.syslog.get("transport", "udp"))
        try:
            self.logstore = LogStore(cfg.log_dir, on_write_error=self._log_write_failed, fsync=cfg.log_fsync,
                                     on_record=self._on_log_record,
                                     anchor_dir=cfg.state_dir / ANCHOR_SUBDIR, on_checkpoint=self.syslog)
        except AnchorError as exc:
            raise StartupError(exc.text) from None
        self.logstore.open_streams()
        self.open_signin()
        key = load_or_create_private_key(cfg.wg_private_key_file)
        # issue #22: the periodic full pass reads every row on a connection of its own (SQLite)
        snapshot = SqliteRegistry(self.registry.path) if isinstance(self.registry, SqliteRegistry) else None
        reconciler = Reconciler(self.registry, self.tunnel, cfg.nft_table, on_clock_jump=self.metrics.observe_clock_jump,
                                snapshot_registry=snapshot, background_full=True)
        initial = reconciler.initial()
        steering.apply_ruleset(steering.SteeringPlan(
            table=cfg.nft_table, tunnel_interface=cfg.wg_interface, uplink_interface=cfg.uplink_interface,
            ipv4_prefix=cfg.ipv4_prefix, gateway_ipv4=cfg.gateway_ipv4,
            ipv6_prefix=cfg.ipv6_prefix, gateway_ipv6=cfg.gateway_ipv6,
            transparent_port=cfg.transparent_port, dns_port=cfg.dns_port, blocked=tuple(initial.blocked),
            log_group=cfg.firewall_log_group, workers=cfg.proxy_workers,   # issue #22: spread over workers
            shard_interfaces=cfg.tunnel_shards.interfaces[1:]))          # issue #22: and over WireGuard interfaces
        log.info("nftables table inet %s installed", cfg.nft_table)
        self._remember(reconciler.initial_records)
        try:
            self.firewall_log = FirewallLogReader(
                cfg.firewall_log_group, lambda record: self.logstore.append("conn", record), self._firewall_device,
                metrics=self.metrics, interval=cfg.firewall_log_interval).start()
        except FirewallLogReaderError as exc:
            raise StartupError(f"firewall log: {exc}") from None
        limitsnft.apply(cfg.nft_table, cfg.tunnel_shards.interfaces, cfg.limits, cfg.wg_listen_port,
                        cfg.tunnel_shards.count)   # issue #14: the kernel takes floods
        addresses = [ipaddress.ip_interface(f"{cfg.gateway_ipv4}/{cfg.ipv4_prefix.prefixlen}")]
        if cfg.ipv6_prefix is not None:
            addresses.append(ipaddress.ip_interface(f"{cfg.gateway_ipv6}/{cfg.ipv6_prefix.prefixlen}"))
        kind = self.tunnel.ensure(key, cfg.wg_listen_port, cfg.wg_mtu, addresses)
        log.info("tunnel %s up (%s), public key %s, port %d", cfg.wg_interface, kind, key.public_key(), cfg.wg_listen_port)
        report = reconciler.run_once(full=True)
        self._end_sessions(self._apply_reconcile(report))
        self._confirm_applied(report.revision)
        self.ship_audit()  # changes made while the gateway was down
        return reconciler

    def _apply_reconcile(self, report) -> set[str]:
        """Event-loop side of a reconcile pass: update the device directory, then cut every
        live connection whose device lost admission or whose record changed (quarantine,
        groups, posture), so its next connection is judged by what the registry says now.
        Returns the signed-in devices that lost admission: their sessions are out of the
        in-memory directory already; the caller ends them in the session store
        (``_end_sessions``, blocking I/O: not on the event loop)."""
        admitted = [r for r in report.changed if r.device_id in report.admitted_ids]
        self._log_peer_changes(report)
        if report.full:
            self.directory.replace(admitted)
            now = datetime.now(UTC)
            counts = Counter(str(r.effective_status(now)) for r in report.changed)
            for status in ("active", "suspended", "quarantined", "revoked"):
                self.metrics.devices.labels(status).set(counts.get(status, 0))
        else:
            self.directory.update(admitted, [r for r in report.changed if r.device_id not in report.admitted_ids])
            if report.status_counts is not None:   # issue #22: the periodic full pass's counts
                for status in ("active", "suspended", "quarantined", "revoked"):
                    self.metrics.devices.labels(status).set(report.status_counts.get(status, 0))
        self.metrics.peers.set(len(report.admitted_ids))
        changed = {r.device_id: r for r in report.changed}
        gone: set[str] = set()
        if self.signin is not None:
            # A device that loses admission (revoked, suspended, expired) loses its user session too.
            signed_in = {s.device_id for s in self.signin.directory.all()}
            gone = {d for d in changed if d not in report.admitted_ids and d in signed_in}
            for device_id in gone:
                self.signin.directory.remove(device_id)
        cut_changed_devices(self, changed, report.admitted_ids)
        if self.cluster is not None:
            self.cluster.reconciled(report)
        return gone

    # -- evidence: firewall and tunnel logs (issue #18) ------------------------------------
    def _remember(self, records) -> None:
        """Keep every device record seen, admitted or not: a revoked device's dropped packets
        and a removed peer's last events still name the device."""
        if not records:
            return
        # In place (issue #22: a copy of 300,000 entries per revocation held it back ~50 ms at
        # 100,000 devices): the firewall-log thread only calls .get, atomic on a dict.
        by_ip, by_key = self._known_by_ip, self._known_by_key
        for rec in records:
            if rec.wg_public_key and by_key.get(rec.wg_public_key) is rec:
                continue   # the registry hands back the same record while its row is unchanged
            for addr in rec.addresses:
                by_ip[str(addr)] = rec
            if rec.wg_public_key:
                by_key[rec.wg_public_key] = rec

    @staticmethod
    def _device_info(rec) -> DeviceInfo:
        return DeviceInfo(rec.device_id, rec.owner or None, str(rec.ipv4), tuple(sorted(rec.groups)))

    def _firewall_device(self, ip: str):
        rec = self.directory.by_ip(ip) or self._known_by_ip.get(ip)
        return None if rec is None else (rec.device_id, rec.owner or None, tuple(rec.groups))

    def _tunnel_device(self, public_key: str) -> DeviceInfo | None:
        rec = self._known_by_key.get(public_key)
        return None if rec is None else self._device_info(rec)

    def _read_peers(self):
        """The underlay refresh's peer read, also fed to the tunnel log (handshakes, roaming)."""
        peers = self.tunnel.peers()
        for record in self.tunnel_events.observe(peers, datetime.now(UTC)):
            self.metrics.tunnel_events.labels(record["event.action"]).inc()
            if self.logstore is not None:
                self.logstore.append("auth", record)
        return peers

    def _log_peer_changes(self, report) -> None:
        """Peers the reconciler added or removed, into `auth`. The first pass after start-up
        is not logged device by device (it loads every admitted device)."""
        self._remember(report.changed)
        before = self._peer_ids
        changed = {r.device_id: r for r in report.changed}
        # Only the changed devices can have gained or lost their peer (issue #22: no copy of every
        # admitted id per revocation); a full pass's report lists every device.
        gained = sorted(d for d in changed if d in report.admitted_ids and (before is None or d not in before))
        lost = sorted(d for d in changed if d not in report.admitted_ids and before is not None and d in before)
        if report.full or before is None:
            self._peer_ids = set(report.admitted_ids)   # every device with a peer now
        else:
            self._peer_ids.update(gained)
            self._peer_ids.difference_update(lost)
        if before is None or self.logstore is None:
            return
        now = datetime.now(UTC)
        added = [self._device_info(changed[d]) for d in gained]
        removed = [(self._device_info(changed[d]), _not_admitted_because(changed[d], now)) for d in lost]
        keys = {r.device_id: r.wg_public_key for r in report.changed}
        for record in peer_change_records(added, removed, keys, now):
            self.metrics.tunnel_events.labels(record["event.action"]).inc()
            self.logstore.append("auth", record)

    def _confirm_applied(self, revision: int) -> None:
        """Tell waiting operator commands (``kanmon device revoke`` ...) that this registry
        revision is enforced: peers, drop set and live connections are done."""
        if revision != self._applied_revision:
            try:
                write_applied(self.cfg.applied_status_path, revision)
            except OSError as exc:  # the commands then time out and say so; enforcement is unaffected
                log.warning("could not write %s: %s", self.cfg.applied_status_path, exc)
                return
            self._applied_revision = revision

    def _end_sessions(self, device_ids: set[str]) -> None:
        """Blocking (session store, audit outbox): the sessions of devices that lost admission."""
        if device_ids and self.signin is not None and self.signin.end_for_devices(device_ids, "device no longer admitted"):
            self.ship_audit()

    def _on_log_record(self, stream: str, line: str) -> None:
        self.metrics.observe_log_record(stream, line)
        if self.syslog is not None:
            self.syslog(stream, line)

    def _log_write_failed(self, stream: str, exc: Exception) -> None:
        """Counted always; alerted at most once a minute per stream (a full disk fails
        every write, and the alert queue must not fill with the same news)."""
        self.metrics.log_write_errors.labels(stream).inc()
        now = time.monotonic()
        if self.alerts is not None and now - self._log_alert_sent.get(stream, -1e9) > 60:
            self._log_alert_sent[stream] = now
            self.alerts.send(log_failure_event(stream, exc, at=datetime.now(UTC)))

    def ship_audit(self) -> int:
        """Copy operator changes recorded in the registry (by any process) into the
        tamper-evident audit stream; only this process writes the log files."""
        # Small batches: this runs on the event loop between reconcile passes, and the first start
        # after a bulk enrolment has 100,000 entries to ship (500 at a time held a revocation back).
        entries = self.registry.unshipped_audit(limit=100)
        for e in entries:
            record = {
                "event.dataset": "kanmon.audit", "event.action": e.action, "event.outcome": "success",
                "event.reason": e.reason, "user.name": e.actor, "device.id": e.device_id,
                "kanmon.audit.object": "device" if e.device_id else ("policy" if e.action == "policy-apply" else "console"), "kanmon.audit.time": e.at.isoformat() if e.at else None,
                "kanmon.audit.before": e.before, "kanmon.audit.after": e.after}
            self.logstore.append("audit", record)
            if e.action == "device-reported-lost":   # issue #21: the console's loss report
                self.metrics.device_loss_reports.inc()
            if self.alerts is not None and (event := event_from_audit(record, at=datetime.now(UTC))):
                self.alerts.send(event)
        self.registry.mark_audit_shipped([e.id for e in entries])
        return len(entries)

    async def reconcile_loop(self, reconciler: Reconciler) -> None:
        loop = asyncio.get_running_loop()
        last_full = loop.time()
        while not self._stop.is_set():
            try:
                poked = self._reconcile_now.is_set()
                self._reconcile_now.clear()
                full = loop.time() - last_full > RECONCILE_SAFETY_SECONDS
                if poked or full or reconciler.due():
                    with self.metrics.reconcile_seconds.time():
                        report = await asyncio.to_thread(reconciler.run_once, full)
                    if gone := self._apply_reconcile(report):
                        await asyncio.to_thread(self._end_sessions, gone)
                    if self.workers is not None:   # issue #22: cut in every worker before it counts as applied
                        await self.workers.reconciled(report)
                    self._confirm_applied(report.revision)
                    self.ship_audit()
                    if full:
                        last_full = loop.time()
                await self.refresh_sessions()
            except Exception:
                self.metrics.reconcile_errors.inc()
                log.exception("reconcile failed; retrying")
                await asyncio.sleep(1)
            await asyncio.sleep(RECONCILE_POLL_SECONDS)

    async def underlay_loop(self) -> None:
        """Keep the tunnel -> underlay table current: every second, and at most 5 times a
        second when a lookup missed (a device that has just shaken hands). A device whose
        outer address changed (roaming) gets its cached host verdicts dropped."""
        while not self._stop.is_set():
            try:
                # At most ~10 % of a core: with 100,000 peers one read costs a few hundred ms.
                await asyncio.wait_for(self._underlay_now.wait(),
                                       timeout=max(UNDERLAY_REFRESH_SECONDS, 10 * self.underlay.last_cost))
            except TimeoutError:
                pass
            self._underlay_now.clear()
            try:
                await asyncio.to_thread(self.underlay.refresh)
            except Exception:
                log.exception("reading the peers' endpoints failed; retrying")
                await asyncio.sleep(1)
                continue
            await asyncio.sleep(0.2)

    def _underlay_changed(self, tunnel_ips: set[str]) -> None:
        """A device roamed (or just shook hands): drop its cached host verdicts."""
        for ip in tunnel_ips:
            device = self.directory.by_ip(ip)
            if device is not None and self.policy is not None:
                self.policy.invalidate_device(device.device_id)

    async def log_rotation_loop(self) -> None:
        """Seal and compress the previous day's files off the event loop (gzip is slow)."""
        while not self._stop.is_set():
            await asyncio.sleep(LOG_ROTATION_CHECK_SECONDS)
            try:
                await asyncio.to_thread(self.logstore.rotate_if_needed)
                await asyncio.to_thread(self.purge_expired_logs)
            except Exception:
                log.exception("log rotation or retention purge failed; will retry")

    def purge_expired_logs(self) -> None:
        """Retention: remove whole day files older than logs.retention_days (default 3 years)."""
        report = purge(self.cfg.log_dir, datetime.now(UTC) - timedelta(days=self.cfg.log_retention_days))
        if report.removed:
            log.info("retention: removed %d log files older than %d days", len(report.removed), self.cfg.log_retention_days)

    def teardown(self) -> None:
        cfg = self.cfg
        cfg.pid_path.unlink(missing_ok=True)
        if self.cluster is not None:
            self.cluster.stop()
        if self.enrollment is not None:
            self.enrollment.stop()
        if self.alerts is not None:
            self.alerts.close(timeout=5)
        if self.firewall_log is not None:
            self.firewall_log.stop()   # flushes the pending aggregated records
        if steering.remove_table(cfg.nft_table):
            log.info("nftables table inet %s removed", cfg.nft_table)
        limitsnft.remove(cfg.nft_table)
        try:
            self.tunnel.destroy()
            log.info("tunnel %s removed", cfg.wg_interface)
        except Exception:
            log.exception("could not remove tunnel interface %s", cfg.wg_interface)
        if self.logstore is not None:
            self.logstore.close()
        if self.registry is not None:
            self.registry.close()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload_policy()))
        # `kanmon device ...` pokes us after a change, so a revocation applies at once
        # instead of at the next registry poll.
        loop.add_signal_handler(signal.SIGUSR1, self._reconcile_now.set)
        diagnostics.install(loop, self.cfg.state_dir)  # opt-in memory reports on SIGUSR2 (env, see module)
        malloc = allocator.current_allocator()  # chosen by `kanmon run` before start-up (gateway/runtime/allocator.py)
        self.metrics.allocator_info.labels(malloc).set(1)
        log.info("malloc: %s", malloc)
        try:
            trim_every = heaptrim.interval_from_env()  # opt-in periodic malloc_trim (env, see module)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        try:
            reconciler = await asyncio.to_thread(self.prepare_host)
            if self.autoquarantine is not None:
                self.autoquarantine.bind(loop)   # issue #18: orders are carried out on this loop
            if self.cfg.proxy_workers > 1:   # issue #22: N inspection processes forked after the compile
                self.workers, run_task = await inspection_workers.start_pool(self)
            else:
                self.master = build_master(ProxySettings.from_config(self.cfg), self.build_chain(),
                                           layer_decision=layer_decision(self.chain_parts()))
                if self.fatal_reason:
                    raise StartupError(self.fatal_reason)
                run_task = asyncio.create_task(self.master.run(), name="mitmproxy")
                await wait_for_listeners(self.master, run_task)
            self.metrics.serve(self.cfg.management_host, self.cfg.management_port)
            if self.cfg.enrollment_host is not None:
                # After the proxy started: mitmproxy writes its CA certificate then, and the
                # enrollment answer hands it to the device.
                self.enrollment = EnrollmentServer(
                    self.cfg, self.registry, self.logstore, self.tunnel.public_key(),
                    (self.cfg.mitmproxy_confdir / "mitmproxy-ca-cert.pem").read_bytes(), metrics=self.metrics)
                await asyncio.to_thread(self.enrollment.start)
                log.info("enrollment endpoint on https://%s:%d/v1/enroll", self.cfg.enrollment_host, self.cfg.enrollment_port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.management_host, self.cfg.management_port)
            reconcile_task = asyncio.create_task(self.reconcile_loop(reconciler), name="reconcile")
            rotation_task = asyncio.create_task(self.log_rotation_loop(), name="log-rotation")
            # Always: the peer read also feeds the tunnel log (auth stream), not only policy rules.
            underlay_task = asyncio.create_task(self.underlay_loop(), name="underlay")
            feeds_task = asyncio.create_task(self.feeds.loop(), name="feeds") if self.policy is not None else None
            trim = heaptrim.load_malloc_trim() if trim_every and malloc == "glibc" else None
            trim_task = asyncio.create_task(heaptrim.trim_loop(trim_every, trim), name="heap-trim") if trim else None
            if self.cluster is not None:
                self.cluster.start(asyncio.get_running_loop())
            self.cfg.pid_path.write_text(f"{os.getpid()}\n")
            # issue #22: what start-up built (every device's record, peer and directory entry) is kept
            # for good; the cyclic gc no longer walks it: a full collection over 100,000 devices' objects
            # stopped the process ~0.3-1 s, a revocation's tail (freed objects are still freed).
            gc.freeze()
            sd_notify("READY=1")
            log.info("gateway ready")
            stop_task = asyncio.create_task(self._stop.wait())
            await asyncio.wait({run_task, stop_task, reconcile_task}, return_when=asyncio.FIRST_COMPLETED)
            sd_notify("STOPPING=1")
            if self.workers is not None:   # issue #22
                await self.workers.stop()
            else:
                self.master.shutdown()
            reconcile_task.cancel()
            rotation_task.cancel()
            for task in (underlay_task, trim_task, feeds_task):
                if task is not None:
                    task.cancel()
            await asyncio.wait({run_task}, timeout=5)
            return 1 if self.fatal_reason else 0
        except (TunnelError, steering.SteeringError) as exc:   # no tunnel or no firewall: refused, no traceback
            raise StartupError(exc.text) from None
        finally:
            await asyncio.to_thread(self.teardown)
