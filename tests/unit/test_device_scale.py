"""Issue #22, 100,000 devices: the batched peer writes, the cached peer read and row parse,
and the reconciler's fail-closed behaviour when a batch fails half-way."""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import replace

import pytest

from gateway.net.tunnel import (
    PeerSpec, TunnelError, WireGuardInterface, _key_b64, _key_hex, parse_uapi_peers, uapi_set_messages,
)
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus
from gateway.registry.sqlite import SqliteRegistry
from gateway.runtime.reconcile import Reconciler
from tests.unit.test_registry import NOW, FakeTunnel, add, key


def uapi_reply(peers: list[tuple[str, list[str], str | None, int]]) -> str:
    """A wireguard-go `get` reply for (base64 key, allowed ips, endpoint, handshake sec)."""
    lines = ["private_key=" + "11" * 32, "listen_port=51820"]
    for b64, allowed, endpoint, sec in peers:
        lines += [f"public_key={_key_hex(b64)}", "preshared_key=" + "0" * 64, "protocol_version=1"]
        if endpoint:
            lines.append(f"endpoint={endpoint}")
        lines += [f"last_handshake_time_sec={sec}", "last_handshake_time_nsec=500000000", "tx_bytes=0",
                  "rx_bytes=0", "persistent_keepalive_interval=0"]
        lines += [f"allowed_ip={a}" for a in allowed]
    return "\n".join(lines) + "\nerrno=0\n\n"


def test_uapi_peer_read_parses_every_field_and_reuses_unchanged_peers():
    a, b = key(), key()
    reply = uapi_reply([(a, ["fd77:77::2/128", "10.77.0.2/32"], "[2001:db8::7]:51820", 1700000000),
                        (b, ["10.77.0.3/32"], None, 0)])
    peers, cache = parse_uapi_peers(reply)
    assert set(peers) == {a, b}
    pa = peers[a]
    assert pa.allowed_ips == ("10.77.0.2/32", "fd77:77::2/128")     # sorted, as the old reader gave them
    assert pa.endpoint == "[2001:db8::7]:51820" and pa.last_handshake == pytest.approx(1700000000.5)
    assert peers[b].endpoint is None and peers[b].last_handshake == pytest.approx(0.5)
    # Same text again (in another order, as wireguard-go's map gives it): the same objects back.
    again, cache2 = parse_uapi_peers(uapi_reply([(b, ["10.77.0.3/32"], None, 0),
                                                 (a, ["fd77:77::2/128", "10.77.0.2/32"], "[2001:db8::7]:51820",
                                                  1700000000)]), cache)
    assert again[a] is pa and again[b] is peers[b]
    # One peer roams: only it is parsed anew; a peer gone from the reply is gone from the cache.
    moved, cache3 = parse_uapi_peers(uapi_reply([(a, ["10.77.0.2/32", "fd77:77::2/128"], "198.51.100.9:4500",
                                                  1700000100)]), cache2)
    assert set(moved) == {a} and moved[a] is not pa and moved[a].endpoint == "198.51.100.9:4500"
    assert len(cache3) == 1


@pytest.mark.parametrize("reply", ["errno=1\n\n", "public_key=" + "ab" * 32 + "\n", ""])
def test_uapi_peer_read_refuses_an_error_or_a_cut_reply(reply):
    with pytest.raises(TunnelError):
        parse_uapi_peers(reply)


def test_key_conversion_round_trips_and_refuses_what_is_not_a_key():
    k = key()
    assert _key_b64(_key_hex(k)) == k
    for bad in ("", "not base64!", "AAAA", k[:-4]):
        with pytest.raises(TunnelError):
            _key_hex(bad)


def test_set_messages_are_bounded_whole_peers_with_removals_first():
    remove = [key() for _ in range(50)]
    upsert = [PeerSpec(key(), (f"10.64.{i // 256}.{i % 256}/32", f"fd77:77::{i:x}/128")) for i in range(3000)]
    messages = uapi_set_messages(remove, upsert, 16 * 1024)
    assert len(messages) > 10
    for m in messages:
        assert m.startswith("set=1\n") and m.endswith("\n\n") and len(m) <= 16 * 1024 + 300
        assert m[len("set=1\n"):].startswith("public_key=")
    text = "".join(messages)
    assert text.index("remove=true") < text.index("replace_allowed_ips=true")
    assert text.count("remove=true") == 50 and text.count("replace_allowed_ips=true") == 3000
    assert text.count("allowed_ip=") == 6000
    # one peer's lines never straddle two messages
    for m in messages:
        lines = m.rstrip("\n").splitlines()[1:]
        assert lines[-1].startswith(("remove=", "allowed_ip=")) and "allowed_ip=" not in lines[0]
    assert uapi_set_messages([], [], 1024) == []


