"""PostgreSQL device registry: several gateway nodes share one registry (issue #8).

Same interface and semantics as `gateway.registry.SqliteRegistry` (`DeviceRegistry`):
a registry revision bumped by every device change, each row stamped with the revision of its
last change (`row_rev`, so `changed_since` reads only what changed), an audit outbox written in
the same transaction as the change, and address allocation without a scan.

What PostgreSQL adds for a cluster:
- every device change runs `pg_notify('kanmon_registry', revision)` in its own transaction (a
  trigger, so a change made with psql by hand notifies too); `RegistryWatcher` LISTENs and calls
  back, so every node reconciles within milliseconds (NOTIFY is delivered at commit);
- the revision counter is one row updated by each writer: writers serialize on it, so the
  commit order is the revision order and `changed_since` never skips a concurrent change;
- `allocate_addresses` takes an address *lease* under an advisory lock: two nodes allocating at
  the same moment get different addresses (SQLite's allocate-then-add could hand both the same);
- audit entries are claimed by one node (`claimed_by`), so each lands in exactly one node's
  tamper-evident audit stream and each alert is sent once;
- the policy in force (`PolicyStore`) and the nodes' health (`nodes`) live here too.

An unreachable server raises `RegistryUnavailable` (a `RegistryError`) with a bilingual text;
the gateway keeps its last applied state (see gateway/registry/outbox.py for the outage rules).
Driver: psycopg 3 (`psycopg[binary]==3.3.9`).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from gateway.i18n import Text
from gateway.registry.model import (T_CONFLICT, T_NO_SUCH_DEVICE, T_PREFIX_FULL, AuditEntry, DeviceRecord, DeviceStatus, Ownership, RegistryDamaged, RegistryError, IPv4, IPv6, record_as_dict)

log = logging.getLogger("kanmon.registry_pg")

REGISTRY_CHANNEL = "kanmon_registry"
POLICY_CHANNEL = "kanmon_policy"
LEASE_SECONDS = 600            # an allocated address not used by an `add` within this is free again
AUDIT_CLAIM_SECONDS = 60       # a node that claimed audit entries and died releases them after this
_MIGRATION_LOCK = 0x6B616E01   # advisory lock ids (arbitrary, fixed): migrations, allocation
_ALLOCATION_LOCK = 0x6B616E02


class RegistryUnavailable(RegistryError):
    """The PostgreSQL server cannot be reached: nothing was changed."""

    def __init__(self, detail: str):
        self.detail = detail
        self.text = Text(
            "端末登録データベース (PostgreSQL) に接続できません。変更は行っていません。"
            "各ノードは最後に受け取った状態で制御を続けています: {d}",
            "The device registry (PostgreSQL) is unreachable; nothing was changed. "
            "Every node keeps enforcing the last state it received: {d}").format(d=detail)
        super().__init__(self.text.render())


# -- schema ----------------------------------------------------------------------------------
# Versioned migrations: entry N is applied once, in one transaction, and recorded in
# kanmon_schema. Never edit a released entry; append a new one.
MIGRATIONS: list[str] = [
    # 1: devices, revision counter, audit outbox, address leases, notify triggers
    """
    CREATE TABLE meta (key text PRIMARY KEY, value bigint NOT NULL);
    INSERT INTO meta VALUES ('revision', 0);
    CREATE TABLE devices (
        device_id text PRIMARY KEY,
        wg_public_key text UNIQUE,
        ipv4 text NOT NULL UNIQUE,
        ipv4_int bigint NOT NULL UNIQUE,
        ipv6 text UNIQUE,
        owner text NOT NULL DEFAULT '',
        department text NOT NULL DEFAULT '',
        groups text[] NOT NULL DEFAULT '{}',
        ownership text NOT NULL DEFAULT 'org' CHECK (ownership IN ('org', 'byod')),
        platform text,
        os_version text,
        jailbroken boolean NOT NULL DEFAULT false,
        cert_serial text,
        cert_fingerprint text,
        valid_from timestamptz,
        valid_until timestamptz,
        status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'quarantined', 'revoked')),
        status_reason text NOT NULL DEFAULT '',
        suspended_until timestamptz,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        row_rev bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX devices_row_rev ON devices (row_rev);
    CREATE TABLE audit (
        id bigserial PRIMARY KEY,
        at timestamptz NOT NULL,
        actor text NOT NULL,
        action text NOT NULL,
        device_id text,
        reason text NOT NULL DEFAULT '',
        before_json jsonb,
        after_json jsonb,
        shipped boolean NOT NULL DEFAULT false,
        claimed_by text,
        claimed_at timestamptz,
        shipped_by text
    );
    CREATE INDEX audit_unshipped ON audit (id) WHERE NOT shipped;
    CREATE TABLE address_leases (ipv4_int bigint PRIMARY KEY, expires_at timestamptz NOT NULL);
    CREATE FUNCTION kanmon_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE rev bigint;
    BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value INTO rev;
        PERFORM pg_notify('kanmon_registry', rev::text);
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        NEW.row_rev := rev;
        RETURN NEW;
    END $$;
    CREATE TRIGGER devices_rev BEFORE INSERT OR UPDATE ON devices
        FOR EACH ROW EXECUTE FUNCTION kanmon_bump_revision();
    CREATE TRIGGER devices_rev_del AFTER DELETE ON devices
        FOR EACH ROW EXECUTE FUNCTION kanmon_bump_revision();
    """,
    # 2: the policy in force (distributed to every node) and the nodes' health reports
    """
    CREATE TABLE policies (
        version_id text PRIMARY KEY,
        filename text NOT NULL,
        policy_text text NOT NULL,
        list_files jsonb NOT NULL,
        published_at timestamptz NOT NULL,
        published_by text NOT NULL,
        published_on text NOT NULL
    );
    CREATE TABLE policy_current (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version_id text NOT NULL REFERENCES policies (version_id),
        revision bigint NOT NULL,
        applied_at timestamptz NOT NULL
    );
    CREATE FUNCTION kanmon_policy_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('kanmon_policy', NEW.version_id);
        RETURN NEW;
    END $$;
    CREATE TRIGGER policy_current_notify AFTER INSERT OR UPDATE ON policy_current
        FOR EACH ROW EXECUTE FUNCTION kanmon_policy_notify();
    CREATE TABLE nodes (
        name text PRIMARY KEY,
        version text NOT NULL,
        policy_version text,
        peers integer NOT NULL DEFAULT 0,
        registry_revision bigint,
        last_reconcile_at timestamptz,
        started_at timestamptz NOT NULL,
        reported_at timestamptz NOT NULL,
        details jsonb NOT NULL DEFAULT '{}'
    );
    """,
]

_COLUMNS = (
    "device_id", "wg_public_key", "ipv4", "ipv4_int", "ipv6", "owner", "department", "groups", "ownership",
    "platform", "os_version", "jailbroken", "cert_serial", "cert_fingerprint", "valid_from",
    "valid_until", "status", "status_reason", "suspended_until", "created_at", "updated_at",
)
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM devices"


def _record_to_row(rec: DeviceRecord) -> tuple:
    return (
        rec.device_id, rec.wg_public_key, str(rec.ipv4), int(rec.ipv4), str(rec.ipv6) if rec.ipv6 else None,
        rec.owner, rec.department, sorted(rec.groups), str(rec.ownership), rec.platform, rec.os_version,
        rec.jailbroken, rec.cert_serial, rec.cert_fingerprint, rec.valid_from, rec.valid_until, str(rec.status),
        rec.status_reason, rec.suspended_until, rec.created_at, rec.updated_at,
    )


def _row_to_record(row: dict) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"], wg_public_key=row["wg_public_key"],
        ipv4=ipaddress.IPv4Address(row["ipv4"]), ipv6=ipaddress.IPv6Address(row["ipv6"]) if row["ipv6"] else None,
        owner=row["owner"], department=row["department"], groups=frozenset(row["groups"]),
        ownership=Ownership(row["ownership"]), platform=row["platform"], os_version=row["os_version"],
        jailbroken=row["jailbroken"], cert_serial=row["cert_serial"], cert_fingerprint=row["cert_fingerprint"],
        valid_from=row["valid_from"], valid_until=row["valid_until"], status=DeviceStatus(row["status"]),
        status_reason=row["status_reason"], suspended_until=row["suspended_until"],
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


# A server that vanishes without closing the connection (cable, firewall) is noticed within a few
# seconds instead of the kernel's default of minutes: libpq keepalives and TCP_USER_TIMEOUT.
_TCP_LIVENESS = {"keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1, "keepalives_count": 2,
                 "tcp_user_timeout": 3000}


def connect(url: str, *, connect_timeout: float = 3, **kw) -> psycopg.Connection:
    """An autocommit connection in UTC; transactions are explicit (`with conn.transaction()`)."""
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout)),
                               options="-c TimeZone=UTC", row_factory=dict_row, **_TCP_LIVENESS, **kw)
    except psycopg.OperationalError as exc:
        raise RegistryUnavailable(_short(exc)) from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def migrate(conn: psycopg.Connection) -> int:
    """Apply pending migrations (several nodes starting at once: one does it, the others wait
    on the advisory lock and find nothing left). Returns the schema version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS kanmon_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)")
        current = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM kanmon_schema").fetchone()["v"]
        if current > len(MIGRATIONS):
            # Written by a newer Kanmon: its tables may mean something this version does not know.
            raise RegistryDamaged("future-schema", Text(
                f"端末レジストリ (PostgreSQL) のスキーマ版は {current} で、この Kanmon が扱えるのは {len(MIGRATIONS)} までです"
                "(新しい版の Kanmon が移行済み)。Kanmon を更新してください。何も変更していません。",
                f"the device registry (PostgreSQL) has schema version {current}; this Kanmon knows up to "
                f"{len(MIGRATIONS)} (a newer Kanmon migrated it). Upgrade Kanmon; nothing was changed."))
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            conn.execute(script)
            conn.execute("INSERT INTO kanmon_schema VALUES (%s, now())", (number,))
            log.info("registry schema migrated to version %d", number)
    return len(MIGRATIONS) if current < len(MIGRATIONS) else current


class _Connected:
    """One connection guarded by a lock, reconnected on demand; every server or network
    failure becomes RegistryUnavailable (never a traceback in an operator's terminal).

    A connection idle for a while may have died with a server restart: it is checked with a
    round trip before use, so a write never half-starts on it. Reads are retried once on a
    fresh connection (they change nothing)."""

    IDLE_CHECK_SECONDS = 2.0

    def __init__(self, url: str, connect_timeout: float):
        self.url = url
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._conn: psycopg.Connection | None = None
        self._used = 0.0

    def _connection(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed and time.monotonic() - self._used > self.IDLE_CHECK_SECONDS:
            try:
                self._conn.execute("SELECT 1")
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self._drop()
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, connect_timeout=self.connect_timeout)
        return self._conn

    def run(self, fn: Callable[[psycopg.Connection], object], *, read: bool = False):
        with self._lock:
            for attempt in (1, 2):
                try:
                    result = fn(self._connection())
                    self._used = time.monotonic()
                    return result
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    self._drop()
                    if read and attempt == 1:
                        continue
                    raise RegistryUnavailable(_short(exc)) from None

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class PgRegistry:
    """The shared registry. Thread-safe (one connection, one lock); one instance per process.
    `node` names this process in the audit claim (which node shipped which entry)."""

    def __init__(self, url: str, *, node: str = "cli", clock=lambda: datetime.now(UTC), connect_timeout: float = 3,
                 lease_seconds: int = LEASE_SECONDS):
        self.url = url
        self.node = node
        self._clock = clock
        self._lease_seconds = lease_seconds
        self._db = _Connected(url, connect_timeout)
        try:
            self.schema_version = self._db.run(migrate)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def revision(self) -> int:
        return self._db.run(lambda c: c.execute("SELECT value FROM meta WHERE key='revision'").fetchone()["value"], read=True)

    def _write(self, sql: str, params: tuple, audit: AuditEntry | None, device_id: str,
               before: DeviceRecord | None, after: DeviceRecord | None, *, release_lease: int | None = None) -> int:
        """One change, its audit entry and its NOTIFY (trigger) in one transaction."""
        def tx(conn: psycopg.Connection) -> int:
            try:
                with conn.transaction():
                    rowcount = conn.execute(sql, params).rowcount
                    if rowcount == 1 and release_lease is not None:
                        conn.execute("DELETE FROM address_leases WHERE ipv4_int=%s", (release_lease,))
                    if audit is not None and rowcount == 1:
                        conn.execute(
                            "INSERT INTO audit (at, actor, action, device_id, reason, before_json, after_json)"
                            " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                            (self._clock(), audit.actor, audit.action, device_id, audit.reason,
                             Jsonb(record_as_dict(before)) if before else None,
                             Jsonb(record_as_dict(after)) if after else None))
                    return rowcount
            except psycopg.errors.IntegrityError as exc:
                raise RegistryError(T_CONFLICT.format(d=repr(device_id), e=_short(exc).splitlines()[0])) from None
        return self._db.run(tx)

    def add(self, record: DeviceRecord, audit: AuditEntry | None = None) -> DeviceRecord:
        now = self._clock()
        record = replace(record, created_at=record.created_at or now, updated_at=now)
        placeholders = ",".join(["%s"] * len(_COLUMNS))
        self._write(f"INSERT INTO devices ({','.join(_COLUMNS)}) VALUES ({placeholders})", _record_to_row(record),
                    audit, record.device_id, None, record, release_lease=int(record.ipv4))
        return record

    def update(self, record: DeviceRecord, audit: AuditEntry | None = None) -> DeviceRecord:
        before = self.get(record.device_id)
        if before is None:
            raise RegistryError(T_NO_SUCH_DEVICE.format(d=repr(record.device_id)))
        record = replace(record, updated_at=self._clock())
        assignments = ",".join(f"{c}=%s" for c in _COLUMNS[1:])
        rows = self._write(f"UPDATE devices SET {assignments} WHERE device_id=%s",
                           _record_to_row(record)[1:] + (record.device_id,), audit, record.device_id, before, record)
        if rows != 1:
            raise RegistryError(T_NO_SUCH_DEVICE.format(d=repr(record.device_id)))
        return record

    def get(self, device_id: str) -> DeviceRecord | None:
        row = self._db.run(lambda c: c.execute(_SELECT + " WHERE device_id=%s", (device_id,)).fetchone(), read=True)
        return _row_to_record(row) if row else None

    def by_public_key(self, key: str) -> DeviceRecord | None:
        row = self._db.run(lambda c: c.execute(_SELECT + " WHERE wg_public_key=%s", (key,)).fetchone(), read=True)
        return _row_to_record(row) if row else None

    def all(self) -> list[DeviceRecord]:
        rows = self._db.run(lambda c: c.execute(_SELECT + " ORDER BY device_id").fetchall(), read=True)
        return [_row_to_record(r) for r in rows]

    def snapshot(self) -> tuple[int, list[DeviceRecord]]:
        """(revision, every record) read in one snapshot (a full reconcile pass)."""
        return self.changed_since(-1)

    def changed_since(self, revision: int) -> tuple[int, list[DeviceRecord]]:
        """(current revision, records changed after `revision`), read in one snapshot."""
        def tx(conn: psycopg.Connection):
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                current = conn.execute("SELECT value FROM meta WHERE key='revision'").fetchone()["value"]
                rows = conn.execute(_SELECT + " WHERE row_rev > %s ORDER BY device_id", (revision,)).fetchall()
            return current, rows
        current, rows = self._db.run(tx, read=True)
        return current, [_row_to_record(r) for r in rows]

    def unshipped_audit(self, limit: int = 500) -> list[AuditEntry]:
        """Entries not yet in any node's audit stream, claimed for this node (another node
        skips them; a claim older than AUDIT_CLAIM_SECONDS is taken over)."""
        def tx(conn: psycopg.Connection):
            with conn.transaction():
                return conn.execute(
                    "UPDATE audit SET claimed_by=%s, claimed_at=now() WHERE id IN ("
                    " SELECT id FROM audit WHERE NOT shipped AND (claimed_by IS NULL OR claimed_by=%s"
                    "  OR claimed_at < now() - make_interval(secs => %s))"
                    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING *",
                    (self.node, self.node, AUDIT_CLAIM_SECONDS, limit)).fetchall()
        rows = sorted(self._db.run(tx), key=lambda r: r["id"])
        return [AuditEntry(actor=r["actor"], action=r["action"], reason=r["reason"], id=r["id"], at=r["at"],
                           device_id=r["device_id"], before=r["before_json"], after=r["after_json"]) for r in rows]

    def append_audit(self, entry: AuditEntry) -> None:
        """An audit entry that is no device change (issue #21: console sign-ins, refusals)."""
        self._db.run(lambda c: c.execute(
            "INSERT INTO audit (at, actor, action, device_id, reason) VALUES (%s,%s,%s,%s,%s)",
            (self._clock(), entry.actor, entry.action, entry.device_id, entry.reason)))

    def audit_of(self, device_id: str, limit: int = 100) -> list[AuditEntry]:
        """A device's audit entries, newest first."""
        rows = self._db.run(lambda c: c.execute("SELECT * FROM audit WHERE device_id=%s ORDER BY id DESC LIMIT %s",
                                                (device_id, limit)).fetchall(), read=True)
        return [AuditEntry(actor=r["actor"], action=r["action"], reason=r["reason"], id=r["id"], at=r["at"],
                           device_id=r["device_id"]) for r in rows]

    def mark_audit_shipped(self, ids: list[int]) -> None:
        if not ids:
            return
        self._db.run(lambda c: c.execute("UPDATE audit SET shipped=true, shipped_by=%s WHERE id = ANY(%s)",
                                         (self.node, list(ids))))

    def allocate_addresses(
        self, prefix4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network | None
    ) -> tuple[IPv4, IPv6 | None]:
        """Lowest free host address above the gateway's, leased to the caller for
        LEASE_SECONDS (the following `add` consumes the lease). Allocations from every node
        serialize on an advisory lock, so two nodes never get the same address. Index reads
        only: next after the highest in use, else the first gap."""
        first = int(prefix4.network_address) + 2
        last = int(prefix4.broadcast_address) - 1
        used = ("(SELECT ipv4_int AS v FROM devices WHERE ipv4_int BETWEEN %(lo)s AND %(hi)s UNION ALL"
                " SELECT ipv4_int FROM address_leases WHERE expires_at > now() AND ipv4_int BETWEEN %(lo)s AND %(hi)s)")

        def tx(conn: psycopg.Connection) -> int | None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ALLOCATION_LOCK,))
                conn.execute("DELETE FROM address_leases WHERE expires_at <= now()")
                top = conn.execute(f"SELECT MAX(v) AS v FROM {used} u", {"lo": first, "hi": last}).fetchone()["v"]
                if top is None:
                    candidate = first
                elif top < last:
                    candidate = top + 1
                else:
                    in_use_first = conn.execute(f"SELECT 1 FROM {used} u WHERE v=%(first)s",
                                                {"lo": first, "hi": last, "first": first}).fetchone()
                    gap = conn.execute(
                        f"WITH used AS {used} SELECT u.v + 1 AS v FROM used u WHERE u.v < %(hi)s AND NOT EXISTS"
                        " (SELECT 1 FROM used w WHERE w.v = u.v + 1) ORDER BY 1 LIMIT 1",
                        {"lo": first, "hi": last}).fetchone()
                    candidate = first if in_use_first is None else (gap["v"] if gap else None)
                if candidate is None or candidate > last:
                    return None
                conn.execute("INSERT INTO address_leases VALUES (%s, now() + make_interval(secs => %s))",
                             (candidate, self._lease_seconds))
                return candidate
        candidate = self._db.run(tx)
        if candidate is None:
            raise RegistryError(T_PREFIX_FULL.format(p=prefix4))
        host_number = candidate - int(prefix4.network_address)
        return ipaddress.IPv4Address(candidate), (prefix6[host_number] if prefix6 is not None else None)

    # -- nodes -------------------------------------------------------------------------------
    def report_node(self, report: "NodeReport") -> None:
        self._db.run(lambda c: c.execute(
            "INSERT INTO nodes (name, version, policy_version, peers, registry_revision, last_reconcile_at,"
            " started_at, reported_at, details) VALUES (%s,%s,%s,%s,%s,%s,%s,now(),%s)"
            " ON CONFLICT (name) DO UPDATE SET version=EXCLUDED.version, policy_version=EXCLUDED.policy_version,"
            " peers=EXCLUDED.peers, registry_revision=EXCLUDED.registry_revision,"
            " last_reconcile_at=EXCLUDED.last_reconcile_at, started_at=EXCLUDED.started_at,"
            " reported_at=now(), details=EXCLUDED.details",
            (report.name, report.version, report.policy_version, report.peers, report.registry_revision,
             report.last_reconcile_at, report.started_at, Jsonb(report.details))))

    def nodes(self) -> list["NodeReport"]:
        rows = self._db.run(lambda c: c.execute(
            "SELECT *, extract(epoch FROM now() - reported_at) AS age FROM nodes ORDER BY name").fetchall(), read=True)
        return [NodeReport(r["name"], r["version"], r["policy_version"], r["peers"], r["registry_revision"],
                           r["last_reconcile_at"], r["started_at"], dict(r["details"]), reported_at=r["reported_at"],
                           age_seconds=float(r["age"])) for r in rows]


