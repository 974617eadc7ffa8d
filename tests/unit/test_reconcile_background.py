"""Issue #22: the periodic full reconcile pass reads in the background, so a revocation never
waits behind it, and its corrections never undo what a newer registry write decided."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from gateway.net.tunnel import PeerSyncResult, TunnelError
from gateway.registry.model import DeviceStatus
from gateway.registry.sqlite import SqliteRegistry
from gateway.runtime.reconcile import Reconciler
from tests.unit.test_device_scale import FlakyNft
from tests.unit.test_registry import NOW, add, key


class GatedTunnel:
    """A tunnel whose peer read can be held at a gate (the background read of a full pass)."""

    def __init__(self):
        self.state: dict[str, tuple] = {}
        self.gate: threading.Event | None = None
        self.reading = threading.Event()
        self.fail_read = False

    def peers(self):
        self.reading.set()
        if self.gate is not None:
            assert self.gate.wait(20), "test gate never opened"
        if self.fail_read:
            raise TunnelError("wireguard-go closed the peer read early")
        return {k: type("P", (), {"allowed_ips": tuple(sorted(v))})() for k, v in self.state.items()}

    def sync_peers(self, desired, add=True):
        removed = [k for k in self.state if k not in desired]
        for k in removed:
            del self.state[k]
        added = [k for k in desired if k not in self.state] if add else []
        if add:
            self.state.update({k: v.allowed_ips for k, v in desired.items()})
        return PeerSyncResult(tuple(added), tuple(removed), ())

    def remove_peers(self, keys):
        for k in keys:
            self.state.pop(k, None)

    def upsert_peers(self, peers):
        self.state.update({p.public_key: p.allowed_ips for p in peers})


def setup(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    devices = [add(reg, n) for n in "abc"]
    tunnel, nft = GatedTunnel(), FlakyNft()
    rec = Reconciler(reg, tunnel, "t", clock=lambda: NOW, set_blocked=nft,
                     snapshot_registry=SqliteRegistry(tmp_path / "r.sqlite3"), background_full=True)
    first = rec.run_once(full=True)
    assert first.full and first.admitted_ids == {"a", "b", "c"}
    return reg, devices, tunnel, nft, rec


def wait_ready(rec):
    deadline = time.monotonic() + 20
    while not rec.snapshot_ready():
        assert time.monotonic() < deadline, "background read never finished"
        time.sleep(0.01)


def test_a_revocation_is_applied_while_the_full_pass_is_still_reading(tmp_path):
    reg, (a, b, c), tunnel, nft, rec = setup(tmp_path)
    tunnel.gate = threading.Event()
    started = rec.run_once(full=True)
    assert not started.full, "the periodic pass only starts its reads"
    assert tunnel.reading.wait(20)          # rows read, now held in the peer read
    reg.update(replace(b, status=DeviceStatus.REVOKED))
    assert rec.due()
    report = rec.run_once()                 # returns although the full pass's read is still held
    assert not report.full and report.admitted_ids == {"a", "c"}
    assert b.wg_public_key not in tunnel.state and b.ipv4 in nft.elements and b.ipv6 in nft.elements
    # Drift behind the reconciler's back while the read is held: a stray peer, a lost one.
    stray = key()
    tunnel.state[stray] = ("10.77.0.250/32",)
    del tunnel.state[a.wg_public_key]
    tunnel.gate.set()
    wait_ready(rec)
    assert rec.due(), "finished background reads make the next pass due"
    report = rec.run_once()
    assert report.admitted_ids == {"a", "c"}
    assert set(tunnel.state) == {a.wg_public_key, c.wg_public_key}, "drift corrected, the revoked device not re-added"
    assert b.ipv4 in nft.elements, "the snapshot (older than the revocation) did not unblock it"
    # The report names only what the correction changed (a's lost peer), with every device counted
    # by the status its applied row has (b: revoked, although the snapshot read it active).
    assert not report.full and [r.device_id for r in report.changed] == ["a"]
    assert report.status_counts == {"active": 2, "revoked": 1}


def test_a_device_added_after_the_snapshot_is_left_to_the_incremental_pass(tmp_path):
    reg, _, tunnel, nft, rec = setup(tmp_path)
    tunnel.gate = threading.Event()
    rec.run_once(full=True)
    assert tunnel.reading.wait(20)
    d = add(reg, "d")
    rec.run_once()
    assert d.wg_public_key in tunnel.state
    tunnel.gate.set()          # the held read now sees d's peer, which its rows do not hold
    wait_ready(rec)
    report = rec.run_once()
    assert d.wg_public_key in tunnel.state and "d" in report.admitted_ids
    assert report.changed == () and report.status_counts == {"active": 4}
    assert not rec.due()


def test_a_row_deleted_from_the_registry_loses_its_peer_and_is_reported(tmp_path):
    reg, (a, b, c), tunnel, nft, rec = setup(tmp_path)
    reg._db.execute("DELETE FROM devices WHERE device_id='c'")   # no revision stamp: only a full pass sees it
    tunnel.gate = threading.Event()
    rec.run_once(full=True)
    tunnel.gate.set()
    wait_ready(rec)
    report = rec.run_once()
    assert c.wg_public_key not in tunnel.state and report.admitted_ids == {"a", "b"}
    assert [r.device_id for r in report.changed] == ["c"]


def test_a_failed_background_read_is_reported_and_the_next_periodic_pass_reads_again(tmp_path):
    reg, (a, b, c), tunnel, nft, rec = setup(tmp_path)
    tunnel.fail_read, tunnel.gate = True, threading.Event()
    rec.run_once(full=True)
    tunnel.gate.set()
    wait_ready(rec)
    with pytest.raises(TunnelError):
        rec.run_once()
    assert not rec.snapshot_ready() and not rec.due()
    tunnel.fail_read, tunnel.gate = False, threading.Event()
    del tunnel.state[c.wg_public_key]      # drift the next full pass must see
    rec.run_once(full=True)
    tunnel.gate.set()
    wait_ready(rec)
    report = rec.run_once()
    assert report.status_counts is not None and c.wg_public_key in tunnel.state
    assert [r.device_id for r in report.changed] == ["c"]
    rec.close()


def test_the_inline_full_pass_is_kept_for_start_up_and_without_the_option(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    add(reg, "a")
    tunnel = GatedTunnel()
    rec = Reconciler(reg, tunnel, "t", clock=lambda: NOW, set_blocked=FlakyNft())
    assert rec.run_once(full=True).full and rec.run_once(full=True).full
    assert rec.snapshot_registry is reg


def test_start_up_reads_the_rows_once_unless_a_write_came_between(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    a, b = add(reg, "a"), add(reg, "b")
    reads = []
    original = reg.all
    reg.all = lambda: reads.append(1) or original()
    rec = Reconciler(reg, GatedTunnel(), "t", clock=lambda: NOW, set_blocked=FlakyNft())
    rec.initial()
    assert rec.run_once(full=True).admitted_ids == {"a", "b"} and len(reads) == 1
    rec = Reconciler(reg, GatedTunnel(), "t", clock=lambda: NOW, set_blocked=FlakyNft())
    rec.initial()
    reg.update(replace(a, status=DeviceStatus.REVOKED))   # between the table's render and the first pass
    report = rec.run_once(full=True)
    assert report.admitted_ids == {"b"} and a.ipv4 in report.newly_blocked and len(reads) == 3