class FailingUapi(WireGuardInterface):
    """A wireguard-go interface whose socket refuses the n-th set message."""

    def __init__(self, fail_at: int):
        super().__init__("wgtest")
        self.kind = "wireguard-go"
        self.fail_at, self.sent = fail_at, []

    def _uapi_exchange(self, message: str) -> str:
        self.sent.append(message)
        return "errno=1\n\n" if len(self.sent) == self.fail_at else "errno=0\n\n"


def test_a_refused_batch_raises_and_nothing_after_it_is_sent():
    tunnel = FailingUapi(fail_at=2)
    tunnel.UAPI_SET_BYTES = 4096
    with pytest.raises(TunnelError, match="errno=1"):
        tunnel.upsert_peers(PeerSpec(key(), (f"10.64.0.{i}/32",)) for i in range(200))
    assert len(tunnel.sent) == 2


class FlakyTunnel(FakeTunnel):
    """FakeTunnel whose next remove/upsert fails once when asked to."""

    def __init__(self):
        super().__init__()
        self.fail_next: set[str] = set()

    def sync_peers(self, desired, add=True):
        if not add:
            for k in [k for k in self.peers if k not in desired]:
                self.peers.pop(k)
            self.calls.append(("sync-remove-only", len(desired)))
            return None
        return super().sync_peers(desired)

    def remove_peers(self, keys):
        if "remove" in self.fail_next:
            self.fail_next.discard("remove")
            raise TunnelError("wireguard-go refused configuration: errno=1")
        keys = list(keys)
        for k in keys:   # like wireguard-go and the kernel: removing an absent peer is no error
            self.peers.pop(k, None)
        self.calls.append(("remove", tuple(keys)))

    def upsert_peers(self, peers):
        if "upsert" in self.fail_next:
            self.fail_next.discard("upsert")
            raise TunnelError("wireguard-go refused configuration: errno=1")
        super().upsert_peers(peers)


class FlakyNft:
    def __init__(self):
        self.elements: set = set()
        self.fail_next = False

    def __call__(self, table, add=(), remove=()):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("nft set update failed")
        self.elements |= set(add)
        self.elements -= set(remove)


