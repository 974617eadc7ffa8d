"""The session store contract (`gateway.signin.store.SessionStore`), run against both backends:
the registry's SQLite file (one node) and the shared PostgreSQL registry (`PgSessionStore`,
several nodes; a private server started for the test session, tests/unit/conftest.py). Each
factory call is another process's or node's view of the same store, so "two nodes" is two
store objects on one database. What only PostgreSQL adds (writers on several connections, the
behaviour while the server is unreachable, the CLI on a cluster config) is at the end.

PostgreSQL tests skip when the server or psycopg is missing (CI=true: they fail instead)."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import threading
from datetime import UTC, datetime, timedelta
from itertools import count
from types import SimpleNamespace

import pytest

from gateway.registry.model import DeviceRecord
from gateway.registry.sqlite import SqliteRegistry
from gateway.signin.service import SignInService
from gateway.signin.sessions import UserSession
from gateway.signin.settings import SignInSettings
from gateway.signin.store import SessionStore, open_session_store

T0 = datetime(2026, 5, 11, 9, 0, tzinfo=UTC)
SETTINGS = SignInSettings(issuer="https://login.example.lg.jp/realms/staff", client_id="kanmon", client_secret="s")
_db_numbers = count(1)


class Clock:
    def __init__(self, at=T0):
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **kw) -> None:
        self.at += timedelta(**kw)


def session(device_id="dev-1", user="tanaka", tunnel_ip="10.77.0.2", created=T0, lifetime=timedelta(hours=8),
            tag="", **kw) -> UserSession:
    return UserSession(session_id=f"s-{device_id}-{user}-{created.timestamp()}-{tag}", device_id=device_id,
                       tunnel_ip=tunnel_ip, user=user, subject=f"sub-{user}", issuer=SETTINGS.issuer,
                       created_at=created, expires_at=created + lifetime, **kw)


def device(device_id="dev-1", owner="tanaka", n=2) -> DeviceRecord:
    return DeviceRecord(device_id=device_id, wg_public_key=f"key-{device_id}",
                        ipv4=ipaddress.IPv4Address(f"10.77.0.{n}"), owner=owner)


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request, tmp_path):
    """Factory: a session store on one fresh database; each call is another node's view of it.
    ``stores.audit()`` reads the registry's unshipped audit outbox of that database."""
    opened = []
    if request.param == "sqlite":
        path = tmp_path / "registry.sqlite3"
        SqliteRegistry(path)       # the sessions share the registry's file and audit outbox

        def factory(clock=None):
            store = SessionStore(path, clock=clock or Clock())
            opened.append(store)
            return store

        def registry():
            return SqliteRegistry(path)
    else:
        from gateway.registry.postgres import PgRegistry
        from gateway.signin.store_pg import PgSessionStore

        url = request.getfixturevalue("postgres").create_database(f"sessions{next(_db_numbers)}")

        def factory(clock=None, **kw):
            store = PgSessionStore(url, clock=clock or Clock(), **kw)
            opened.append(store)
            return store

        def registry():
            reg = PgRegistry(url, node="test")
            opened.append(reg)
            return reg
        factory.url = url

    def audit():
        return sorted((e.action, e.actor, e.device_id, e.reason, e.before.get("user") if e.before else None,
                       e.at) for e in registry().unshipped_audit())

    factory.backend = request.param
    factory.audit = audit
    yield factory
    for store in opened:
        store.close()


# -- the contract ----------------------------------------------------------------------------

def test_every_field_round_trips(stores):
    store = stores()
    s = session(user="田中", email="tanaka@example.lg.jp", groups=frozenset({"職員", "staff"}),
                amr=frozenset({"pwd", "otp"}), acr="loa2", mfa=True,
                auth_time=T0 - timedelta(seconds=30, microseconds=7))
    assert store.start(s) == s
    assert stores().get(s.session_id) == s
    assert stores().of_user("田中") == [s]
    bare = store.start(session("dev-2", "suzuki", tunnel_ip="fd77:77::3"))
    assert store.get(bare.session_id) == bare and bare.email is None and bare.groups == frozenset()
    assert store.get("nope") is None and store.of_user("nobody") == []