@dataclass(frozen=True)
class NodeReport:
    """What one gateway node says about itself (the `nodes` table, `kanmon cluster status`)."""

    name: str
    version: str
    policy_version: str | None
    peers: int
    registry_revision: int | None
    last_reconcile_at: datetime | None
    started_at: datetime
    details: dict
    reported_at: datetime | None = None
    age_seconds: float | None = None


# -- policy distribution -----------------------------------------------------------------------

@dataclass(frozen=True)
class StoredPolicy:
    version_id: str
    filename: str
    policy_text: str
    list_files: dict[str, str]   # path relative to the policy file -> text
    revision: int


class PolicyError(Exception):
    def __init__(self, text: Text):
        self.text = text
        super().__init__(text.render())


def policy_bundle(policy_path: Path) -> tuple[str, str, dict[str, str]]:
    """(version id, policy text, {relative list path: text}) of a policy that compiles
    (SourceErrors otherwise). List files must sit under the policy's directory, so the same
    relative layout can be recreated on every node."""
    from gateway.policy import load_policy
    from gateway.policy.compiler import parse_policy

    snapshot = load_policy(policy_path)
    text = policy_path.read_text(encoding="utf-8")
    _, sources = parse_policy(text, str(policy_path))
    lists: dict[str, str] = {}
    for src in sources:
        if src.feed is not None:
            continue  # a category feed: every node fetches it itself into its own state dir
        rel = PurePosixPath(src.file)
        if rel.is_absolute() or ".." in rel.parts:
            raise PolicyError(Text(
                "リスト {n} のファイル {f} はポリシーと同じディレクトリの下にありません。クラスタに配布できません。",
                "list {n}: file {f} is not under the policy's directory, so it cannot be distributed to the cluster")
                .format(n=src.name, f=src.file))
        lists[str(rel)] = (policy_path.parent / rel).read_text(encoding="utf-8")
    return snapshot.version, text, lists


