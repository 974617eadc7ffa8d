"""Device registry model: the records, statuses and audit entries every layer shares, and
the `DeviceRegistry` interface its adapters implement (`gateway.registry.sqlite`, embedded;
`gateway.registry.postgres`, shared by a cluster). Open a registry only through
`gateway.registry.factory.open_registry`. Every change bumps a revision number, so a
reconciler can poll cheaply for changes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from gateway.i18n import Text

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
    """A registry operation was refused (unknown device, duplicate key, exhausted prefix).
    ``text``: the reason in Japanese and English (a plain message is used for both)."""

    def __init__(self, message: "str | Text" = "") -> None:
        if isinstance(message, Text):
            self.text = message
            message = message.en
        elif not isinstance(getattr(self, "text", None), Text):   # subclasses set their own first
            self.text = Text(message, message)
        super().__init__(message)


T_CONFLICT = Text("端末 {d} は登録済みの端末と重なります: {e}", "device {d} conflicts with an existing device: {e}")
T_NO_SUCH_DEVICE = Text("その端末は登録されていません: {d}", "no such device: {d}")
T_PREFIX_FULL = Text("トンネルのプレフィックス {p} に空きアドレスがありません", "tunnel prefix {p} has no free address")


class RegistryDamaged(RegistryError):
    """The registry file cannot be used as it is (empty, not SQLite, corrupt, written by a
    newer Kanmon, a row that does not parse). Nothing was created or changed over it: the
    file is evidence and the allowlist, so it is never reinitialized in place."""

    def __init__(self, code: str, text: Text):
        self.code = code
        self.text = text
        super().__init__(text.en)


@dataclass(frozen=True, slots=True)
class BadRow:
    """A devices row that does not parse into a DeviceRecord: which device and why."""

    device_id: str
    reason: str

    @property
    def text(self) -> Text:
        return Text(f"端末 {self.device_id!r} の登録行が壊れているため読み飛ばしました(接続は許可されません): {self.reason}",
                    f"the registry row of device {self.device_id!r} is damaged and was skipped "
                    f"(the device is not admitted): {self.reason}")


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    wg_public_key: str | None   # None: registered, not yet enrolled (no peer)
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
        if self.wg_public_key is None:
            return False
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


@dataclass(frozen=True)
class AuditEntry:
    """Who changed what about a device, and why (written with the change, atomically)."""

    actor: str
    action: str
    reason: str = ""
    id: int | None = None
    at: datetime | None = None
    device_id: str | None = None
    before: dict | None = None
    after: dict | None = None


class DeviceRegistry(Protocol):
    def revision(self) -> int: ...
    def add(self, record: DeviceRecord, audit: AuditEntry | None = None) -> DeviceRecord: ...
    def get(self, device_id: str) -> DeviceRecord | None: ...
    def by_public_key(self, key: str) -> DeviceRecord | None: ...
    def all(self) -> list[DeviceRecord]: ...
    def changed_since(self, revision: int) -> tuple[int, list[DeviceRecord]]: ...
    def update(self, record: DeviceRecord, audit: AuditEntry | None = None) -> DeviceRecord: ...
    def unshipped_audit(self, limit: int = 500) -> list[AuditEntry]: ...
    def mark_audit_shipped(self, ids: list[int]) -> None: ...
    # issue #21 (operator console): an audit entry of its own (sign-in, refusals), and a device's history
    def append_audit(self, entry: AuditEntry) -> None: ...
    def audit_of(self, device_id: str, limit: int = 100) -> list[AuditEntry]: ...
    def allocate_addresses(self, prefix4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network | None) -> tuple[IPv4, IPv6 | None]: ...


def record_as_dict(rec: DeviceRecord | None) -> dict | None:
    """JSON-ready view of a record (CLI output, audit before/after)."""
    if rec is None:
        return None

    def ts(v):
        return v.isoformat() if v else None

    return {
        "device_id": rec.device_id, "owner": rec.owner, "department": rec.department,
        "groups": sorted(rec.groups), "ownership": str(rec.ownership), "platform": rec.platform,
        "os_version": rec.os_version, "jailbroken": rec.jailbroken, "wg_public_key": rec.wg_public_key,
        "ipv4": str(rec.ipv4), "ipv6": str(rec.ipv6) if rec.ipv6 else None,
        "status": str(rec.status), "status_reason": rec.status_reason,
        "suspended_until": ts(rec.suspended_until), "valid_from": ts(rec.valid_from),
        "valid_until": ts(rec.valid_until), "cert_serial": rec.cert_serial,
        "cert_fingerprint": rec.cert_fingerprint, "created_at": ts(rec.created_at), "updated_at": ts(rec.updated_at),
    }