def test_start_replaces_the_devices_earlier_session(stores):
    clock = Clock()
    store = stores(clock)
    first = store.start(session(user="田中"))
    elsewhere = store.start(session(device_id="dev-2", tunnel_ip="10.77.0.3", user="田中"))
    clock.advance(minutes=10)
    second = store.start(session(user="suzuki", created=clock()))
    assert [s.session_id for s in store.active()] == [elsewhere.session_id, second.session_id]
    old = store.get(first.session_id)
    assert old.ended_at == clock() and old.end_reason == "replaced by a new sign-in"
    assert store.get(elsewhere.session_id).ended_at is None
    assert [s.session_id for s in store.of_user("田中")] == [first.session_id, elsewhere.session_id]
    assert stores.audit() == []                     # a replacement is no operator's sign-out


def test_start_with_a_session_id_already_used_fails_and_changes_nothing(stores):
    store = stores()
    s = store.start(session())
    rev = store.revision()
    # same id, same device: the replacement of the live session must be rolled back with the insert
    with pytest.raises(Exception) as exc:
        store.start(dataclasses.replace(s, user="suzuki", subject="sub-suzuki"))
    assert any(c.__name__ == "IntegrityError" for c in type(exc.value).__mro__)
    assert store.active() == [s] and store.get(s.session_id) == s and store.revision() == rev
    assert stores().active() == [s]


def test_end_by_user_device_and_session_with_audit_rows(stores):
    clock = Clock()
    store = stores(clock)
    a = store.start(session("dev-1", "tanaka"))
    b = store.start(session("dev-2", "tanaka", tunnel_ip="10.77.0.3"))
    c = store.start(session("dev-3", "suzuki", tunnel_ip="10.77.0.4"))
    d = store.start(session("dev-4", "sato", tunnel_ip="10.77.0.5"))
    clock.advance(minutes=1)

    ended = store.end(user="tanaka", reason="lost phone", actor="ops-sato")
    assert [s.session_id for s in ended] == [a.session_id, b.session_id]
    assert all(s.ended_at is None for s in ended)    # returned as they were (live) before the end
    assert store.end(user="tanaka", reason="again", actor="ops-sato") == []
    assert store.get(a.session_id).end_reason == "lost phone" and store.get(a.session_id).ended_at == clock()

    clock.advance(minutes=1)
    assert [s.session_id for s in store.end(device_id="dev-3", reason="device revoked")] == [c.session_id]
    assert [s.session_id for s in store.end(session_id=d.session_id, reason="portal", actor="sato")] == [d.session_id]
    assert store.end(session_id=d.session_id, reason="portal", actor="sato") == []
    assert store.end(user="sato", device_id="dev-1", reason="nothing matches both", actor="x") == []
    assert store.active() == []

    t1, t2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    assert stores.audit() == [   # one row per ended session, only with an actor (an operator or the user)
        ("user.signout", "ops-sato", "dev-1", "lost phone", "tanaka", t1),
        ("user.signout", "ops-sato", "dev-2", "lost phone", "tanaka", t1),
        ("user.signout", "sato", "dev-4", "portal", "sato", t2)]


def test_end_needs_a_selector_and_changes_nothing_without_one(stores):
    store = stores()
    s = store.start(session())
    rev = store.revision()
    with pytest.raises(ValueError):
        store.end(reason="x", actor="ops")
    assert store.revision() == rev and store.active() == [s] and stores.audit() == []


def test_revision_moves_on_every_write_and_not_otherwise(stores):
    store = stores()
    other = stores()
    seen = [store.revision()]
    store.start(session())
    seen.append(store.revision())
    store.active(); store.get("x"); store.of_user("tanaka"); other.active()
    assert store.revision() == seen[-1] and other.revision() == seen[-1]
    store.start(session(user="suzuki", created=T0 + timedelta(minutes=1)))  # replaces: one write
    seen.append(store.revision())
    other.end(user="suzuki", reason="r")
    seen.append(store.revision())
    assert other.end(user="suzuki", reason="r") == [] and other.end(device_id="dev-1", reason="r") == []
    assert store.revision() == seen[-1]            # nothing ended, nothing moved
    other.end(session_id=session().session_id, reason="already ended")
    assert store.revision() == seen[-1]
    assert seen == sorted(set(seen)) and len(seen) == 4


