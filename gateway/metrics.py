"""Prometheus metrics of one gateway process (own registry: no module globals)."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Label values taken from log records are bounded: short machine words only.
_LABEL_WORD = re.compile(r"[a-z0-9][a-z0-9._:-]{0,47}")


def auth_failure_reason(record: dict) -> str:
    """The stable code of a failed authentication: ``kanmon.auth.reason`` (enrollment and
    sign-in refusals), else ``event.action``; "other" for anything that is not a short code.
    The dashboard (``kanmon_auth_failures_total{reason}``) and the monthly review group by it."""
    reason = str(record.get("kanmon.auth.reason") or record.get("event.action") or "unknown")
    return reason if _LABEL_WORD.fullmatch(reason) else "other"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "kanmon_decisions_total",
            "Decisions made, by stage, verdict, rule id, rule category and the device's (first) group.",
            ["stage", "verdict", "rule", "category", "group"], registry=r)
        self.addon_errors = Counter(
            "kanmon_addon_errors_total",
            "Exceptions raised by addons; each blocked the connection it happened on (fail closed).",
            ["addon", "hook"], registry=r)
        self.fail_closed_blocks = Counter(
            "kanmon_fail_closed_blocks_total",
            "Connections or requests blocked because no decision could be made or an addon failed.",
            ["stage", "reason"], registry=r)
        self.unknown_device_connections = Counter(
            "kanmon_unknown_device_connections_total",
            "Proxy connections whose tunnel source address belongs to no admitted device.", registry=r)
        self.peers = Gauge("kanmon_wireguard_peers", "WireGuard peers configured on the tunnel interface.", registry=r)
        self.devices = Gauge("kanmon_devices", "Devices in the registry by effective status.", ["status"], registry=r)
        self.reconcile_seconds = Histogram(
            "kanmon_reconcile_duration_seconds", "Time to bring peers and drop sets in line with the registry.",
            registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
        self.reconcile_errors = Counter("kanmon_reconcile_errors_total", "Failed reconcile passes.", registry=r)
        self.signins = Counter(
            "kanmon_user_signins_total",
            "User sign-ins through the OIDC portal (issue #9), by outcome and refusal reason.",
            ["outcome", "reason"], registry=r)
        self.user_sessions = Gauge("kanmon_user_sessions", "Active user sessions (signed-in devices).", registry=r)
        self.connections_cut = Counter(
            "kanmon_connections_cut_total", "Live proxy connections cut because their device lost admission.",
            registry=r)
        self.policy_reloads = Counter(
            "kanmon_policy_reloads_total", "Policy loads and reloads by result (failure: the old policy keeps serving).",
            ["result"], registry=r)
        self.policy_cache = Counter(  # issue #22: gateway/runtime/policycache.py
            "kanmon_policy_cache_total", "Prepared-policy cache reads and writes by result (hit, miss, refused: "
            "damaged and compiled from the sources, write-failure).", ["result"], registry=r)
        self.policy_rules = Gauge("kanmon_policy_rules", "Rules in the policy in force.", registry=r)
        self.policy_rules_expiring = Gauge(
            "kanmon_policy_rules_expiring", "Active rules that expire within the given number of days.", ["days"], registry=r)
        self.policy_info = Gauge("kanmon_policy_info", "The policy in force (value 1), by version.", ["version"], registry=r)
        self.list_entries = Gauge(
            "kanmon_list_entries", "Entries of a category feed's last good copy, by feed and category.",
            ["list", "category"], registry=r)
        self.list_age = Gauge(
            "kanmon_list_age_seconds",
            "Seconds since a category feed was last fetched successfully (+Inf: never).", ["list"], registry=r)
        self.list_update_failures = Counter(
            "kanmon_list_update_failures_total",
            "Refused or failed feed updates by reason (the last good copy keeps serving).", ["list", "reason"],
            registry=r)
        self.allocator_info = Gauge(
            "kanmon_allocator_info", "The malloc the gateway runs on (value 1): jemalloc, or glibc when it is missing.",
            ["allocator"], registry=r)
        self.decision_seconds = Histogram(
            "kanmon_decision_duration_seconds", "Time to decide one request, DNS query or connection.", ["stage"],
            registry=r, buckets=(0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05))
        self.auth_failures = Counter(
            "kanmon_auth_failures_total", "Refused enrollments and other authentication failures, by reason.",
            ["reason"], registry=r)
        self.enrollment_connections_dropped = Counter(
            "kanmon_enrollment_connections_dropped_total",
            "Enrollment connections closed without an answer, by reason: source-limit / slots-full (at accept, "
            "before TLS), handshake-timeout, request-timeout, tls-error.", ["reason"], registry=r)
        self.mail_verdicts = Counter(
            "kanmon_mail_verdicts_total", "Mail verdicts, by verdict and indicator.", ["verdict", "indicator"], registry=r)
        # issue #19: the per-indicator counter counts a message once per indicator that fired
        # (and as indicator="none" when none did); the dashboard counts messages with this one.
        self.mail_messages = Counter(
            "kanmon_mail_messages_total", "Mail messages judged, once per message, by verdict and direction.",
            ["verdict", "direction"], registry=r)
        self.log_write_errors = Counter(
            "kanmon_log_write_errors_total", "Log records that could not be written.", ["stream"], registry=r)
        self.log_records = Counter(
            "kanmon_log_records_total", "Log records written, by stream.", ["stream"], registry=r)
        self.device_limited = Counter(
            "kanmon_device_limited_total",
            "Connections refused, DNS queries dropped and requests refused because one device went over a "
            "per-device limit (issue #14, `limits:` in the config), by limit.", ["limit"], registry=r)
        self.device_loss_reports = Counter(
            "kanmon_device_loss_reports_total",
            "Devices their owner reported lost in the operator console (issue #21), counted when the "
            "gateway ships the audit entry.", registry=r)
        self.clock_jumps = Counter(
            "kanmon_clock_jumps_total",
            "Wall-clock steps seen by the reconciler (against the monotonic clock), by direction; each one "
            "re-evaluated every device's usage period and suspension.", ["direction"], registry=r)
        # Firewall log (gateway/net/firewalllog_reader.py): the table's drops, read over NFLOG.
        self.firewall_log_packets = Counter(
            "kanmon_firewall_log_packets_total",
            "Dropped/rejected packets the kernel handed to the firewall log, by reason code.", ["reason"], registry=r)
        self.firewall_log_errors = Counter(
            "kanmon_firewall_log_errors_total",
            "Firewall log trouble, by kind: overrun (the kernel dropped log messages: ENOBUFS), parse, socket.",
            ["kind"], registry=r)
        self.firewall_log_up = Gauge(
            "kanmon_firewall_log_up", "1 while the firewall log reader is bound to its NFLOG group and reading.",
            registry=r)
        self.firewall_log_heartbeat = Gauge(
            "kanmon_firewall_log_heartbeat_timestamp_seconds",
            "Unix time the firewall log reader last went round its loop (at least once a second when healthy).",
            registry=r)
        self.tunnel_events = Counter(
            "kanmon_tunnel_events_total", "WireGuard session events written to the auth stream, by action.",
            ["action"], registry=r)
        # issue #18: download scanning, automatic quarantine, alert delivery
        self.download_scans = Counter(
            "kanmon_download_scans_total", "Risky downloads scanned, by file kind and result "
            "(clean, infected, too-large, unavailable) and action taken (allow, block).",
            ["kind", "result", "action"], registry=r)
        self.auto_quarantines = Counter(
            "kanmon_auto_quarantines_total", "Devices quarantined automatically, by trigger.", ["trigger"], registry=r)
        self.auto_quarantine_errors = Counter(
            "kanmon_auto_quarantine_errors_total", "Automatic quarantines that could not be written to the registry.",
            registry=r)
        self.alert_deliveries = Counter(
            "kanmon_alert_deliveries_total", "Operator alerts (webhook, mail) by channel and outcome "
            "(delivered, retried, failed: given up after every retry, dropped: queue full).",
            ["channel", "outcome"], registry=r)

    def observe_log_record(self, stream: str, line: str) -> None:
        """``LogStore(on_record=...)`` hook: counts every record written, and every failed
        authentication in the `auth` stream, whoever wrote it (enrollment endpoint, admin
        logins), into ``kanmon_auth_failures_total{reason}`` -- the series behind the
        KanmonAuthFailureBurst alert (IPA 技術的対策 3.8.5 大量の認証失敗). Only auth lines
        that mention a failure are parsed."""
        self.log_records.labels(stream).inc()
        if stream != "auth" or '"failure"' not in line:
            return
        record = json.loads(line)
        if record.get("event.outcome") != "failure":
            return
        self.auth_failures.labels(auth_failure_reason(record)).inc()

    def observe_clock_jump(self, seconds: float) -> None:
        """``Reconciler(on_clock_jump=...)`` hook: one wall-clock step of `seconds` (signed)."""
        self.clock_jumps.labels("forward" if seconds > 0 else "backward").inc()

    def serve(self, host: str, port: int):
        """Expose /metrics on the management address (a daemon thread)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread
