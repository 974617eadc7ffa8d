"""Device registry: which devices exist, their keys, tunnel addresses and status.

SQLite is the embedded default (one file in the state directory). `DeviceRegistry` is the
interface a PostgreSQL backend implements for several nodes sharing one registry.
Every change bumps a revision number, so a reconciler can poll cheaply for changes.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


class DeviceStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"      # until `suspended_until`, then active again by itself
    QUARANTINED = "quarantined"  # connected, but only remediation destinations reachable
    REVOKED = "revoked"          # final: lost, stolen, retired, compromised ...


class Ownership(StrEnum):
    ORG = "org"
    BYOD = "byod"


class RegistryError(Exception):
    """A registry operation was refused (unknown device, duplicate key, exhausted prefix)."""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    wg_public_key: str
    ipv4: IPv4
    ipv6: IPv6 | None = None
    owner: str = ""
    department: str = ""
    groups: frozenset[str] = field(default_factory=frozenset)
    ownership: Ownership = Ownership.ORG
    platform: str | None = None
    os_version: str | None = None
    jailbroken: bool = False
    cert_serial: str | None = None
    cert_fingerprint: str | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    status: DeviceStatus = DeviceStatus.ACTIVE
    status_reason: str = ""
    suspended_until: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def admitted(self, now: datetime) -> bool:
        """May this device have a WireGuard peer right now?"""
        if self.status is DeviceStatus.REVOKED:
            return False
        if self.status is DeviceStatus.SUSPENDED and (self.suspended_until is None or now < self.suspended_until):
            return False
        if self.valid_from is not None and now < self.valid_from:
            return False
        if self.valid_until is not None and now >= self.valid_until:
            return False
        return True

    def effective_status(self, now: datetime) -> DeviceStatus:
        if self.status is DeviceStatus.SUSPENDED and self.suspended_until is not None and now >= self.suspended_until:
            return DeviceStatus.ACTIVE
        return self.status

    @property
    def addresses(self) -> tuple[IPv4 | IPv6, ...]:
        return (self.ipv4,) if self.ipv6 is None else (self.ipv4, self.ipv6)


class DeviceRegistry(Protocol):
    def revision(self) -> int: ...
    def add(self, record: DeviceRecord) -> DeviceRecord: ...
    def get(self, device_id: str) -> DeviceRecord | None: ...
    def all(self) -> list[DeviceRecord]: ...
    def update(self, record: DeviceRecord) -> DeviceRecord: ...
    def allocate_addresses(self, prefix4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network | None) -> tuple[IPv4, IPv6 | None]: ...


_SCHEMA = [
    # version 1
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        wg_public_key TEXT NOT NULL UNIQUE,
        ipv4 TEXT NOT NULL UNIQUE,
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
        updated_at TEXT NOT NULL
    );
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
    "device_id", "wg_public_key", "ipv4", "ipv6", "owner", "department", "groups_json", "ownership",
    "platform", "os_version", "jailbroken", "cert_serial", "cert_fingerprint", "valid_from",
    "valid_until", "status", "status_reason", "suspended_until", "created_at", "updated_at",
)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse_ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _row_to_record(row: sqlite3.Row) -> DeviceRecord:
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


def _record_to_row(rec: DeviceRecord) -> tuple:
    return (
        rec.device_id, rec.wg_public_key, str(rec.ipv4), str(rec.ipv6) if rec.ipv6 else None,
        rec.owner, rec.department, json.dumps(sorted(rec.groups)), str(rec.ownership),
        rec.platform, rec.os_version, int(rec.jailbroken), rec.cert_serial, rec.cert_fingerprint,
        _ts(rec.valid_from), _ts(rec.valid_until), str(rec.status), rec.status_reason,
        _ts(rec.suspended_until), _ts(rec.created_at), _ts(rec.updated_at),
    )


class SqliteRegistry:
    """The embedded registry. Safe to share between threads of one process; several
    processes (the gateway and the operator CLI) may open the same file (WAL mode)."""

    def __init__(self, path: str | Path, *, clock=lambda: datetime.now(UTC)):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_SCHEMA[version:], start=version + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split_sql(script):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={number}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def close(self) -> None:
        self._db.close()

    def revision(self) -> int:
        with self._lock:
            return self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]

    def add(self, record: DeviceRecord) -> DeviceRecord:
        now = self._clock()
        record = replace(record, created_at=record.created_at or now, updated_at=now)
        placeholders = ",".join("?" * len(_COLUMNS))
        with self._lock:
            try:
                self._db.execute(f"INSERT INTO devices ({','.join(_COLUMNS)}) VALUES ({placeholders})", _record_to_row(record))
            except sqlite3.IntegrityError as exc:
                raise RegistryError(f"device {record.device_id!r} conflicts with an existing device: {exc}") from None
        return record

    def update(self, record: DeviceRecord) -> DeviceRecord:
        record = replace(record, updated_at=self._clock())
        assignments = ",".join(f"{c}=?" for c in _COLUMNS[1:])
        with self._lock:
            try:
                cur = self._db.execute(
                    f"UPDATE devices SET {assignments} WHERE device_id=?", _record_to_row(record)[1:] + (record.device_id,)
                )
            except sqlite3.IntegrityError as exc:
                raise RegistryError(f"update of {record.device_id!r} conflicts: {exc}") from None
        if cur.rowcount != 1:
            raise RegistryError(f"no such device: {record.device_id!r}")
        return record

    def get(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM devices WHERE device_id=?", (device_id,)).fetchone()
        return _row_to_record(row) if row else None

    def all(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM devices ORDER BY device_id").fetchall()
        return [_row_to_record(r) for r in rows]

    def allocate_addresses(
        self, prefix4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network | None
    ) -> tuple[IPv4, IPv6 | None]:
        """Lowest free host address of the prefix; the first host address is the gateway's.
        The IPv6 address mirrors the IPv4 host number, so both are easy to read together."""
        with self._lock:
            used = {r[0] for r in self._db.execute("SELECT ipv4 FROM devices")}
        for offset, addr in enumerate(prefix4.hosts()):
            if offset == 0 or str(addr) in used:
                continue
            host_number = int(addr) - int(prefix4.network_address)
            v6 = prefix6[host_number] if prefix6 is not None else None
            return addr, v6
        raise RegistryError(f"tunnel prefix {prefix4} has no free address")


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