class PolicyStore:
    """The policy in force for the whole cluster: stored once (text + list files, keyed by the
    content version id), made current with a NOTIFY on `kanmon_policy`."""

    def __init__(self, url: str, connect_timeout: float = 3):
        self._db = _Connected(url, connect_timeout)
        self._db.run(migrate)

    def close(self) -> None:
        self._db.close()

    def publish(self, policy_path: Path, *, actor: str, node: str) -> str:
        version, text, lists = policy_bundle(Path(policy_path))

        def tx(conn: psycopg.Connection) -> None:
            with conn.transaction():
                conn.execute("INSERT INTO policies VALUES (%s,%s,%s,%s,now(),%s,%s) ON CONFLICT DO NOTHING",
                             (version, Path(policy_path).name, text, Jsonb(lists), actor, node))
                conn.execute(
                    "INSERT INTO policy_current VALUES (true, %s, 1, now()) ON CONFLICT (singleton) DO UPDATE"
                    " SET version_id=EXCLUDED.version_id, revision=policy_current.revision + 1, applied_at=now()",
                    (version,))
        self._db.run(tx)
        return version

    def current(self) -> StoredPolicy | None:
        row = self._db.run(lambda c: c.execute(
            "SELECT p.*, c.revision FROM policy_current c JOIN policies p USING (version_id)").fetchone(), read=True)
        if row is None:
            return None
        return StoredPolicy(row["version_id"], row["filename"], row["policy_text"], dict(row["list_files"]),
                            row["revision"])


