"""The registry contract (`gateway.registry.DeviceRegistry`), run against every backend:
SQLite (embedded, one node) and PostgreSQL (several nodes; a private server started for the
session as the postgres user in a temporary directory). Whatever the interface promises is
asserted here once, for both; what only PostgreSQL adds (concurrent allocation from several
connections, NOTIFY, policy storage) is at the end.

PostgreSQL tests skip when the server or psycopg is missing (CI=true: they fail instead)."""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from wireguard_tools import WireguardKey

from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus, Ownership, RegistryError
from gateway.registry.sqlite import SqliteRegistry

P4, P6 = ipaddress.ip_network("10.77.0.0/29"), ipaddress.ip_network("fd77:77::/64")
T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


_db_numbers = count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_registry(request, tmp_path):
    """Factory: a registry on one fresh store; each call is another process's view of it."""
    clock = Clock()
    opened = []
    if request.param == "sqlite":
        def factory(**kw):
            reg = SqliteRegistry(tmp_path / "registry.sqlite3", clock=kw.get("clock", clock))
            opened.append(reg)
            return reg
    else:
        from gateway.registry.postgres import PgRegistry

        url = request.getfixturevalue("postgres").create_database(f"contract{next(_db_numbers)}")

        def factory(**kw):
            reg = PgRegistry(url, clock=kw.get("clock", clock), node=kw.get("node", "test"))
            opened.append(reg)
            return reg
    factory.backend = request.param
    yield factory
    for reg in opened:
        reg.close()


def key() -> str:
    return str(WireguardKey.generate().public_key())


def add(reg, device_id: str, audit: AuditEntry | None = None, **kw) -> DeviceRecord:
    v4, v6 = reg.allocate_addresses(P4, P6)
    return reg.add(DeviceRecord(device_id=device_id, wg_public_key=key(), ipv4=v4, ipv6=v6, **kw), audit=audit)


# -- addresses -------------------------------------------------------------------------------

def test_allocation_starts_above_the_gateway_mirrors_v6_and_refuses_when_full(open_registry):
    reg = open_registry()
    got = [add(reg, name) for name in "abcde"]
    assert [(str(r.ipv4), str(r.ipv6)) for r in got] == [(f"10.77.0.{i}", f"fd77:77::{i}") for i in range(2, 7)]
    with pytest.raises(RegistryError, match="no free address"):
        reg.allocate_addresses(P4, P6)


def test_allocation_fills_gaps_below_the_highest_address_in_use(open_registry):
    reg = open_registry()
    reg.add(DeviceRecord("top", key(), ipaddress.IPv4Address("10.77.0.6")))
    reg.add(DeviceRecord("mid", key(), ipaddress.IPv4Address("10.77.0.3")))
    a = add(reg, "a")
    b = add(reg, "b")
    c = add(reg, "c")
    assert sorted(str(r.ipv4) for r in (a, b, c)) == ["10.77.0.2", "10.77.0.4", "10.77.0.5"]
    with pytest.raises(RegistryError, match="no free address"):
        reg.allocate_addresses(P4, None)


def test_allocation_without_ipv6_prefix_gives_no_ipv6(open_registry):
    reg = open_registry()
    v4, v6 = reg.allocate_addresses(ipaddress.ip_network("10.9.0.0/24"), None)
    assert (str(v4), v6) == ("10.9.0.2", None)


# -- records and revisions -------------------------------------------------------------------

def test_every_field_round_trips_and_another_process_sees_it(open_registry):
    reg = open_registry()
    v4, v6 = reg.allocate_addresses(P4, P6)
    rec = DeviceRecord(
        device_id="phone-1", wg_public_key=key(), ipv4=v4, ipv6=v6, owner="佐藤 <sato@example.jp>",
        department="総務課", groups=frozenset({"staff", "sales"}), ownership=Ownership.BYOD, platform="ios",
        os_version="17.5.1", jailbroken=True, cert_serial="1a2b", cert_fingerprint="ab" * 32,
        valid_from=T0 - timedelta(days=1), valid_until=T0 + timedelta(days=30, microseconds=7),
        status=DeviceStatus.SUSPENDED, status_reason="紛失の疑い", suspended_until=T0 + timedelta(hours=2))
    stored = reg.add(rec)
    assert stored.created_at is not None and stored.updated_at == stored.created_at
    back = open_registry().get("phone-1")
    assert back == stored
    unenrolled = reg.add(DeviceRecord("pending", None, reg.allocate_addresses(P4, None)[0]))
    assert open_registry().get("pending") == unenrolled and unenrolled.ipv6 is None


def test_revision_moves_on_every_change_and_only_then(open_registry):
    reg, other = open_registry(), open_registry()
    r0 = reg.revision()
    rec = add(reg, "a")
    r1 = other.revision()
    reg.get("a"), reg.all(), reg.by_public_key(rec.wg_public_key), reg.changed_since(0)
    assert reg.revision() == r1 > r0
    reg.update(replace(rec, owner="x"))
    assert other.revision() > r1


def test_update_keeps_created_at_and_stamps_updated_at_with_the_clock(open_registry):
    clock = Clock()
    reg = open_registry(clock=clock)
    rec = add(reg, "a")
    later = reg.update(replace(rec, status=DeviceStatus.QUARANTINED, status_reason="posture"))
    assert later.created_at == rec.created_at < later.updated_at == clock.now
    assert reg.get("a") == later


def test_lookups(open_registry):
    reg = open_registry()
    b, a = add(reg, "b"), add(reg, "a")
    assert reg.by_public_key(a.wg_public_key) == a and reg.by_public_key(b.wg_public_key) == b
    assert reg.by_public_key(key()) is None
    assert reg.get("zz") is None
    assert [r.device_id for r in reg.all()] == ["a", "b"]


def test_conflicts_are_refused_and_change_nothing(open_registry):
    reg = open_registry()
    rec = add(reg, "a", audit=AuditEntry("op", "device-added"))
    before_rev, before_audit = reg.revision(), len(reg.unshipped_audit())
    v4, v6 = reg.allocate_addresses(P4, P6)
    attempts = [
        DeviceRecord("b", rec.wg_public_key, v4, v6),            # same key
        replace(rec, wg_public_key=key(), ipv4=v4, ipv6=v6),     # same id
        DeviceRecord("c", key(), rec.ipv4, None),                # same address
        DeviceRecord("d", key(), v4, rec.ipv6),                  # same IPv6 address
    ]
    for bad in attempts:
        with pytest.raises(RegistryError):
            reg.add(bad, audit=AuditEntry("op", "device-added"))
    with pytest.raises(RegistryError, match="no such device"):
        reg.update(replace(rec, device_id="ghost"), audit=AuditEntry("op", "device-revoked"))
    assert reg.revision() == before_rev
    other = add(reg, "e")
    rev_with_e = reg.revision()
    with pytest.raises(RegistryError):
        reg.update(replace(other, wg_public_key=rec.wg_public_key))
    assert reg.get("e") == other
    assert [r.device_id for r in reg.all()] == ["a", "e"]
    assert reg.revision() == rev_with_e > before_rev
    assert len(reg.unshipped_audit()) == before_audit


def test_changed_since_returns_exactly_what_changed_after_a_revision(open_registry):
    reg = open_registry()
    a, b, c = add(reg, "a"), add(reg, "b"), add(reg, "c")
    rev, everything = reg.changed_since(0)
    assert rev == reg.revision() and [r.device_id for r in everything] == ["a", "b", "c"]
    assert reg.changed_since(rev) == (rev, [])
    b2 = reg.update(replace(b, status=DeviceStatus.REVOKED, status_reason="lost"))
    rev2, changed = open_registry().changed_since(rev)
    assert rev2 > rev and changed == [b2]
    reg.update(replace(c, owner="new"))
    reg.update(replace(a, owner="new"))
    _, changed = reg.changed_since(rev2)
    assert [r.device_id for r in changed] == ["a", "c"]


