"""One reconciler brings the host in line with the registry.

For every device: admitted -> WireGuard peer with its /32 and /128, address out of the drop
sets, in the proxy's device directory; not admitted (revoked, suspended, outside its usage
period) -> no peer, address in the drop sets, live proxy connections cut.
It runs on every registry change (polled by revision number, cheap) and at the next time
a status changes by itself (end of a suspension, end of a usage period).

Validity follows the wall clock. When the wall clock is stepped (NTP correcting a wrong
clock, an operator's `date -s`, a VM resumed), the reconciler sees the wall clock move
differently from the monotonic clock, warns the operator and makes its next pass a full one:
a forward step cuts the devices whose usage period ended in between (and ends timed
suspensions), a backward step applies what the new time says: a device whose usage period
had ended is admitted again until that end comes round once more. A revoked device is never
re-admitted by any clock (its status, not a time, keeps it out)."""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from gateway.net import steering
from gateway.registry.model import DeviceRecord, DeviceRegistry
from gateway.net.tunnel import PeerSpec, PeerState, WireGuardInterface, differs

log = logging.getLogger("kanmon.reconcile")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Steps smaller than this are not reported: NTP slews small offsets, and validity periods
# are set in minutes, so only a step of seconds or more can change who is admitted.
CLOCK_JUMP_TOLERANCE_SECONDS = 5.0


def clock_jump(before: tuple[datetime, float], after: tuple[datetime, float],
               tolerance: float = CLOCK_JUMP_TOLERANCE_SECONDS) -> float:
    """Pure: how many seconds the wall clock was stepped between two (wall, monotonic)
    readings -- positive forward, negative backward, 0.0 when the two clocks agree within
    `tolerance`. The monotonic clock (CLOCK_MONOTONIC) is never stepped; it also stops while
    the host is suspended, so a resume shows as a forward step, which it is for validity."""
    step = (after[0] - before[0]).total_seconds() - (after[1] - before[1])
    return step if abs(step) > tolerance else 0.0


@dataclass(frozen=True)
class DesiredState:
    admitted: tuple[DeviceRecord, ...]
    peers: dict[str, PeerSpec]
    blocked: frozenset[Address]
    next_change: datetime | None
    # The same by device id (the reconciler's bookkeeping after a full pass).
    peer_of: dict[str, PeerSpec] = field(default_factory=dict)
    blocked_of: dict[str, frozenset[Address]] = field(default_factory=dict)


def desired_state(records: list[DeviceRecord], now: datetime) -> DesiredState:
    """Pure: what the host should look like for these records at `now`."""
    admitted, peers, blocked, changes, peer_of, blocked_of = [], {}, set(), [], {}, {}
    for rec in records:
        for t in (rec.valid_from, rec.valid_until, rec.suspended_until):
            if t is not None and t > now:
                changes.append(t)
        if rec.admitted(now):
            admitted.append(rec)
            peers[rec.wg_public_key] = peer_of[rec.device_id] = peer_spec(rec)
        else:
            blocked_of[rec.device_id] = addresses = frozenset(rec.addresses)
            blocked.update(addresses)
    return DesiredState(tuple(admitted), peers, frozenset(blocked), min(changes) if changes else None,
                        peer_of, blocked_of)


@functools.lru_cache(maxsize=1 << 18)
def _spec(public_key: str, ipv4: Address, ipv6: Address | None) -> PeerSpec:
    return PeerSpec(public_key, (f"{ipv4}/32", f"{ipv6}/128") if ipv6 else (f"{ipv4}/32",))


def peer_spec(rec: DeviceRecord) -> PeerSpec:
    """Pure: the peer of an admitted device (its key, AllowedIPs = its /32 and /128).
    Memoized: a full pass over 100,000 devices would otherwise format 200,000 addresses."""
    return _spec(rec.wg_public_key, rec.ipv4, rec.ipv6)


def contribution(rec: DeviceRecord, now: datetime) -> tuple[PeerSpec | None, frozenset[Address]]:
    """Pure: one device's part of the desired state (its peer, or its blocked addresses)."""
    if rec.admitted(now):
        return peer_spec(rec), frozenset()
    return None, frozenset(rec.addresses)