def setup(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    devices = [add(reg, n) for n in "abc"]
    tunnel, nft = FlakyTunnel(), FlakyNft()
    rec = Reconciler(reg, tunnel, "t", clock=lambda: NOW, set_blocked=nft)
    rec.run_once(full=True)
    return reg, devices, tunnel, nft, rec


def test_revocation_whose_drop_set_update_fails_still_removes_the_peer_and_is_retried(tmp_path):
    reg, devices, tunnel, nft, rec = setup(tmp_path)
    reg.update(replace(devices[0], status=DeviceStatus.REVOKED))
    nft.fail_next = True
    with pytest.raises(RuntimeError, match="nft"):
        rec.run_once()
    assert devices[0].wg_public_key not in tunnel.peers, "the peer is cut even though the firewall failed"
    assert rec.due(), "the revision is not marked as applied"
    report = rec.run_once()          # the retry completes the firewall part
    assert devices[0].ipv4 in nft.elements and devices[0].ipv6 in nft.elements
    assert report.admitted_ids == {"b", "c"} and not rec.due()


def test_revocation_whose_peer_removal_fails_is_blocked_and_the_removal_retried(tmp_path):
    reg, devices, tunnel, nft, rec = setup(tmp_path)
    reg.update(replace(devices[1], status=DeviceStatus.REVOKED))
    tunnel.fail_next = {"remove"}
    with pytest.raises(TunnelError):
        rec.run_once()
    assert devices[1].ipv4 in nft.elements, "blocked at the firewall although the peer removal failed"
    assert devices[1].wg_public_key in tunnel.peers and rec.due()
    rec.run_once()
    assert devices[1].wg_public_key not in tunnel.peers, "the retry removes the peer (state was not committed)"
    assert rec.peer_of.keys() == {"a", "c"}


def test_a_failed_admission_leaves_the_device_refused_until_the_retry_succeeds(tmp_path):
    reg, devices, tunnel, nft, rec = setup(tmp_path)
    new = add(reg, "d")
    tunnel.fail_next = {"upsert"}
    with pytest.raises(TunnelError):
        rec.run_once()
    assert new.wg_public_key not in tunnel.peers and "d" not in rec.peer_of
    report = rec.run_once()
    assert new.wg_public_key in tunnel.peers and "d" in report.admitted_ids


def test_a_failing_full_pass_still_removes_peers_of_devices_no_longer_admitted(tmp_path):
    reg, devices, tunnel, nft, rec = setup(tmp_path)
    reg.update(replace(devices[2], status=DeviceStatus.SUSPENDED))
    extra = add(reg, "e")
    nft.fail_next = True
    with pytest.raises(RuntimeError):
        rec.run_once(full=True)
    assert devices[2].wg_public_key not in tunnel.peers
    assert extra.wg_public_key not in tunnel.peers, "nothing is admitted by a failing pass"
    report = rec.run_once(full=True)
    assert extra.wg_public_key in tunnel.peers and devices[2].ipv4 in nft.elements
    assert report.admitted_ids == {"a", "b", "e"}


def test_all_reuses_unchanged_rows_and_parses_edited_ones_again(tmp_path):
    path = tmp_path / "r.sqlite3"
    reg = SqliteRegistry(path)
    a, b = add(reg, "a"), add(reg, "b")
    first = {r.device_id: r for r in reg.all()}
    second = {r.device_id: r for r in reg.all()}
    assert first["a"] is second["a"] and first["b"] is second["b"]
    reg.update(replace(a, owner="sato"))
    third = {r.device_id: r for r in reg.all()}
    assert third["a"].owner == "sato" and third["b"] is first["b"]
    # Edited outside Kanmon, with no revision stamp: still parsed again, and a damaged row refused.
    db = sqlite3.connect(path)
    db.execute("UPDATE devices SET ipv4='10.77.0.999' WHERE device_id='b'")
    db.commit()
    db.close()
    assert [r.device_id for r in reg.all()] == ["a"]
    assert [bad.device_id for bad in reg.bad_rows] == ["b"]
    reg.close()


def test_audit_shipping_marks_many_entries_at_once(tmp_path):
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    rec = add(reg, "a")
    for i in range(300):
        reg.update(replace(rec, owner=f"owner-{i}"), audit=AuditEntry("test", "device-updated"))
    entries = reg.unshipped_audit(limit=1000)
    assert len(entries) == 300
    reg.mark_audit_shipped([e.id for e in entries[:200]])
    assert [e.id for e in reg.unshipped_audit(limit=1000)] == [e.id for e in entries[200:]]
    reg.close()


def test_more_admitted_devices_than_wireguard_go_holds_is_refused_clearly_and_only_removes(monkeypatch):
    import gateway.net.tunnel as tunnel_module

    monkeypatch.setattr(tunnel_module, "WIREGUARD_GO_MAX_PEERS", 3)
    tunnel = FailingUapi(fail_at=99)
    stale = key()
    monkeypatch.setattr(tunnel, "_uapi_get", lambda: uapi_reply([(stale, ["10.64.0.9/32"], None, 0)]))
    desired = {k: PeerSpec(k, (f"10.64.0.{i}/32",)) for i, k in enumerate(key() for _ in range(4))}
    with pytest.raises(TunnelError, match="at most 3 peers") as refused:
        tunnel.sync_peers(desired)
    assert "カーネル" in refused.value.text.ja and "kernel WireGuard" in refused.value.text.en
    sent = "".join(tunnel.sent)
    assert "remove=true" in sent and "replace_allowed_ips" not in sent, "the stale peer is removed, none added"


def test_the_incremental_read_of_changed_rows_does_not_scan_every_device(tmp_path):
    """Issue #22: `changed_since` reads through the row_rev index; with the primary key chosen
    for its ORDER BY it visited all 100,000 rows (65 ms) on every revocation."""
    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    reg._db.execute("PRAGMA synchronous=OFF")
    pool = ipaddress.ip_network("10.64.0.0/20")
    devices = [reg.add(DeviceRecord(f"d{i:04d}", key(), *reg.allocate_addresses(pool, None))) for i in range(1500)]
    before = reg.revision()
    reg.update(replace(devices[700], status=DeviceStatus.REVOKED))
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0
    reg._db.set_progress_handler(count, 100)
    revision, changed = reg.changed_since(before)
    incremental, steps[0] = steps[0], 0
    reg.all()
    whole = steps[0]
    reg._db.set_progress_handler(None, 0)
    assert [r.device_id for r in changed] == ["d0700"]
    assert incremental * 50 < whole, (incremental, whole)
    reg.close()