# -- audit outbox ----------------------------------------------------------------------------

def test_audit_is_written_with_the_change_and_shipped_once(open_registry):
    clock = Clock()
    reg = open_registry(clock=clock)
    rec = add(reg, "a", audit=AuditEntry("sato", "device-added", "new phone"))
    add(reg, "quiet")                                        # no audit entry asked for
    revoked = reg.update(replace(rec, status=DeviceStatus.REVOKED), audit=AuditEntry("suzuki", "device-revoked", "紛失"))
    entries = reg.unshipped_audit()
    assert [(e.actor, e.action, e.reason, e.device_id) for e in entries] == [
        ("sato", "device-added", "new phone", "a"), ("suzuki", "device-revoked", "紛失", "a")]
    assert entries[0].before is None and entries[0].after["status"] == "active"
    assert entries[1].before["status"] == "active" and entries[1].after["status"] == "revoked"
    assert entries[1].after["ipv4"] == str(revoked.ipv4) and entries[0].id < entries[1].id
    assert all(e.at is not None and T0 < e.at <= clock.now for e in entries)
    assert [e.id for e in reg.unshipped_audit(limit=1)] == [entries[0].id]
    reg.mark_audit_shipped([entries[0].id])
    reg.mark_audit_shipped([])
    assert [e.id for e in reg.unshipped_audit()] == [entries[1].id]
    reg.mark_audit_shipped([entries[1].id])
    assert reg.unshipped_audit() == []


# -- PostgreSQL only -------------------------------------------------------------------------

@pytest.fixture
def pg_url(postgres):
    return postgres.create_database(f"pgonly{next(_db_numbers)}")