def test_active_excludes_expired_and_ended(stores):
    clock = Clock()
    store = stores(clock)
    short = store.start(session(lifetime=timedelta(minutes=30)))
    long = store.start(session(device_id="dev-2", tunnel_ip="10.77.0.3", lifetime=timedelta(hours=8)))
    gone = store.start(session(device_id="dev-3", tunnel_ip="10.77.0.4", user="suzuki"))
    store.end(user="suzuki", reason="r")
    assert [s.session_id for s in store.active()] == [short.session_id, long.session_id]
    assert [s.session_id for s in store.active(T0 + timedelta(minutes=30))] == [long.session_id]  # expiry is exclusive
    clock.advance(hours=1)
    assert [s.session_id for s in store.active()] == [long.session_id]
    assert store.get(short.session_id).ended_at is None   # expired is not ended: nothing rewrote it
    assert store.get(gone.session_id).ended_at is not None


def test_a_signout_through_one_node_is_seen_by_the_other(stores):
    node_a, node_b = stores(), stores()
    s = node_a.start(session())
    keep = node_a.start(session("dev-2", "suzuki", tunnel_ip="10.77.0.3"))
    rev = node_a.revision()
    assert node_b.revision() == rev and node_b.active() == [s, keep]
    node_b.end(user="tanaka", reason="signed out by an operator", actor="ops")
    assert node_a.revision() > rev and node_a.active() == [keep]
    assert node_a.get(s.session_id).end_reason == "signed out by an operator"
    signed_in_elsewhere = node_b.start(session("dev-3", "sato", tunnel_ip="10.77.0.4"))
    assert node_a.active() == [keep, signed_in_elsewhere]


def test_signin_service_on_node_a_reports_the_device_after_node_b_signs_the_user_out(stores):
    clock = Clock()
    node_a, node_b = stores(clock), stores(clock)
    changed: list[set[str]] = []
    records: list[dict] = []
    sink = SimpleNamespace(append=lambda stream, rec: records.append(rec))
    service = SignInService(SETTINGS, node_a, sink, rp=object(), on_sessions_changed=changed.append, clock=clock)
    dev, dev2, other = device(), device("dev-2", n=3), device("dev-3", owner="suzuki", n=4)
    node_b.start(session("dev-1", "tanaka"))                       # signed in on node B
    node_b.start(session("dev-2", "tanaka", tunnel_ip="10.77.0.3"))
    kept = node_a.start(session("dev-3", "suzuki", tunnel_ip="10.77.0.4"))
    assert service.refresh() == set()
    assert service.session_for(dev).user == "tanaka" and service.session_for(other) == kept
    changed.clear()

    node_b.end(user="tanaka", reason="signed out by an operator", actor="ops")
    assert service.refresh() == {"dev-1", "dev-2"}
    assert service.session_for(dev) is None and service.session_for(dev2) is None
    assert service.session_for(other) == kept
    assert changed == [{"dev-1", "dev-2"}]
    ended = sorted((r["device.id"], r["user.name"], r["event.reason"]) for r in records
                   if r["event.action"] == "user-session-ended")
    assert ended == [("dev-1", "tanaka", "signed out by an operator"), ("dev-2", "tanaka", "signed out by an operator")]
    assert service.refresh() == set() and changed == [{"dev-1", "dev-2"}]   # nothing new: nothing reported


def test_a_workers_copy_follows_the_store_quietly(stores):
    # issue #22: the gateway process wrote the auth records of ended sessions; an inspection
    # worker's copy only reloads, reports the devices whose session it lost, and logs nothing
    clock = Clock()
    gateway, worker_store = stores(clock), stores(clock)
    changed: list[set[str]] = []
    records: list[dict] = []
    sink = SimpleNamespace(append=lambda stream, rec: records.append(rec))
    worker = SignInService(SETTINGS, worker_store, sink, rp=object(), on_sessions_changed=changed.append, clock=clock)
    dev, other = device(), device("dev-3", owner="suzuki", n=4)
    gateway.start(session("dev-1", "tanaka"))
    kept = gateway.start(session("dev-3", "suzuki", tunnel_ip="10.77.0.4"))
    assert worker.follow_store() == set() and changed == [{"dev-1", "dev-3"}]
    assert worker.session_for(dev).user == "tanaka" and worker.session_for(other) == kept
    gateway.end(user="tanaka", reason="signed out by an operator", actor="ops")
    assert worker.follow_store() == {"dev-1"}
    assert worker.session_for(dev) is None and worker.session_for(other) == kept
    assert changed[-1] == {"dev-1"}
    clock.advance(hours=9)   # past the lifetime: expired sessions leave the copy too
    assert worker.follow_store() == {"dev-3"} and worker.session_for(other) is None
    assert records == [], "the worker writes no auth record of its own for ends it follows"


