"""A device's status changes, one code path for every front end (issue #21).

`kanmon device revoke|suspend|resume|quarantine|release` (gateway/cli/device.py) and the
operator console (gateway/console/) both change a device here, so both write the same audit
entry with the change (atomically, in the registry) and both ask the running gateway to apply
it at once and wait for its confirmation (``apply_now``): "revoked" on the terminal or in the
browser means the device's peer, drop set and live connections are already done (the
≤ 100 ms cut-off of issue #3 is measured from this registry write).

Nothing here prints: results are returned (``Change``, ``Applied``) with their bilingual texts,
and each front end shows them its own way.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from datetime import datetime

from gateway.i18n import Text
from gateway.posture import PosturePolicy, assess
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceRegistry, DeviceStatus
from gateway.runtime.gatewayprocess import poke_reconcile, wait_applied

APPLY_CONFIRM_SECONDS = 3.0   # how long a registry change waits for the running gateway to confirm it

AUDIT_ACTIONS = {
    DeviceStatus.REVOKED: "device-revoked", DeviceStatus.SUSPENDED: "device-suspended",
    DeviceStatus.ACTIVE: "device-resumed", DeviceStatus.QUARANTINED: "device-quarantined",
}
REVOKE_REASONS = ("lost", "stolen", "retired", "compromised", "policy-violation", "other")

NO_SUCH_DEVICE = Text("端末がありません: {d}", "No such device: {d}")   # as gateway.cli.common says it
T_REVOKED_FINAL = Text("失効した端末は復帰できません: {d}", "A revoked device cannot be reinstated: {d}")
T_NOT_QUARANTINED = Text("端末は隔離されていません: {d} ({s})", "the device is not quarantined: {d} ({s})")
T_POSTURE_NOTE = Text("注意: 記録上の姿勢は基準を満たしていません。次に姿勢が報告されると再び隔離されます: {r}",
                      "note: the recorded posture is not compliant; the next posture report quarantines it again: {r}")
T_REGISTRY_LOCKED = Text("端末登録データベースを変更できませんでした({e})。別のプロセスがロックしている可能性があります。"
                         "何も変更していません。",
                         "could not change the device registry ({e}); another process may hold its lock. "
                         "Nothing was changed.")
T_NOT_WAITING = Text("注意: 反映の確認をしていません({e})", "warning: not waiting for the gateway's confirmation ({e})")
T_NOT_CONFIRMED = Text("注意: 稼働中のゲートウェイが {s} 秒以内に変更の反映を確認しませんでした。登録は完了しており、"
                       "ゲートウェイは反映を続けます。`kanmon device show` とゲートウェイのログを確認してください。",
                       "warning: the running gateway did not confirm the change within {s} s. The registry has it and "
                       "the gateway will still apply it; check `kanmon device show` and the gateway's log.")


@dataclass(frozen=True)
class Change:
    """What a status change did. ``refused`` is None when the registry has the change;
    otherwise the bilingual reason and nothing changed. ``missing``: no such device."""

    device_id: str
    record: DeviceRecord | None = None
    refused: Text | None = None
    missing: bool = False
    note: Text | None = None       # shown besides a success (e.g. a posture warning)

    @property
    def ok(self) -> bool:
        return self.refused is None


def change_status(registry: DeviceRegistry, device_id: str, status: DeviceStatus, *, actor: str, reason: str = "",
                  until: datetime | None = None, action: str | None = None) -> Change:
    """Revoke, suspend, resume or quarantine one device (``action``: the audit action, by
    default the status's; the loss report names its own)."""
    rec = registry.get(device_id)
    if rec is None:
        return Change(device_id, refused=NO_SUCH_DEVICE.format(d=device_id), missing=True)
    if rec.status is DeviceStatus.REVOKED and status is not DeviceStatus.REVOKED:   # refused by the state
        return Change(device_id, rec, refused=T_REVOKED_FINAL.format(d=device_id))
    changed = registry.update(replace(rec, status=status, status_reason=reason, suspended_until=until),
                              audit=AuditEntry(actor, action or AUDIT_ACTIONS[status], reason))
    return Change(device_id, changed)


def release(registry: DeviceRegistry, device_id: str, posture: PosturePolicy, *, actor: str, reason: str = "") -> Change:
    """End a quarantine. The note warns when the recorded posture would quarantine it again."""
    rec = registry.get(device_id)
    if rec is None:
        return Change(device_id, refused=NO_SUCH_DEVICE.format(d=device_id), missing=True)
    if rec.status is not DeviceStatus.QUARANTINED:
        return Change(device_id, rec, refused=T_NOT_QUARANTINED.format(d=device_id, s=rec.status))
    changed = registry.update(replace(rec, status=DeviceStatus.ACTIVE, status_reason=""),
                              audit=AuditEntry(actor, "device-released", reason))
    result = assess(posture, rec.platform, rec.os_version, rec.jailbroken)
    note = None if result.compliant else T_POSTURE_NOTE.format(r=result.reason.en)
    return Change(device_id, changed, note=note)


T_RENEW_REVOKED = Text("失効した端末の証明書は更新できません: {d}", "cannot renew a revoked device: {d}")


def renewable(registry: DeviceRegistry, device_id: str) -> Change:
    """May this device get a new certificate? (``record``: the device as it is now.)"""
    rec = registry.get(device_id)
    if rec is None:
        return Change(device_id, refused=NO_SUCH_DEVICE.format(d=device_id), missing=True)
    if rec.status is DeviceStatus.REVOKED:   # refused by the state
        return Change(device_id, rec, refused=T_RENEW_REVOKED.format(d=device_id))
    return Change(device_id, rec)


def record_renewal(registry: DeviceRegistry, rec: DeviceRecord, certificate, fingerprint_sha256: str,
                   wg_public_key: str | None, *, actor: str, reason: str = "") -> DeviceRecord:
    """Bind the newly issued certificate (and optionally a new WireGuard key) to the device,
    with its ``device-renewed`` audit entry. Raises RegistryError (e.g. the key is another's)."""
    return registry.update(replace(rec, cert_serial=format(certificate.serial_number, "x"),
                                   cert_fingerprint=fingerprint_sha256,
                                   wg_public_key=wg_public_key if wg_public_key is not None else rec.wg_public_key),
                           audit=AuditEntry(actor, "device-renewed", reason))


@dataclass(frozen=True)
class Applied:
    """The running gateway's answer to "apply now": ``seconds`` until it confirmed, or
    ``warning`` (no confirmation; the registry has the change all the same). ``running``
    is False when no gateway runs on this host (it applies the change when it starts)."""

    running: bool
    seconds: float | None = None
    warning: Text | None = None


def apply_now(cfg, registry: DeviceRegistry | None = None, *, timeout: float = APPLY_CONFIRM_SECONDS) -> Applied:
    """Ask the running gateway to apply the registry's changes at once, and return when it
    has (peers, drop set, live connections: issue #3 counts "cut off" from this return)."""
    if not poke_reconcile(cfg.pid_path):
        return Applied(False)
    try:
        if registry is None:
            from gateway.registry.factory import open_registry
            registry = open_registry(cfg)
        target = registry.revision()
    except Exception as exc:  # any backend error (sqlite3, psycopg): the change is in, only the wait is skipped
        return Applied(True, warning=T_NOT_WAITING.format(e=exc))
    seconds = wait_applied(cfg.applied_status_path, target, timeout)
    if seconds is None:
        return Applied(True, warning=T_NOT_CONFIRMED.format(s=timeout))
    return Applied(True, seconds)


REGISTRY_BUSY = (sqlite3.OperationalError,)   # another process holds the write lock past the busy timeout
