"""One reconciler brings the host in line with the registry.

For every device: admitted -> WireGuard peer with its /32 and /128, address out of the drop
sets, in the proxy's device directory; not admitted (revoked, suspended, outside its usage
period) -> no peer, address in the drop sets, live proxy connections cut.
It runs on every registry change (polled by revision number, cheap) and at the next time
a status changes by itself (end of a suspension, end of a usage period).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway import steering
from gateway.registry import DeviceRecord, DeviceRegistry
from gateway.tunnel import PeerSpec, PeerSyncResult, WireGuardInterface

log = logging.getLogger("kanmon.reconcile")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DesiredState:
    admitted: tuple[DeviceRecord, ...]
    peers: dict[str, PeerSpec]
    blocked: frozenset[Address]
    next_change: datetime | None


def desired_state(records: list[DeviceRecord], now: datetime) -> DesiredState:
    """Pure: what the host should look like for these records at `now`."""
    admitted, peers, blocked, changes = [], {}, set(), []
    for rec in records:
        for t in (rec.valid_from, rec.valid_until, rec.suspended_until):
            if t is not None and t > now:
                changes.append(t)
        if rec.admitted(now):
            admitted.append(rec)
            allowed = [f"{rec.ipv4}/32"] + ([f"{rec.ipv6}/128"] if rec.ipv6 else [])
            peers[rec.wg_public_key] = PeerSpec(rec.wg_public_key, tuple(allowed))
        else:
            blocked.update(rec.addresses)
    return DesiredState(tuple(admitted), peers, frozenset(blocked), min(changes) if changes else None)


@dataclass(frozen=True)
class ReconcileReport:
    revision: int
    peers: PeerSyncResult
    newly_blocked: frozenset[Address]
    unblocked: frozenset[Address]
    admitted: tuple[DeviceRecord, ...]
    next_change: datetime | None
    seconds: float


class Reconciler:
    def __init__(self, registry: DeviceRegistry, tunnel: WireGuardInterface, nft_table: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.registry = registry
        self.tunnel = tunnel
        self.nft_table = nft_table
        self.clock = clock
        self.applied_blocked: frozenset[Address] = frozenset()
        self.applied_revision: int | None = None
        self.next_change: datetime | None = None

    def initial(self) -> DesiredState:
        """Desired state before the tunnel and the table exist (the table is rendered with it)."""
        state = desired_state(self.registry.all(), self.clock())
        self.applied_blocked = state.blocked
        return state

    def due(self) -> bool:
        if self.registry.revision() != self.applied_revision:
            return True
        return self.next_change is not None and self.clock() >= self.next_change

    def run_once(self) -> ReconcileReport:
        """Blocking (netlink/UAPI, nft): call from a worker thread. Blocks first, then
        removes peers, so a device losing admission is cut off at the firewall at once."""
        started = time.perf_counter()
        revision = self.registry.revision()
        state = desired_state(self.registry.all(), self.clock())
        newly_blocked = state.blocked - self.applied_blocked
        unblocked = self.applied_blocked - state.blocked
        steering.set_blocked(self.nft_table, add=newly_blocked, remove=unblocked)
        self.applied_blocked = state.blocked
        peers = self.tunnel.sync_peers(state.peers)
        self.applied_revision = revision
        self.next_change = state.next_change
        report = ReconcileReport(revision, peers, newly_blocked, unblocked, state.admitted, state.next_change,
                                 time.perf_counter() - started)
        if peers.added or peers.removed or peers.updated or newly_blocked or unblocked:
            log.info("reconciled revision %s: +%d -%d ~%d peers, %d newly blocked, %d unblocked (%.1f ms)",
                     revision, len(peers.added), len(peers.removed), len(peers.updated), len(newly_blocked),
                     len(unblocked), report.seconds * 1000)
        return report
