"""Registry outages on a cluster node (issue #8): status changes queued in a local SQLite
outbox while the shared registry is unreachable, replayed when it answers again, and the
gateway process's `OutageTolerantRegistry` view that keeps enforcing the last known state.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus

log = logging.getLogger("kanmon.cluster")

QUEUEABLE = {DeviceStatus.REVOKED: "device-revoked", DeviceStatus.SUSPENDED: "device-suspended",
             DeviceStatus.QUARANTINED: "device-quarantined"}


# -- local outbox ------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueuedChange:
    seq: int
    device_id: str
    status: DeviceStatus
    reason: str
    suspended_until: datetime | None
    actor: str
    queued_at: datetime
    node: str


class LocalOutbox:
    """Status changes issued while the registry is unreachable (SQLite in the state dir,
    shared by the CLI and the gateway process)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS queued (seq INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL,"
            " status TEXT NOT NULL, reason TEXT NOT NULL, suspended_until TEXT, actor TEXT NOT NULL,"
            " queued_at TEXT NOT NULL, node TEXT NOT NULL, replayed_at TEXT, result TEXT)")

    def close(self) -> None:
        self._db.close()

    def queue(self, device_id: str, status: DeviceStatus, reason: str, actor: str, node: str,
              suspended_until: datetime | None = None) -> int:
        if status not in QUEUEABLE:
            raise ValueError(f"only revocations, suspensions and quarantines are queued, not {status}")
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO queued (device_id, status, reason, suspended_until, actor, queued_at, node)"
                " VALUES (?,?,?,?,?,?,?)",
                (device_id, str(status), reason, suspended_until.isoformat() if suspended_until else None, actor,
                 datetime.now(UTC).isoformat(), node))
            return cur.lastrowid

    def pending(self) -> list[QueuedChange]:
        with self._lock:
            rows = self._db.execute("SELECT seq, device_id, status, reason, suspended_until, actor, queued_at, node"
                                    " FROM queued WHERE replayed_at IS NULL ORDER BY seq").fetchall()
        return [QueuedChange(r[0], r[1], DeviceStatus(r[2]), r[3], datetime.fromisoformat(r[4]) if r[4] else None,
                             r[5], datetime.fromisoformat(r[6]), r[7]) for r in rows]

    def mark_replayed(self, seq: int, result: str) -> None:
        with self._lock:
            self._db.execute("UPDATE queued SET replayed_at=?, result=? WHERE seq=?",
                             (datetime.now(UTC).isoformat(), result, seq))

    def history(self) -> list[tuple[int, str, str, str | None, str | None]]:
        with self._lock:
            return self._db.execute("SELECT seq, device_id, status, replayed_at, result FROM queued ORDER BY seq").fetchall()


def apply_queued(rec: DeviceRecord, change: QueuedChange) -> DeviceRecord:
    """Pure: the record after a queued change (a revocation is never undone by a later one)."""
    if rec.status is DeviceStatus.REVOKED:
        return rec
    return replace(rec, status=change.status, status_reason=change.reason,
                   suspended_until=change.suspended_until if change.status is DeviceStatus.SUSPENDED else None)


def replay_outbox(registry, outbox: LocalOutbox) -> list[tuple[int, str]]:
    """Write every pending queued change into the registry, oldest first, each with its audit
    entry. Stops at the first RegistryUnavailable (the rest stays queued)."""
    done = []
    for change in outbox.pending():
        rec = registry.get(change.device_id)
        if rec is None:
            result = "unknown device"
        elif rec.status is DeviceStatus.REVOKED:
            result = "already revoked"
        else:
            reason = f"{change.reason} (queued on {change.node} at {change.queued_at.isoformat()} during a registry outage)"
            registry.update(apply_queued(rec, change), audit=AuditEntry(change.actor, QUEUEABLE[change.status], reason))
            result = "applied"
        outbox.mark_replayed(change.seq, result)
        log.warning("queued %s of %s (#%d) replayed into the registry: %s", change.status, change.device_id,
                    change.seq, result)
        done.append((change.seq, result))
    return done


# -- the gateway's view of a shared registry ---------------------------------------------------