# -- choosing the store ----------------------------------------------------------------------

def test_open_session_store_uses_the_registry_file_without_a_registry_url(tmp_path, monkeypatch):
    monkeypatch.delenv("KANMON_REGISTRY_URL", raising=False)
    path = tmp_path / "registry.sqlite3"
    SqliteRegistry(path)
    store = open_session_store(SimpleNamespace(registry_url=None, registry_path=path, state_dir=tmp_path))
    try:
        assert isinstance(store, SessionStore) and store.path == path
        store.start(session())
    finally:
        store.close()
    assert [s.user for s in SessionStore(path).active(T0)] == ["tanaka"]
    assert not (tmp_path / "sessions.sqlite").exists()


def test_open_session_store_uses_postgresql_with_a_registry_url(postgres, tmp_path, monkeypatch):
    from gateway.signin.store_pg import PgSessionStore

    monkeypatch.delenv("KANMON_REGISTRY_URL", raising=False)
    url = postgres.create_database(f"sessions{next(_db_numbers)}")
    cfg = SimpleNamespace(registry_url=url, registry_path=tmp_path / "registry.sqlite3", state_dir=tmp_path)
    a, b = open_session_store(cfg), open_session_store(cfg)
    try:
        assert isinstance(a, PgSessionStore)
        s = a.start(session(created=datetime.now(UTC)))
        assert b.active() == [s]
    finally:
        a.close()
        b.close()
    assert not cfg.registry_path.exists() and not (tmp_path / "sessions.sqlite").exists()


# -- PostgreSQL only -------------------------------------------------------------------------

@pytest.fixture
def pg(postgres):
    from gateway.signin.store_pg import PgSessionStore

    url = postgres.create_database(f"sessions{next(_db_numbers)}")
    opened = []

    def factory(**kw):
        store = PgSessionStore(url, **{"clock": Clock(), **kw})
        opened.append(store)
        return store
    factory.url = url
    yield factory
    for store in opened:
        store.close()


def test_schema_migrates_once_with_several_nodes_starting_together(pg):
    from gateway.registry.postgres import connect

    nodes = [None] * 4
    errors = []

    def open_one(i):
        try:
            nodes[i] = pg()
        except Exception as exc:   # noqa: BLE001 -- reported below
            errors.append(exc)
    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and {n.schema_version for n in nodes} == {1}
    with connect(pg.url) as conn:
        assert conn.execute("SELECT count(*) AS n FROM kanmon_schema_sessions").fetchone()["n"] == 1
        assert conn.execute("SELECT value FROM user_sessions_revision").fetchone()["value"] == 0


def test_writers_on_several_nodes_serialize_and_every_write_gets_its_own_revision(pg):
    nodes = [pg() for _ in range(3)]
    errors = []

    def work(i, store):
        try:
            for k in range(15):
                s = store.start(session(f"dev-{k % 5}", f"user{i}", created=T0 + timedelta(seconds=k), tag=str(i)))
                if k % 3 == 0:
                    store.end(device_id=s.device_id, reason="r")
                    store.end(user=f"user{(i + 1) % 3}", reason="r")
        except Exception as exc:   # noqa: BLE001 -- a deadlock or serialization failure shows here
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(nodes)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    from gateway.registry.postgres import connect
    with connect(pg.url) as conn:
        revs = [r["rev"] for r in conn.execute("SELECT DISTINCT rev FROM user_sessions").fetchall()]
        live_per_device = conn.execute("SELECT device_id, count(*) AS n FROM user_sessions WHERE ended_at IS NULL"
                                       " GROUP BY device_id HAVING count(*) > 1").fetchall()
    assert live_per_device == []                     # still one live session per device
    assert max(revs) == nodes[0].revision() and nodes[1].revision() == nodes[0].revision()
    assert 45 <= nodes[0].revision() <= 45 + 2 * 15  # 45 starts + the ends that found something


def unreachable(store) -> None:
    """The server goes away under this store (a port nobody listens on, connection dropped)."""
    store._db.url = "postgresql://kanmon@127.0.0.1:9/none"
    store._db.close()


def back(store, url) -> None:
    store._db.url = url
    store._db.close()