def test_concurrent_allocations_from_two_connections_never_collide(pg_url):
    from gateway.registry.postgres import PgRegistry

    prefix = ipaddress.ip_network("10.80.0.0/22")
    nodes = [PgRegistry(pg_url, node=f"node-{i}") for i in range(2)]
    got: dict[str, list] = {}
    errors: list = []
    start = threading.Barrier(2)

    def enroll(reg, tag):
        start.wait()
        mine = []
        try:
            for i in range(60):
                v4, v6 = reg.allocate_addresses(prefix, P6)
                mine.append(reg.add(DeviceRecord(f"{tag}-{i}", key(), v4, v6)).ipv4)
        except Exception as exc:       # a collision would surface as a RegistryError here
            errors.append(exc)
        got[tag] = mine

    threads = [threading.Thread(target=enroll, args=(reg, reg.node)) for reg in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    addresses = got["node-0"] + got["node-1"]
    assert errors == [] and len(addresses) == 120 and len(set(addresses)) == 120
    assert len(nodes[0].all()) == 120
    # A lease alone (allocated, never added) also keeps the address from the other node.
    leased = nodes[0].allocate_addresses(prefix, None)[0]
    assert nodes[1].allocate_addresses(prefix, None)[0] != leased


def test_concurrent_writers_never_hide_a_change_from_an_incremental_reader(pg_url):
    """Revisions are handed out in commit order, so following changed_since from the last
    revision seen misses nothing while two nodes write at once."""
    from gateway.registry.postgres import PgRegistry

    setup = PgRegistry(pg_url)
    for i in range(20):
        setup.add(DeviceRecord(f"d{i}", key(), ipaddress.IPv4Address(f"10.81.0.{i + 2}")))
    writers = [PgRegistry(pg_url, node=f"w{i}") for i in range(2)]
    reader = PgRegistry(pg_url)
    seen_rev, seen = reader.revision(), {r.device_id: r for r in reader.all()}
    done = threading.Event()

    def write(reg, offset):
        for n in range(40):
            rec = reg.get(f"d{(n * 2 + offset) % 20}")
            reg.update(replace(rec, os_version=f"{offset}.{n}"))

    threads = [threading.Thread(target=write, args=(w, i)) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    while not done.is_set():
        done_now = all(not t.is_alive() for t in threads)
        seen_rev, changed = reader.changed_since(seen_rev)
        seen.update({r.device_id: r for r in changed})
        if done_now:
            done.set()
    assert seen == {r.device_id: r for r in reader.all()}


def test_audit_entries_are_claimed_by_one_node_each(pg_url):
    from gateway.registry.postgres import PgRegistry

    a, b = PgRegistry(pg_url, node="node-a"), PgRegistry(pg_url, node="node-b")
    for i in range(3):
        a.add(DeviceRecord(f"d{i}", key(), ipaddress.IPv4Address(f"10.82.0.{i + 2}")), audit=AuditEntry("op", "device-added"))
    claimed_a = a.unshipped_audit(limit=2)
    claimed_b = b.unshipped_audit()
    assert len(claimed_a) == 2 and len(claimed_b) == 1
    assert {e.id for e in claimed_a}.isdisjoint({e.id for e in claimed_b})
    b.mark_audit_shipped([e.id for e in claimed_b])
    assert [e.id for e in a.unshipped_audit()] == [e.id for e in claimed_a]


def test_each_change_notifies_listeners_at_commit_and_a_refused_one_does_not(pg_url):
    from gateway.registry.postgres import REGISTRY_CHANNEL, PgRegistry, RegistryWatcher

    reg = PgRegistry(pg_url)
    heard: list[tuple[str, str, float]] = []
    watcher = RegistryWatcher(pg_url, lambda ch, payload: heard.append((ch, payload, time.monotonic()))).start()
    try:
        deadline = time.monotonic() + 5
        while not watcher.up and time.monotonic() < deadline:
            time.sleep(0.02)
        rec = reg.add(DeviceRecord("a", key(), ipaddress.IPv4Address("10.83.0.2")))
        t_change = time.monotonic()
        reg.update(replace(rec, status=DeviceStatus.REVOKED))
        with pytest.raises(RegistryError):
            reg.add(DeviceRecord("b", rec.wg_public_key, ipaddress.IPv4Address("10.83.0.3")))
        deadline = time.monotonic() + 2
        while len(heard) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        watcher.stop()
    assert [(ch, int(p)) for ch, p, _ in heard] == [(REGISTRY_CHANNEL, reg.revision() - 1), (REGISTRY_CHANNEL, reg.revision())]
    assert heard[1][2] - t_change < 1.0


def test_policy_is_stored_with_its_lists_and_recreated_with_the_same_version(pg_url, tmp_path):
    from gateway.policy import load_policy
    from gateway.registry.postgres import PolicyError, PolicyStore, materialize

    src = tmp_path / "src"
    (src / "lists").mkdir(parents=True)
    (src / "lists" / "webmail.txt").write_text("webmail.test\n")
    (src / "policy.yaml").write_text(
        "version: 1\nlists:\n  webmail: {file: lists/webmail.txt}\nrules:\n"
        "  - {id: webmail, action: block, match: {list: webmail}, reason: no webmail}\n")
    store = PolicyStore(pg_url)
    assert store.current() is None
    version = store.publish(src / "policy.yaml", actor="sato", node="node-a")
    assert version == load_policy(src / "policy.yaml").version
    stored = PolicyStore(pg_url).current()
    assert stored.version_id == version and stored.list_files == {"lists/webmail.txt": "webmail.test\n"}
    path = materialize(stored, tmp_path / "node-b")
    assert load_policy(path).version == version and materialize(stored, tmp_path / "node-b") == path
    (src / "outside.txt").write_text("x.test\n")
    (src / "bad.yaml").write_text("version: 1\nlists:\n  x: {file: ../src/outside.txt}\nrules: []\n")
    with pytest.raises(PolicyError, match="cannot be distributed"):
        store.publish(src / "bad.yaml", actor="sato", node="node-a")
    assert PolicyStore(pg_url).current().version_id == version