@dataclass(frozen=True)
class ReconcileReport:
    revision: int
    full: bool
    peers_added: int
    peers_removed: int
    newly_blocked: frozenset[Address]
    unblocked: frozenset[Address]
    # Records that changed in this pass (all of them on a full pass), and which of them are
    # admitted now: the proxy's device directory and live connections follow these.
    changed: tuple[DeviceRecord, ...]
    admitted_ids: frozenset[str]
    next_change: datetime | None
    seconds: float
    # Devices by effective status (issue #22: from the periodic full pass's background read, whose
    # report lists only the devices it corrected); None: not counted in this pass.
    status_counts: dict[str, int] | None = None


@dataclass(frozen=True)
class _Snapshot:
    """A periodic full pass's background read and what follows from it alone."""
    revision: int
    records: dict[str, DeviceRecord]
    peer_of: dict[str, PeerSpec]
    blocked_of: dict[str, frozenset[Address]]
    remove: list[str]
    upsert: list[PeerSpec]
    next_change: datetime | None
    status_counts: dict[str, int]


class Reconciler:
    """Keeps the interface's peers and the drop sets equal to what the registry says.

    A full pass reads every device and the interface's actual peers (corrects any drift); an
    incremental pass reads only the rows changed since the last revision seen and touches only
    their peers and addresses, so revoking one device among 10,000 costs one row, one UAPI
    message and one nft command.

    The periodic full pass (``run_once(full=True)`` once the first pass is done) never holds a
    revocation back (issue #22: at 100,000 devices its reads take about a second). Its reads --
    every row (from ``snapshot_registry``: its own connection, so the incremental passes' reads
    do not queue behind it) and every peer of the interfaces -- run in a background thread while
    incremental passes go on. When they are done, the next pass applies the corrections they
    show, except for the devices whose rows changed after the snapshot's revision: those belong
    to the incremental passes, which have applied (or will apply) newer state than the snapshot
    holds. A start-up pass and a pass after a clock step run in full at once, as before."""

    def __init__(self, registry: DeviceRegistry, tunnel: WireGuardInterface, nft_table: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 set_blocked: Callable[..., None] = steering.set_blocked,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_clock_jump: Callable[[float], None] | None = None,
                 snapshot_registry: DeviceRegistry | None = None, background_full: bool = False):
        self.registry = registry
        self.background_full = background_full   # the gateway: True (tests of the inline pass: False)
        # issue #22: the full pass's reader of every row (a second connection to the same
        # registry); the only one whose all() is called, so one parse cache is kept.
        self.snapshot_registry = snapshot_registry if snapshot_registry is not None else registry
        self._snapshot: Future | None = None
        self._initial_read: tuple[int, list[DeviceRecord], DesiredState] | None = None
        self.initial_records: list[DeviceRecord] = []   # the rows initial() read
        self._snapshot_pool: ThreadPoolExecutor | None = None
        self.tunnel = tunnel
        self.nft_table = nft_table
        self.clock = clock
        self.set_blocked = set_blocked
        self.monotonic = monotonic
        self.on_clock_jump = on_clock_jump  # e.g. GatewayMetrics.observe_clock_jump
        self.last_reading: tuple[datetime, float] | None = None
        self.full_pass_pending = False       # set by a detected clock step
        self.records: dict[str, DeviceRecord] = {}
        self.peer_of: dict[str, PeerSpec] = {}          # device id -> peer applied
        self.blocked_of: dict[str, frozenset[Address]] = {}
        self.applied_blocked: frozenset[Address] = frozenset()
        self.seen_revision: int | None = None
        self.next_change: datetime | None = None

    def initial(self) -> DesiredState:
        """Desired state before the tunnel and the table exist (the table is rendered with it)."""
        revision = self.snapshot_registry.revision()
        self.initial_records = self.snapshot_registry.all()
        state = desired_state(self.initial_records, self.now())
        self.applied_blocked = state.blocked
        # The start-up's full pass uses these rows and this state when no revision was written
        # since (issue #22: reading and evaluating 100,000 rows again cost ~2 s of the start-up).
        self._initial_read = (revision, self.initial_records, state)
        return state

    def now(self) -> datetime:
        """The wall clock, checked against the monotonic clock since the previous reading
        (due() reads it every poll, so a step is seen within one poll interval)."""
        reading = (self.clock(), self.monotonic())
        step = clock_jump(self.last_reading, reading) if self.last_reading is not None else 0.0
        self.last_reading = reading
        if step:
            self.full_pass_pending = True
            log.warning("wall clock stepped %s by %.0f s (against the monotonic clock; NTP, `date -s` or a "
                        "resumed host); re-evaluating every device's usage period and suspension now. Check the "
                        "time source: validity decisions follow the wall clock",
                        "forward" if step > 0 else "backward", abs(step))
            if self.on_clock_jump is not None:
                self.on_clock_jump(step)
        return reading[0]

    def due(self) -> bool:
        now = self.now()
        if self.full_pass_pending or self.registry.revision() != self.seen_revision or self.snapshot_ready():
            return True
        return self.next_change is not None and now >= self.next_change

    def snapshot_ready(self) -> bool:
        """The background reads of a periodic full pass are done: the next pass applies them."""
        return self._snapshot is not None and self._snapshot.done()

    def run_once(self, full: bool = False) -> ReconcileReport:
        """Blocking (registry, netlink/UAPI, nft): call from a worker thread. Blocks first, then
        removes peers, so a device losing admission is cut off at the firewall at once."""
        started = time.perf_counter()
        now = self.now()
        if self.seen_revision is None or self.full_pass_pending or (full and not self.background_full):
            self.full_pass_pending = False
            self._drop_snapshot()   # older than the pass about to run
            return self._full(now, started)
        if full and self._snapshot is None:
            if self._snapshot_pool is None:
                self._snapshot_pool = ThreadPoolExecutor(1, thread_name_prefix="reconcile-snapshot")
            self._snapshot = self._snapshot_pool.submit(self._read_snapshot)
        report = self._incremental(now, started)
        if not self.snapshot_ready():
            return report
        future, self._snapshot = self._snapshot, None
        return self._apply_snapshot(future.result(), now, started)   # a failed read raises: counted, retried

    def _drop_snapshot(self) -> None:
        if self._snapshot is not None:
            self._snapshot.cancel()
            self._snapshot = None

    def close(self) -> None:
        self._drop_snapshot()
        if self._snapshot_pool is not None:
            self._snapshot_pool.shutdown(wait=False, cancel_futures=True)

    def _read_snapshot(self) -> "_Snapshot":
        """Background thread: the registry's revision, every row, every peer, and from them
        everything the correction needs that does not depend on later writes (so the pass that
        applies it does work in proportion to the devices changed since, not to all of them)."""
        revision = self.snapshot_registry.revision()
        records = self.snapshot_registry.all()
        now = self.clock()
        peer_of: dict[str, PeerSpec] = {}
        blocked_of: dict[str, frozenset[Address]] = {}
        changes = []
        counts: dict[str, int] = {}
        for rec in records:
            peer, blocked = contribution(rec, now)
            if peer is not None:
                peer_of[rec.device_id] = peer
            if blocked:
                blocked_of[rec.device_id] = blocked
            changes += [t for t in (rec.valid_from, rec.valid_until, rec.suspended_until) if t is not None and t > now]
            status = str(rec.effective_status(now))
            counts[status] = counts.get(status, 0) + 1
        current = self.tunnel.peers()
        desired = {p.public_key: p for p in peer_of.values()}
        remove = [k for k in current if k not in desired]
        upsert = [p for k, p in desired.items() if k not in current or differs(p.allowed_ips, current[k].allowed_ips)]
        return _Snapshot(revision, {r.device_id: r for r in records}, peer_of, blocked_of, remove, upsert,
                         min(changes) if changes else None, counts)

    def _apply_snapshot(self, snap: "_Snapshot", now: datetime, started: float) -> ReconcileReport:
        """The periodic full pass's corrections (after this call's incremental part). Devices
        whose rows changed after the snapshot's revision keep what the incremental passes
        applied, and their keys are neither added nor removed here. The report lists only the
        devices the correction changed (drift, rows edited without a revision stamp, deleted
        rows), so the event loop's share is small too; it carries the status counts."""
        _, moved = self.registry.changed_since(snap.revision)
        skip = {r.device_id for r in moved}
        skip_keys = {r.wg_public_key for r in moved if r.wg_public_key}
        by_id, peer_of, blocked_of = snap.records, snap.peer_of, snap.blocked_of   # owned: patched in place
        counts = dict(snap.status_counts)
        for device_id in skip:
            for rec, step in ((by_id.get(device_id), -1), (self.records.get(device_id), 1)):
                if rec is not None:   # the status counts follow the rows applied, not the snapshot's
                    status = str(rec.effective_status(now))
                    counts[status] = counts.get(status, 0) + step
            for held in (peer_of.get(device_id), self.peer_of.get(device_id)):
                if held is not None:
                    skip_keys.add(held.public_key)
            for mine, theirs in ((self.peer_of, peer_of), (self.blocked_of, blocked_of), (self.records, by_id)):
                if device_id in mine:
                    theirs[device_id] = mine[device_id]
                else:
                    theirs.pop(device_id, None)
        remove = [k for k in snap.remove if k not in skip_keys]
        upsert = [p for p in snap.upsert if p.public_key not in skip_keys]
        new_blocked = frozenset().union(*blocked_of.values()) if blocked_of else frozenset()
        newly_blocked, unblocked = new_blocked - self.applied_blocked, self.applied_blocked - new_blocked
        self._cut_then_admit(newly_blocked, unblocked, new_blocked, remove, upsert)
        # What the correction changed: records that differ from the ones applied, devices whose
        # peer or drop entry was corrected, and devices gone from the registry.
        touched = {d for d, rec in by_id.items() if (old := self.records.get(d)) is not rec and old != rec}
        touched |= {d for d in self.records if d not in by_id}
        if upsert:
            keys = {p.public_key: d for d, p in peer_of.items()}
            touched |= {keys[p.public_key] for p in upsert if p.public_key in keys}
        if remove:
            gone = {p.public_key: d for d, p in self.peer_of.items()}
            touched |= {gone[k] for k in remove if k in gone}
        touched |= {d for d in set(blocked_of) ^ set(self.blocked_of) if d not in skip}
        changed = [by_id.get(d) or self.records[d] for d in sorted(touched)]
        self.records, self.peer_of, self.blocked_of = by_id, peer_of, blocked_of
        candidates = [t for t in (snap.next_change,) if t is not None and t > now]
        for device_id in skip:
            if (rec := by_id.get(device_id)) is not None:
                candidates += [t for t in (rec.valid_from, rec.valid_until, rec.suspended_until) if t is not None and t > now]
        self.next_change = min(candidates) if candidates else None
        report = self._report(self.seen_revision, False, len(upsert), len(remove), newly_blocked, unblocked,
                              changed, started)
        return replace(report, status_counts=counts)

    def _incremental(self, now: datetime, started: float) -> ReconcileReport:
        timer_due = self.next_change is not None and now >= self.next_change
        revision, changed = self.registry.changed_since(self.seen_revision)
        for rec in changed:
            self.records[rec.device_id] = rec
        to_evaluate = list(self.records.values()) if timer_due else changed
        # Worked out apart from the applied state, which changes only once the host has
        # changed: a pass that fails half-way is done again in full by the next pass.
        remove, upsert, changed_out = [], [], []
        changed_ids = {r.device_id for r in changed}
        peer_now: dict[str, PeerSpec | None] = {}
        blocked_now: dict[str, frozenset[Address]] = {}
        for rec in to_evaluate:
            peer, blocked = contribution(rec, now)
            old_peer, old_blocked = self.peer_of.get(rec.device_id), self.blocked_of.get(rec.device_id, frozenset())
            if peer != old_peer:
                if old_peer is not None and (peer is None or peer.public_key != old_peer.public_key):
                    remove.append(old_peer.public_key)
                if peer is not None:
                    upsert.append(peer)
                peer_now[rec.device_id] = peer
            if blocked != old_blocked:
                blocked_now[rec.device_id] = blocked
            if peer != old_peer or blocked != old_blocked or rec.device_id in changed_ids:
                changed_out.append(rec)
        blocked_of = {**self.blocked_of, **blocked_now} if blocked_now else self.blocked_of
        blocked_of = {d: b for d, b in blocked_of.items() if b} if blocked_now else blocked_of
        new_blocked = frozenset().union(*blocked_of.values()) if blocked_of else frozenset()
        newly_blocked, unblocked = new_blocked - self.applied_blocked, self.applied_blocked - new_blocked
        self._cut_then_admit(newly_blocked, unblocked, new_blocked, remove, upsert)
        for device_id, peer in peer_now.items():
            if peer is None:
                self.peer_of.pop(device_id, None)
            else:
                self.peer_of[device_id] = peer
        self.blocked_of = blocked_of
        self.seen_revision = revision
        self._plan_next(changed, now, recompute=timer_due)
        return self._report(revision, False, len(upsert), len(remove), newly_blocked, unblocked, changed_out, started)

    def _cut_then_admit(self, newly_blocked, unblocked, new_blocked, remove: list[str], upsert: list[PeerSpec]) -> None:
        """Fail closed: the drop-set update and the peer removals are both attempted even when
        the other fails (either alone cuts a device off); peers are added only when both
        succeeded. Any failure raises, so the caller counts it, logs it and retries; the
        applied state is left as it was, so the retry does the whole pass again."""
        errors: list[Exception] = []
        try:
            self.set_blocked(self.nft_table, add=newly_blocked, remove=unblocked)
            self.applied_blocked = new_blocked   # what the kernel holds now, whatever follows
        except Exception as exc:
            errors.append(exc)
        if remove:
            try:
                self.tunnel.remove_peers(remove)
            except Exception as exc:
                errors.append(exc)
        if errors:
            for extra in errors[1:]:
                log.error("reconcile: also failed: %s", extra)
            raise errors[0]
        if upsert:
            self.tunnel.upsert_peers(upsert)

    def _full(self, now: datetime, started: float) -> ReconcileReport:
        revision = self.snapshot_registry.revision()
        first, self._initial_read = self._initial_read, None
        if first is not None and first[0] == revision:
            _, records, state = first
        else:
            records = self.snapshot_registry.all()
            state = desired_state(records, now)
        newly_blocked, unblocked = state.blocked - self.applied_blocked, self.applied_blocked - state.blocked
        try:
            self.set_blocked(self.nft_table, add=newly_blocked, remove=unblocked)
            self.applied_blocked = state.blocked
        except Exception:
            # Fail closed: still take away the peers of every device not admitted now, then
            # report the failure (counted, logged, retried by the caller); add nothing.
            self.tunnel.sync_peers(state.peers, add=False)
            raise
        result = self.tunnel.sync_peers(state.peers)  # reads the interface: corrects drift
        self.records = {r.device_id: r for r in records}
        self.peer_of, self.blocked_of = state.peer_of, state.blocked_of
        self.seen_revision = revision
        self.next_change = state.next_change
        return self._report(revision, True, len(result.added) + len(result.updated), len(result.removed),
                            newly_blocked, unblocked, records, started)

    def _plan_next(self, changed: list[DeviceRecord], now: datetime, recompute: bool) -> None:
        candidates = [] if recompute or (self.next_change is not None and self.next_change <= now) else \
            ([self.next_change] if self.next_change else [])
        source = self.records.values() if recompute else changed
        for rec in source:
            for t in (rec.valid_from, rec.valid_until, rec.suspended_until):
                if t is not None and t > now:
                    candidates.append(t)
        self.next_change = min(candidates) if candidates else None

    def _report(self, revision, full, added, removed, newly_blocked, unblocked, changed, started) -> ReconcileReport:
        report = ReconcileReport(
            revision=revision, full=full, peers_added=added, peers_removed=removed,
            newly_blocked=frozenset(newly_blocked), unblocked=frozenset(unblocked), changed=tuple(changed),
            admitted_ids=frozenset(self.peer_of), next_change=self.next_change,
            seconds=time.perf_counter() - started)
        if added or removed or newly_blocked or unblocked:
            log.info("reconciled revision %s (%s): +%d -%d peers, %d newly blocked, %d unblocked (%.1f ms)",
                     revision, "full" if full else "incremental", added, removed, len(newly_blocked),
                     len(unblocked), report.seconds * 1000)
        return report


def cut_changed_devices(app, changed: dict, admitted_ids) -> None:
    """The event-loop side of a reconcile pass in one process: cut its live connections
    (``app.connections``) whose device lost admission or whose record changed, and drop the
    policy's cached verdicts for that device. Called by the gateway process
    (GatewayApp._apply_reconcile) and by each inspection worker on the parent's reconcile
    report (gateway/runtime/workers.py follow_reconcile)."""
    for state in app.connections.all():
        if state.device is None or (now_record := changed.get(state.device.device_id)) is None:
            continue
        if now_record == state.device and now_record.device_id in admitted_ids:
            continue
        if app.policy is not None:
            app.policy.invalidate_device(state.device.device_id)
        reason = "device no longer admitted" if now_record.device_id not in admitted_ids else "device record changed"
        if app.cutter.cut(state.client_id, reason):
            app.metrics.connections_cut.inc()