def test_while_unreachable_a_node_keeps_its_last_sessions_and_writes_its_ends_later(pg):
    from gateway.registry.postgres import RegistryUnavailable

    clock, mono = Clock(), [100.0]
    node = pg(clock=clock, monotonic=lambda: mono[0])
    other = pg(clock=clock)
    a = node.start(session("dev-1", "tanaka", lifetime=timedelta(minutes=30)))
    b = node.start(session("dev-2", "tanaka", tunnel_ip="10.77.0.3"))
    c = node.start(session("dev-3", "suzuki", tunnel_ip="10.77.0.4"))
    rev = node.revision()
    assert node.active() == [a, b, c]

    unreachable(node)
    assert node.revision() == rev                       # the last known state, not an error every tick
    assert node.active() == [a, b, c] and node.get(a.session_id) == a
    with pytest.raises(RegistryUnavailable):
        node.of_user("tanaka")
    with pytest.raises(RegistryUnavailable):             # an operator's sign-out needs its audit row
        node.end(user="suzuki", reason="operator", actor="ops")
    with pytest.raises(RegistryUnavailable):             # no sign-in while the registry is away
        node.start(session("dev-4", "sato", tunnel_ip="10.77.0.5"))
    clock.advance(minutes=31)
    assert node.active() == [b, c]                       # expiry still applies on time
    ended = node.end(device_id="dev-2", reason="device no longer admitted")  # the gateway's own end
    assert ended == [b] and node.active() == [c]
    assert other.get(b.session_id).ended_at is None      # not yet on the server

    back(node, pg.url)
    mono[0] += 1.0
    assert node.revision() == rev                        # not retried before RETRY_SECONDS
    assert other.get(b.session_id).ended_at is None
    mono[0] += 5.0
    assert node.revision() > rev                          # asked again: the queued end is written first
    stored = other.get(b.session_id)
    assert stored.end_reason == "device no longer admitted" and stored.ended_at == clock()
    assert [s.session_id for s in other.active()] == [c.session_id]


def test_a_store_that_never_read_raises_instead_of_answering_from_nothing(pg):
    from gateway.registry.postgres import RegistryUnavailable

    cli = pg()
    unreachable(cli)
    for call in (cli.revision, cli.active, lambda: cli.get("x"), lambda: cli.end(user="u", reason="r")):
        with pytest.raises(RegistryUnavailable) as exc:
            call()
        assert "PostgreSQL" in exc.value.text.render()


def test_cli_signout_on_a_cluster_config_ends_the_sessions_every_node_sees(pg, tmp_path, monkeypatch, capsys):
    from gateway.cli import user as commands

    monkeypatch.delenv("KANMON_REGISTRY_URL", raising=False)
    monkeypatch.setenv("KANMON_LANG", "both")
    monkeypatch.setenv("SUDO_USER", "ops-sato")
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())

    def config(url: str):
        state = tmp_path / "state"
        state.mkdir(exist_ok=True)
        path = tmp_path / "kanmon.yaml"
        path.write_text(f"""
state_dir: {state}
registry: {{url: "{url}"}}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, ipv6_prefix: "fd77:77::/64"}}
uplink: {{interface: eth0}}
""")
        return str(path)

    now = datetime.now(UTC)
    node = pg(clock=lambda: datetime.now(UTC))
    node.start(session("dev-1", "田中", created=now))
    keep = node.start(session("dev-2", "suzuki", tunnel_ip="10.77.0.3", created=now))
    cfg = config(pg.url)
    args = parser.parse_args(["user", "signout", "田中", "--reason", "lost phone", "--config", cfg])
    assert args.func(args) == 0
    assert "signed out: 田中 (device dev-1)" in capsys.readouterr().out
    assert node.active() == [keep] and node.of_user("田中")[0].end_reason == "lost phone"
    assert not (tmp_path / "state" / "sessions.sqlite").exists()

    args = parser.parse_args(["user", "sessions", "--json", "--config", cfg])
    assert args.func(args) == 0
    assert '"user": "suzuki"' in capsys.readouterr().out

    dead = config("postgresql://kanmon@127.0.0.1:9/none")
    for argv in (["user", "signout", "suzuki"], ["user", "sessions"]):
        args = parser.parse_args([*argv, "--config", dead])
        assert args.func(args) == 1
        err = capsys.readouterr().err
        assert "PostgreSQL" in err and "nothing was changed" in err and "変更は行っていません" in err
    assert node.active() == [keep]