def materialize(policy: StoredPolicy, root: Path) -> Path:
    """Write a stored policy under root/<version>/ (policy file + list files, same relative
    layout) and return the policy file's path. Written to a temporary directory and renamed,
    so a half-written policy is never visible; an existing version directory is reused."""
    target = root / policy.version_id
    policy_file = target / Path(policy.filename).name
    if policy_file.exists():
        return policy_file
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = root / f".{policy.version_id}.{time.monotonic_ns()}"
    tmp.mkdir(mode=0o700)
    (tmp / Path(policy.filename).name).write_text(policy.policy_text, encoding="utf-8")
    for rel, text in policy.list_files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    try:
        tmp.rename(target)
    except OSError:
        # another process materialized the same version first: same content, keep theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return policy_file


# -- change propagation --------------------------------------------------------------------

class RegistryWatcher:
    """LISTENs on the registry and policy channels in a daemon thread and calls
    `on_change(channel, payload)` for each notification (from that thread: the callback must be
    thread-safe, e.g. `loop.call_soon_threadsafe(event.set)`).

    `on_state(up: bool, detail: str)` is called when the connection is lost or comes back; after
    a reconnect `on_change(REGISTRY_CHANNEL, "reconnected")` and `on_change(POLICY_CHANNEL,
    "reconnected")` are called too, since notifications sent while disconnected are lost (the
    periodic full reconcile is the last safety net)."""

    def __init__(self, url: str, on_change: Callable[[str, str], None],
                 on_state: Callable[[bool, str], None] = lambda up, detail: None,
                 channels: tuple[str, ...] = (REGISTRY_CHANNEL, POLICY_CHANNEL), retry_seconds: float = 1.0):
        self.url = url
        self.on_change = on_change
        self.on_state = on_state
        self.channels = channels
        self.retry_seconds = retry_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.up = False
        self.notifications = 0

    def start(self) -> "RegistryWatcher":
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 3) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _set_state(self, up: bool, detail: str) -> None:
        if up != self.up:
            self.up = up
            try:
                self.on_state(up, detail)
            except Exception:
                log.exception("registry watcher state callback failed")

    def _notify(self, channel: str, payload: str) -> None:
        self.notifications += 1
        try:
            self.on_change(channel, payload)
        except Exception:
            log.exception("registry watcher callback failed")

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            conn = None
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=3, **_TCP_LIVENESS)
                for channel in self.channels:
                    conn.execute(f"LISTEN {channel}")
                self._set_state(True, "")
                if not first:
                    for channel in self.channels:
                        self._notify(channel, "reconnected")
                first = False
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=0.5):
                        self._notify(note.channel, note.payload)
                    # notifies() returns quietly on timeout; a cheap query finds a dead server
                    # (its socket may stay open without sending anything)
                    conn.execute("SELECT 1")
            except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                if not self._stop.is_set():
                    log.warning("registry LISTEN connection lost: %s; retrying", _short(exc))
                    self._set_state(False, _short(exc))
                    first = False
                    self._stop.wait(self.retry_seconds)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