class OutageTolerantRegistry:
    """`DeviceRegistry` for the gateway process over a `PgRegistry`. While the server answers
    it passes everything through and remembers the records; while it does not, reads come from
    that memory with the local outbox's queued changes on top (so the node keeps enforcing the
    last state and applies its own queued revocations), writes raise RegistryUnavailable. When
    the server answers again the outbox is replayed first, then the real revisions continue.

    `revision()` does no I/O (the reconcile loop calls it on the event loop every 50 ms, and a
    blackholed server must not freeze the proxy): it returns the latest revision learned from
    NOTIFY payloads (`note_revision`) and from a probe thread (`start_probe`, own connection,
    which also detects the outage and the recovery). Revisions handed out during an outage are
    negative (never a real one): the first real read after it continues from the last real
    revision the caller consumed."""

    def __init__(self, inner, outbox: LocalOutbox, on_state: Callable[[bool, str], None] = lambda up, d: None):
        from gateway.registry.postgres import RegistryUnavailable
        self._Unavailable = RegistryUnavailable
        self.inner = inner
        self.outbox = outbox
        self.on_state = on_state
        self.up = True
        self.records: dict[str, DeviceRecord] = {}
        self.consumed_revision = 0
        self.latest: int | None = None
        self._lock = threading.Lock()
        self._replay_due = False
        self._overlaid = 0            # highest outbox seq already handed out during this outage
        self._probe_stop = threading.Event()
        self._probe_thread: threading.Thread | None = None

    def __getattr__(self, name):     # report_node, nodes ... pass through
        return getattr(self.inner, name)

    # -- state -----------------------------------------------------------------------------
    def note_revision(self, revision: int) -> None:
        with self._lock:
            if self.up and (self.latest is None or revision > self.latest):
                self.latest = revision

    def _down(self, exc: Exception) -> None:
        with self._lock:
            was_up, self.up = self.up, False
        if was_up:
            detail = str(getattr(exc, "detail", exc))
            log.critical("registry unreachable; enforcing the last known state, refusing changes: %s", detail)
            self.on_state(False, detail)

    def _back(self, revision: int) -> None:
        with self._lock:
            was_up, self.up = self.up, True
            if not was_up:
                self._replay_due = True
                self._overlaid = 0
            if self.latest is None or revision > self.latest or not was_up:
                self.latest = revision
        if not was_up:
            log.warning("registry reachable again; replaying queued changes")
            self.on_state(True, "")

    def probe(self, probe_registry) -> None:
        try:
            self._back(probe_registry.revision())
        except self._Unavailable as exc:
            self._down(exc)

    def start_probe(self, probe_registry, interval: float = 0.5) -> None:
        def loop():
            while not self._probe_stop.wait(interval):
                self.probe(probe_registry)
        self._probe_thread = threading.Thread(target=loop, name="registry-probe", daemon=True)
        self._probe_thread.start()

    def _replay_if_due(self) -> None:
        if self._replay_due:
            replay_outbox(self.inner, self.outbox)
            self._replay_due = False

    def _pseudo_revision(self) -> int:
        pending = self.outbox.pending()
        return -1 - (pending[-1].seq if pending else 0)

    @staticmethod
    def _overlay(records: dict[str, DeviceRecord], changes: list[QueuedChange]) -> list[DeviceRecord]:
        out = []
        for change in changes:
            rec = records.get(change.device_id)
            if rec is not None:
                records[change.device_id] = rec = apply_queued(rec, change)
                out.append(rec)
        return out

    # -- DeviceRegistry --------------------------------------------------------------------
    def revision(self) -> int:
        if not self.up:
            return self._pseudo_revision()
        if self.latest is None:
            try:
                self._back(self.inner.revision())
            except self._Unavailable as exc:
                self._down(exc)
                return self._pseudo_revision()
        return self.latest

    def changed_since(self, revision: int) -> tuple[int, list[DeviceRecord]]:
        try:
            if not self.up:
                raise _StillDown()
            self._replay_if_due()
            current, changed = self.inner.changed_since(revision if revision >= 0 else self.consumed_revision)
        except (self._Unavailable, _StillDown) as exc:
            if not isinstance(exc, _StillDown):
                self._down(exc)
            fresh = [c for c in self.outbox.pending() if c.seq > self._overlaid]
            if fresh:
                self._overlaid = fresh[-1].seq
            return self._pseudo_revision(), self._overlay(self.records, fresh)
        self.records.update({r.device_id: r for r in changed})
        self.consumed_revision = current
        self.note_revision(current)
        return current, changed

    def all(self) -> list[DeviceRecord]:
        try:
            if not self.up:
                raise _StillDown()
            self._replay_if_due()
            revision, records = self.inner.snapshot()
        except (self._Unavailable, _StillDown) as exc:
            if not isinstance(exc, _StillDown):
                self._down(exc)
            view = dict(self.records)
            self._overlay(view, self.outbox.pending())
            return sorted(view.values(), key=lambda r: r.device_id)
        self.records = {r.device_id: r for r in records}
        self.consumed_revision = revision
        self.note_revision(revision)
        return records

    def get(self, device_id: str) -> DeviceRecord | None:
        try:
            return self.inner.get(device_id)
        except self._Unavailable as exc:
            self._down(exc)
            return self.records.get(device_id)

    def by_public_key(self, key: str) -> DeviceRecord | None:
        try:
            return self.inner.by_public_key(key)
        except self._Unavailable as exc:
            self._down(exc)
            return next((r for r in self.records.values() if r.wg_public_key == key), None)

    def add(self, record, audit=None):
        return self.inner.add(record, audit)

    def update(self, record, audit=None):
        return self.inner.update(record, audit)

    def allocate_addresses(self, prefix4, prefix6):
        return self.inner.allocate_addresses(prefix4, prefix6)

    def unshipped_audit(self, limit: int = 500) -> list[AuditEntry]:
        if not self.up:
            return []
        try:
            return self.inner.unshipped_audit(limit)
        except self._Unavailable as exc:
            self._down(exc)
            return []

    def mark_audit_shipped(self, ids: list[int]) -> None:
        self.inner.mark_audit_shipped(ids)

    def append_audit(self, entry: AuditEntry) -> None:
        self.inner.append_audit(entry)

    def close(self) -> None:
        self._probe_stop.set()
        self.inner.close()
        self.outbox.close()


class _StillDown(Exception):
    """Internal: the probe says the server is down; do not wait on it again."""
