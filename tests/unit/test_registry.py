"""Device registry (SQLite): addresses, admission over time, revisions, conflicts."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from wireguard_tools import WireguardKey

from gateway.registry.model import DeviceRecord, DeviceStatus, RegistryError
from gateway.registry.sqlite import SqliteRegistry
from gateway.runtime.reconcile import desired_state

P4, P6 = ipaddress.ip_network("10.77.0.0/29"), ipaddress.ip_network("fd77:77::/64")
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def key() -> str:
    return str(WireguardKey.generate().public_key())


def add(reg: SqliteRegistry, device_id: str, **kw) -> DeviceRecord:
    v4, v6 = reg.allocate_addresses(P4, P6)
    return reg.add(DeviceRecord(device_id=device_id, wg_public_key=key(), ipv4=v4, ipv6=v6, **kw))


def test_allocation_skips_gateway_and_used_addresses_and_mirrors_v6(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    a, b = add(reg, "a"), add(reg, "b")
    assert (str(a.ipv4), str(a.ipv6)) == ("10.77.0.2", "fd77:77::2")
    assert (str(b.ipv4), str(b.ipv6)) == ("10.77.0.3", "fd77:77::3")
    for name in "cde":
        add(reg, name)
    with pytest.raises(RegistryError, match="no free address"):
        reg.allocate_addresses(P4, P6)


def test_revision_changes_on_every_write_and_records_round_trip(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    r0 = reg.revision()
    rec = add(reg, "phone-1", owner="sato@example.jp", groups=frozenset({"staff", "sales"}),
              valid_until=NOW + timedelta(days=30))
    r1 = reg.revision()
    reg.update(replace(rec, status=DeviceStatus.SUSPENDED, suspended_until=NOW + timedelta(hours=1)))
    assert r0 < r1 < reg.revision()
    back = SqliteRegistry(tmp_path / "r.sqlite3").get("phone-1")  # a second process sees it
    assert back.groups == frozenset({"staff", "sales"}) and back.status is DeviceStatus.SUSPENDED
    assert back.suspended_until == NOW + timedelta(hours=1)


def test_duplicate_key_or_id_is_refused_and_unknown_update_fails(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    rec = add(reg, "a")
    v4, v6 = reg.allocate_addresses(P4, P6)
    with pytest.raises(RegistryError):
        reg.add(DeviceRecord(device_id="b", wg_public_key=rec.wg_public_key, ipv4=v4, ipv6=v6))
    with pytest.raises(RegistryError):
        reg.add(replace(rec, wg_public_key=key(), ipv4=v4, ipv6=v6))
    with pytest.raises(RegistryError, match="no such device"):
        reg.update(replace(rec, device_id="ghost"))
    assert [r.device_id for r in reg.all()] == ["a"]


@pytest.mark.parametrize("changes, admitted", [
    ({}, True),
    ({"status": DeviceStatus.REVOKED}, False),
    ({"status": DeviceStatus.QUARANTINED}, True),
    ({"status": DeviceStatus.SUSPENDED}, False),
    ({"status": DeviceStatus.SUSPENDED, "suspended_until": NOW + timedelta(minutes=1)}, False),
    ({"status": DeviceStatus.SUSPENDED, "suspended_until": NOW - timedelta(seconds=1)}, True),
    ({"valid_from": NOW + timedelta(days=1)}, False),
    ({"valid_until": NOW}, False),
    ({"valid_until": NOW + timedelta(seconds=1)}, True),
])
def test_admission_over_time(changes, admitted):
    rec = DeviceRecord("d", key(), ipaddress.ip_address("10.77.0.2"), **changes)
    assert rec.admitted(NOW) is admitted


def test_desired_state_blocks_non_admitted_and_finds_next_change():
    ok = DeviceRecord("ok", key(), ipaddress.ip_address("10.77.0.2"), ipaddress.ip_address("fd77:77::2"))
    gone = DeviceRecord("gone", key(), ipaddress.ip_address("10.77.0.3"), ipaddress.ip_address("fd77:77::3"),
                        status=DeviceStatus.REVOKED)
    later = DeviceRecord("later", key(), ipaddress.ip_address("10.77.0.4"), status=DeviceStatus.SUSPENDED,
                         suspended_until=NOW + timedelta(minutes=5))
    state = desired_state([ok, gone, later], NOW)
    assert [r.device_id for r in state.admitted] == ["ok"]
    assert state.peers[ok.wg_public_key].allowed_ips == ("10.77.0.2/32", "fd77:77::2/128")
    assert gone.wg_public_key not in state.peers and later.wg_public_key not in state.peers
    assert state.blocked == {gone.ipv4, gone.ipv6, later.ipv4}
    assert state.next_change == NOW + timedelta(minutes=5)
    assert [r.device_id for r in desired_state([later], NOW + timedelta(minutes=5)).admitted] == ["later"]


def test_changes_carry_their_audit_entry_atomically(tmp_path):
    from gateway.registry.model import AuditEntry

    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    v4, v6 = reg.allocate_addresses(P4, P6)
    rec = reg.add(DeviceRecord("a", key(), v4, v6), audit=AuditEntry("ito", "device.add", "new phone"))
    reg.update(replace(rec, status=DeviceStatus.REVOKED, status_reason="lost"),
               audit=AuditEntry("ito", "device.revoke", "lost"))
    entries = reg.unshipped_audit()
    assert [(e.actor, e.action, e.reason, e.device_id) for e in entries] == [
        ("ito", "device.add", "new phone", "a"), ("ito", "device.revoke", "lost", "a")]
    assert entries[1].before["status"] == "active" and entries[1].after["status"] == "revoked"
    # A refused change writes no audit entry.
    with pytest.raises(RegistryError):
        reg.add(DeviceRecord("b", rec.wg_public_key, *reg.allocate_addresses(P4, P6)), audit=AuditEntry("ito", "device.add"))
    reg.mark_audit_shipped([entries[0].id])
    assert [e.id for e in reg.unshipped_audit()] == [entries[1].id]


def test_unenrolled_device_has_no_peer_and_allocation_fills_gaps(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    pending = reg.add(DeviceRecord("pending", None, *reg.allocate_addresses(P4, P6)))
    assert not pending.admitted(NOW)
    others = [add(reg, n) for n in "bcde"]
    assert str(others[-1].ipv4) == "10.77.0.6"
    reg._db.execute("DELETE FROM devices WHERE device_id='c'")  # a freed address in the middle
    assert str(reg.allocate_addresses(P4, P6)[0]) == "10.77.0.4"


class FakeTunnel:
    def __init__(self):
        self.peers: dict[str, tuple] = {}
        self.calls: list[tuple] = []

    def sync_peers(self, desired):
        from gateway.net.tunnel import PeerSyncResult
        added = [k for k in desired if k not in self.peers]
        removed = [k for k in self.peers if k not in desired]
        self.peers = {k: v.allowed_ips for k, v in desired.items()}
        self.calls.append(("sync", len(desired)))
        return PeerSyncResult(tuple(added), tuple(removed), ())

    def remove_peers(self, keys):
        keys = list(keys)
        for k in keys:
            self.peers.pop(k)
        self.calls.append(("remove", tuple(keys)))

    def upsert_peers(self, peers):
        peers = list(peers)
        for p in peers:
            self.peers[p.public_key] = p.allowed_ips
        self.calls.append(("upsert", tuple(p.public_key for p in peers)))


def test_reconciler_full_then_incremental_touches_only_what_changed(tmp_path):
    from gateway.runtime.reconcile import Reconciler

    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    devices = [add(reg, n) for n in "abcd"]
    tunnel, nft = FakeTunnel(), []
    clock = [NOW]
    rec = Reconciler(reg, tunnel, "t", clock=lambda: clock[0], set_blocked=lambda t, add, remove: nft.append((set(add), set(remove))))
    first = rec.run_once(full=True)
    assert first.full and len(tunnel.peers) == 4 and first.admitted_ids == {"a", "b", "c", "d"}
    assert not rec.due()
    # Revoke one device: one row read, one peer removed, its addresses blocked; nothing else.
    reg.update(replace(devices[1], status=DeviceStatus.REVOKED, status_reason="lost"))
    assert rec.due()
    tunnel.calls.clear()
    report = rec.run_once()
    assert not report.full and [r.device_id for r in report.changed] == ["b"]
    assert tunnel.calls == [("remove", (devices[1].wg_public_key,))]
    assert nft[-1] == ({devices[1].ipv4, devices[1].ipv6}, set())
    assert report.admitted_ids == {"a", "c", "d"}
    # A suspension that ends by itself: blocked now, admitted again when its time comes.
    reg.update(replace(devices[2], status=DeviceStatus.SUSPENDED, suspended_until=NOW + timedelta(minutes=10)))
    rec.run_once()
    assert devices[2].wg_public_key not in tunnel.peers and rec.next_change == NOW + timedelta(minutes=10)
    clock[0] = NOW + timedelta(minutes=10, seconds=1)
    assert rec.due()
    report = rec.run_once()
    assert devices[2].wg_public_key in tunnel.peers and "c" in report.admitted_ids
    assert nft[-1] == (set(), {devices[2].ipv4, devices[2].ipv6})
    # The revoked device stays blocked through all of it.
    assert devices[1].ipv4 in rec.applied_blocked


def test_reconciler_follows_wall_clock_jumps_forward_and_back(tmp_path):
    """Issue #7 'clock jump', at the reconciler: validity follows the wall clock it is given.
    Forward past a usage period's end: cut at the next pass. Backward: a period-expired device
    is admitted again (time-based states follow the clock), a revoked one never is."""
    from gateway.runtime.reconcile import Reconciler

    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    timed = add(reg, "timed", valid_until=NOW + timedelta(hours=1))
    revoked = add(reg, "revoked")
    reg.update(replace(revoked, status=DeviceStatus.REVOKED, status_reason="lost"))
    tunnel, clock = FakeTunnel(), [NOW]
    rec = Reconciler(reg, tunnel, "t", clock=lambda: clock[0], set_blocked=lambda *a, **k: None)
    rec.run_once(full=True)
    assert timed.wg_public_key in tunnel.peers and revoked.wg_public_key not in tunnel.peers
    clock[0] = NOW + timedelta(days=1)            # jump forward
    assert rec.due()
    rec.run_once()
    assert timed.wg_public_key not in tunnel.peers and timed.ipv4 in rec.applied_blocked
    clock[0] = NOW                                # jump back
    rec.run_once(full=True)
    assert timed.wg_public_key in tunnel.peers
    assert revoked.wg_public_key not in tunnel.peers and revoked.ipv4 in rec.applied_blocked
