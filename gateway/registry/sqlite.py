"""Embedded SQLite device registry (one file in the state directory), the default adapter of
`gateway.registry.model.DeviceRegistry`. Open it through `gateway.registry.factory`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sqlite3
import threading
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from gateway.i18n import Text
from gateway.registry.model import (T_CONFLICT, T_NO_SUCH_DEVICE, T_PREFIX_FULL, IPv4, IPv6, AuditEntry, BadRow, DeviceRecord, DeviceStatus, Ownership,
                                    RegistryDamaged, RegistryError, record_as_dict)

log = logging.getLogger("kanmon.registry")


_RESTORE = Text("バックアップから復元するか、`kanmon registry check` で診断してください。このファイルには何も書き込んでいません。",
                "Restore it from a backup or diagnose it with `kanmon registry check`; nothing was written to the file.")


def _damaged(code: str, path: Path, ja: str, en: str) -> RegistryDamaged:
    return RegistryDamaged(code, Text(f"端末レジストリ {path} を開けません: {ja}。{_RESTORE.ja}",
                                      f"cannot open the device registry {path}: {en}. {_RESTORE.en}"))


_SCHEMA = [
    # version 1
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        wg_public_key TEXT UNIQUE,         -- NULL until the device enrolls its own key
        ipv4 TEXT NOT NULL UNIQUE,
        ipv4_int INTEGER NOT NULL UNIQUE,  -- for address allocation without a scan
        ipv6 TEXT UNIQUE,
        owner TEXT NOT NULL DEFAULT '',
        department TEXT NOT NULL DEFAULT '',
        groups_json TEXT NOT NULL DEFAULT '[]',
        ownership TEXT NOT NULL DEFAULT 'org' CHECK (ownership IN ('org', 'byod')),
        platform TEXT,
        os_version TEXT,
        jailbroken INTEGER NOT NULL DEFAULT 0,
        cert_serial TEXT,
        cert_fingerprint TEXT,
        valid_from TEXT,
        valid_until TEXT,
        status TEXT NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'suspended', 'quarantined', 'revoked')),
        status_reason TEXT NOT NULL DEFAULT '',
        suspended_until TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        row_rev INTEGER NOT NULL DEFAULT 0   -- registry revision of the row's last change
    );
    CREATE INDEX devices_row_rev ON devices (row_rev);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device_id TEXT,
        reason TEXT NOT NULL DEFAULT '',
        before_json TEXT,
        after_json TEXT,
        shipped INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX audit_unshipped ON audit (shipped, id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta VALUES ('revision', 0);
    CREATE TRIGGER devices_ins AFTER INSERT ON devices BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'revision'; END;
    CREATE TRIGGER devices_upd AFTER UPDATE ON devices BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'revision'; END;
    CREATE TRIGGER devices_del AFTER DELETE ON devices BEGIN
        UPDATE meta SET value = value + 1 WHERE key = 'revision'; END;
    """,
]

_COLUMNS = (
    "device_id", "wg_public_key", "ipv4", "ipv4_int", "ipv6", "owner", "department", "groups_json", "ownership",
    "platform", "os_version", "jailbroken", "cert_serial", "cert_fingerprint", "valid_from",
    "valid_until", "status", "status_reason", "suspended_until", "created_at", "updated_at",
)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse_ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _row_to_record(row: sqlite3.Row) -> DeviceRecord:
    """One devices row as a record; ValueError/TypeError (wrapped by `_parse_row`) when a
    column does not hold what the schema promises."""
    return DeviceRecord(
        device_id=row["device_id"],
        wg_public_key=row["wg_public_key"],
        ipv4=ipaddress.IPv4Address(row["ipv4"]),
        ipv6=ipaddress.IPv6Address(row["ipv6"]) if row["ipv6"] else None,
        owner=row["owner"],
        department=row["department"],
        groups=frozenset(json.loads(row["groups_json"])),
        ownership=Ownership(row["ownership"]),
        platform=row["platform"],
        os_version=row["os_version"],
        jailbroken=bool(row["jailbroken"]),
        cert_serial=row["cert_serial"],
        cert_fingerprint=row["cert_fingerprint"],
        valid_from=_parse_ts(row["valid_from"]),
        valid_until=_parse_ts(row["valid_until"]),
        status=DeviceStatus(row["status"]),
        status_reason=row["status_reason"],
        suspended_until=_parse_ts(row["suspended_until"]),
        created_at=_parse_ts(row["created_at"]),
        updated_at=_parse_ts(row["updated_at"]),
    )


def _parse_row(row: sqlite3.Row) -> DeviceRecord | BadRow:
    try:
        record = _row_to_record(row)
        if not isinstance(record.device_id, str) or not isinstance(record.owner, str):
            raise TypeError("device_id/owner is not text")
        return record
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        return BadRow(str(row["device_id"]), f"{type(exc).__name__}: {exc}")


def _parse_rows(rows: list[sqlite3.Row], bad: dict[str, BadRow],
                cache: dict[str, tuple[int, DeviceRecord]] | None = None,
                new_cache: dict[str, tuple[int, DeviceRecord]] | None = None) -> list[DeviceRecord]:
    """The rows that parse; the others are reported (recorded in `bad` by device, logged once
    per device and reason: the reconciler reads often) and left out, so one damaged row never
    hides the rest and never admits its device.

    `cache`: {device id: (hash of the whole row, its record)} from the previous read; a row
    whose content hashes the same keeps its record instead of being parsed again (the full
    reconcile pass reads every row; parsing 100,000 rows' addresses and times costs seconds).
    The hash covers every column, so a row edited in any way -- even outside Kanmon, without
    a revision stamp -- is parsed (and checked) again. `new_cache` receives this read's."""
    records = []
    for row in rows:
        if cache is not None:
            row_hash = hash(row)
            hit = cache.get(row["device_id"])
            if hit is not None and hit[0] == row_hash:
                records.append(hit[1])
                new_cache[hit[1].device_id] = hit
                continue
        parsed = _parse_row(row)
        if isinstance(parsed, BadRow):
            if bad.get(parsed.device_id) != parsed:
                log.warning("%s", parsed.text.render())
            bad[parsed.device_id] = parsed
        else:
            bad.pop(parsed.device_id, None)
            records.append(parsed)
            if new_cache is not None:
                new_cache[parsed.device_id] = (row_hash, parsed)
    return records


def _record_to_row(rec: DeviceRecord) -> tuple:
    return (
        rec.device_id, rec.wg_public_key, str(rec.ipv4), int(rec.ipv4), str(rec.ipv6) if rec.ipv6 else None,
        rec.owner, rec.department, json.dumps(sorted(rec.groups)), str(rec.ownership),
        rec.platform, rec.os_version, int(rec.jailbroken), rec.cert_serial, rec.cert_fingerprint,
        _ts(rec.valid_from), _ts(rec.valid_until), str(rec.status), rec.status_reason,
        _ts(rec.suspended_until), _ts(rec.created_at), _ts(rec.updated_at),
    )


SQLITE_MAGIC = b"SQLite format 3\x00"


def _create_fresh(path: Path) -> None:
    """First start: the registry file does not exist yet. It is built under a temporary name
    and linked into place, so a file at `path` is always a complete SQLite database -- an
    empty or half-written one can only come from damage, never from an interrupted start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    tmp.unlink(missing_ok=True)
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")    # writes the header page
        finally:
            db.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)                       # never replaces a file that appeared meanwhile
        except FileExistsError:
            pass
        except OSError:                              # no hard links on this filesystem
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def check_registry_header(path: Path) -> None:
    """RegistryDamaged unless `path` starts like a SQLite database (it must exist). Opens and
    closes the file: not while this process has a connection to it (see `open_registry_file`)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise _damaged("unreadable", path, f"読めません ({exc.strerror})", f"cannot read it ({exc.strerror})") from None
    if not head:
        raise _damaged("empty", path, "ファイルが空 (0 バイト) です。端末の登録が失われています",
                       "the file is empty (0 bytes); the device registrations are gone")
    if head != SQLITE_MAGIC:
        raise _damaged("not-sqlite", path, "SQLite データベースではありません",
                       "it is not a SQLite database (file is not a database)")


def open_registry_file(path: Path) -> sqlite3.Connection:
    """The registry's SQLite file as every user of it opens it: shared between threads
    (callers hold their own lock), autocommit (explicit BEGIN IMMEDIATE), WAL so the gateway
    and the operator CLI can use it at once, and a busy timeout instead of instant errors.

    A missing file is the first start and is created (atomically, see `_create_fresh`) --
    unless its marker `<file>.created` says a registry existed here before: then it was
    deleted or moved, and RegistryDamaged says so instead of starting an empty allowlist. A
    file that exists but is empty, not SQLite or unreadable raises RegistryDamaged and is left
    as it is (SQLite itself would silently treat a 0-byte file as a new, empty database)."""
    path = Path(path)
    marker = created_marker(path)
    if not path.exists():
        if marker.exists():
            raise RegistryDamaged("missing", Text(
                f"端末レジストリ {path} がありません。以前は存在していました({marker} の記録)。削除または移動されています。"
                f"バックアップから復元してください。意図して空のレジストリから始める場合は {marker} を削除してください。",
                f"the device registry {path} is missing although one existed here ({marker}): it was deleted or "
                f"moved. Restore it from a backup; to start an empty registry on purpose, remove {marker}."))
        _create_fresh(path)
    # The file is not opened (and closed) by Python here: closing any descriptor of it drops
    # every POSIX lock this process holds on it, including the SHARED lock an already open
    # connection keeps in WAL mode (the gateway's registry, when the session store opens the
    # same file). Another process then takes itself for the last user, checkpoints and
    # deletes the WAL, and the open connection keeps reading the deleted one: it never sees
    # a later revision. So the empty file is found by its size, and a header that is not
    # SQLite's by SQLite itself ("file is not a database"); only then is the header read, to
    # say which damage it is -- the file is refused at that point anyway.
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _damaged("unreadable", path, f"読めません ({exc.strerror})", f"cannot read it ({exc.strerror})") from None
    if size == 0:
        check_registry_header(path)                  # raises "empty"
    try:
        db = sqlite3.connect(path, check_same_thread=False, timeout=10, isolation_level=None)
    except sqlite3.OperationalError:
        check_registry_header(path)                  # unreadable: says so; else SQLite's own error
        raise
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        db.close()
        raise                                        # locked/busy: not damage, the caller's to handle
    except sqlite3.DatabaseError as exc:
        db.close()
        check_registry_header(path)                  # not SQLite at all (or emptied meanwhile)
        raise _damaged("corrupt", path, f"データベースが壊れています ({exc})", f"the database is corrupt ({exc})") from None
    if not marker.exists():
        try:   # from now on a vanished file is told apart from a first start (also for registries from before)
            marker.write_text(datetime.now(UTC).isoformat() + "\n")
        except OSError:
            pass
    return db


def created_marker(path: Path) -> Path:
    """Written beside the registry once it exists: its absence is what makes a first start."""
    return Path(path).with_name(Path(path).name + ".created")


class SqliteRegistry:
    """The embedded registry. Safe to share between threads of one process; several
    processes (the gateway and the operator CLI) may open the same file (WAL mode)."""

    def __init__(self, path: str | Path, *, clock=lambda: datetime.now(UTC)):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._bad: dict[str, BadRow] = {}    # device -> why its row was skipped (see _parse_rows)
        self._parsed: dict[str, tuple[int, DeviceRecord]] = {}   # all()'s cache (see _parse_rows)
        self._db = open_registry_file(self.path)
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(_SCHEMA):
                raise RegistryDamaged("future-schema", Text(
                    f"端末レジストリ {self.path} はスキーマ版 {version} で、この Kanmon が扱えるのは {len(_SCHEMA)} までです"
                    "(新しい版の Kanmon で作成されたファイル)。Kanmon を更新してください。ファイルは変更していません。",
                    f"the device registry {self.path} has schema version {version}; this Kanmon knows up to "
                    f"{len(_SCHEMA)} (the file was written by a newer Kanmon). Upgrade Kanmon; the file was not changed."))
            for number, script in enumerate(_SCHEMA[version:], start=version + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split_sql(script):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={number}")
                    self._db.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    self._db.execute("ROLLBACK")
                    if "already exists" not in str(exc):
                        raise
                    raise _damaged("schema-mismatch", self.path, f"スキーマ版 {version} の表示と中身が一致しません ({exc})",
                                   f"its schema version {version} does not match its tables ({exc})") from None
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            missing = schema_problems(self._db)
            if missing:
                raise _damaged("schema-incomplete", self.path, "表がありません: " + ", ".join(missing),
                               "tables are missing: " + ", ".join(missing))

    def close(self) -> None:
        self._db.close()

    @property
    def bad_rows(self) -> list[BadRow]:
        """Rows the reads so far skipped because they do not parse (still damaged when last read)."""
        return list(self._bad.values())

    def revision(self) -> int:
        with self._lock:
            return self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]

    def _write(self, sql: str, params: tuple, audit: AuditEntry | None, device_id: str,
               before: DeviceRecord | None, after: DeviceRecord | None) -> int:
        """One change and its audit entry in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(sql, params)
                if cur.rowcount == 1:
                    # Stamp the row with the revision its change produced (the triggers have
                    # bumped it), so readers can fetch only what changed since a revision.
                    self._db.execute("UPDATE devices SET row_rev = (SELECT value FROM meta WHERE key='revision')"
                                     " WHERE device_id=?", (device_id,))
                if audit is not None and cur.rowcount == 1:
                    self._db.execute(
                        "INSERT INTO audit (at, actor, action, device_id, reason, before_json, after_json)"
                        " VALUES (?,?,?,?,?,?,?)",
                        (_ts(self._clock()), audit.actor, audit.action, device_id, audit.reason,
                         json.dumps(record_as_dict(before), ensure_ascii=False) if before else None,
                         json.dumps(record_as_dict(after), ensure_ascii=False) if after else None))
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise RegistryError(T_CONFLICT.format(d=repr(device_id), e=exc)) from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return cur.rowcount

    def add(self, record: DeviceRecord, audit: AuditEntry | None = None) -> DeviceRecord:
        now = self._clock()
        record = replace(record, created_at=record.created_at or now, updated_at=now)
        placeholders = ",".join("?" * len(_COLUMNS))
        self._write(f"INSERT INTO devices ({','.join(_COLUMNS)}) VALUES ({placeholders})", _record_to_row(record),
                    audit, record.device_id, None, record)
        return record

    def update(self, record: DeviceRecord, audit: AuditEntry | None = None) -> DeviceRecord:
        before = self.get(record.device_id)
        if before is None:
            raise RegistryError(T_NO_SUCH_DEVICE.format(d=repr(record.device_id)))
        record = replace(record, updated_at=self._clock())
        assignments = ",".join(f"{c}=?" for c in _COLUMNS[1:])
        rows = self._write(f"UPDATE devices SET {assignments} WHERE device_id=?",
                           _record_to_row(record)[1:] + (record.device_id,), audit, record.device_id, before, record)
        if rows != 1:
            raise RegistryError(T_NO_SUCH_DEVICE.format(d=repr(record.device_id)))
        return record

    def _one(self, row: sqlite3.Row | None) -> DeviceRecord | None:
        """A single looked-up row: a damaged one is refused (the caller asked for that device)."""
        if row is None:
            return None
        parsed = _parse_row(row)
        if isinstance(parsed, BadRow):
            self._bad[parsed.device_id] = parsed
            raise RegistryDamaged("bad-row", Text(
                f"端末 {parsed.device_id!r} の登録行が壊れています: {parsed.reason}(`kanmon registry check` で診断)",
                f"the registry row of device {parsed.device_id!r} is damaged: {parsed.reason} "
                "(diagnose with `kanmon registry check`)"))
        return parsed

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM devices WHERE device_id=?", (device_id,)).fetchone()
        return self._one(row)

    def by_public_key(self, key: str) -> DeviceRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM devices WHERE wg_public_key=?", (key,)).fetchone()
        return self._one(row)

    def all(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM devices ORDER BY device_id").fetchall()
        parsed: dict[str, tuple[int, DeviceRecord]] = {}
        records = _parse_rows(rows, self._bad, self._parsed, parsed)
        self._parsed = parsed   # devices gone from the table leave the cache with this read
        return records

    def changed_since(self, revision: int) -> tuple[int, list[DeviceRecord]]:
        """(current revision, records changed after `revision`), read in one snapshot."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                current = self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]
                # `+device_id`: sort the few changed rows, not scan 100,000 in key order (issue #22: the
                # planner took the primary key for the ORDER BY, 65 ms per revocation at 100,000 devices)
                rows = self._db.execute("SELECT * FROM devices WHERE row_rev > ? ORDER BY +device_id",
                                        (revision,)).fetchall()
            finally:
                self._db.execute("COMMIT")
        return current, _parse_rows(rows, self._bad)

    def unshipped_audit(self, limit: int = 500) -> list[AuditEntry]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM audit WHERE shipped=0 ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [AuditEntry(actor=r["actor"], action=r["action"], reason=r["reason"], id=r["id"], at=_parse_ts(r["at"]),
                           device_id=r["device_id"],
                           before=json.loads(r["before_json"]) if r["before_json"] else None,
                           after=json.loads(r["after_json"]) if r["after_json"] else None) for r in rows]

    def append_audit(self, entry: AuditEntry) -> None:
        """An audit entry that is no device change (issue #21: console sign-ins, refusals)."""
        with self._lock:
            self._db.execute("INSERT INTO audit (at, actor, action, device_id, reason) VALUES (?,?,?,?,?)",
                             (_ts(self._clock()), entry.actor, entry.action, entry.device_id, entry.reason))

    def audit_of(self, device_id: str, limit: int = 100) -> list[AuditEntry]:
        """A device's audit entries, newest first (shipped or not: the table keeps them)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM audit WHERE device_id=? ORDER BY id DESC LIMIT ?",
                                    (device_id, limit)).fetchall()
        return [AuditEntry(actor=r["actor"], action=r["action"], reason=r["reason"], id=r["id"], at=_parse_ts(r["at"]),
                           device_id=r["device_id"]) for r in rows]

    def mark_audit_shipped(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            # One transaction (not one commit, and one disk sync, per entry: the first start
            # after a bulk enrolment ships 100,000 entries).
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("UPDATE audit SET shipped=1 WHERE id=?", [(i,) for i in ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def allocate_addresses(
        self, prefix4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network | None
    ) -> tuple[IPv4, IPv6 | None]:
        """Lowest free host address of the prefix above the gateway's (the first host address).
        Uses the integer index: next after the highest in use, else the first gap; no scan of
        every device. The IPv6 address mirrors the IPv4 host number, so both read together."""
        first = int(prefix4.network_address) + 2
        last = int(prefix4.broadcast_address) - 1
        with self._lock:
            top = self._db.execute("SELECT MAX(ipv4_int) FROM devices WHERE ipv4_int BETWEEN ? AND ?",
                                   (first, last)).fetchone()[0]
            if top is None:
                candidate = first
            elif top < last:
                candidate = top + 1
            else:
                gap = self._db.execute(
                    "SELECT d.ipv4_int + 1 FROM devices d WHERE d.ipv4_int BETWEEN ? AND ? AND NOT EXISTS"
                    " (SELECT 1 FROM devices e WHERE e.ipv4_int = d.ipv4_int + 1) ORDER BY 1 LIMIT 1",
                    (first - 1, last - 1)).fetchone()
                in_use_first = self._db.execute("SELECT 1 FROM devices WHERE ipv4_int=?", (first,)).fetchone()
                candidate = first if in_use_first is None else (gap[0] if gap else None)
        if candidate is None or candidate > last:
            raise RegistryError(T_PREFIX_FULL.format(p=prefix4))
        host_number = candidate - int(prefix4.network_address)
        return ipaddress.IPv4Address(candidate), (prefix6[host_number] if prefix6 is not None else None)


SCHEMA_VERSION = len(_SCHEMA)
_REQUIRED_TABLES = ("devices", "audit", "meta")


def schema_problems(db: sqlite3.Connection) -> list[str]:
    """What a migrated registry lacks: missing tables, the revision counter."""
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = [t for t in _REQUIRED_TABLES if t not in names]
    if "meta" in names and db.execute("SELECT 1 FROM meta WHERE key='revision'").fetchone() is None:
        missing.append("meta.revision")
    return missing


def _split_sql(script: str) -> list[str]:
    """Split a migration script into statements; triggers contain ';' inside BEGIN..END."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            statements.append(joined)
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current))
    return statements
