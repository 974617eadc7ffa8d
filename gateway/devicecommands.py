"""`kanmon device ...`: the operator's view of the registry. The running gateway's
reconciler notices every change (registry revision) and applies it within ~50 ms."""

from __future__ import annotations

import argparse
import getpass
import os
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime

from gateway.i18n import Text
from gateway.registry import (AuditEntry, DeviceRecord, DeviceStatus, Ownership, RegistryError, SqliteRegistry,
                              record_as_dict)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _registry(args: argparse.Namespace) -> tuple[SqliteRegistry, object]:
    from gateway.cli import load_config_or_exit

    cfg = load_config_or_exit(args.config)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SqliteRegistry(cfg.registry_path), cfg


def _parse_time(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(_error(Text("{w} の日時が不正です: {t}", "{w}: not an ISO 8601 time: {t}").format(w=what, t=text)))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def operator_name() -> str:
    """Who is acting, for the audit log: the invoking user behind sudo if any."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _error(text: Text) -> int:
    print(text.render(), file=sys.stderr)
    return EXIT_USAGE


def cmd_add(args: argparse.Namespace) -> int:
    from wireguard_tools import WireguardKey

    try:
        key = str(WireguardKey(args.public_key))
    except ValueError:
        return _error(Text("WireGuard 公開鍵が不正です: {k}", "Not a WireGuard public key: {k}").format(k=args.public_key))
    registry, cfg = _registry(args)
    try:
        ipv4, ipv6 = registry.allocate_addresses(cfg.ipv4_prefix, cfg.ipv6_prefix)
        rec = registry.add(DeviceRecord(
            device_id=args.id, wg_public_key=key, ipv4=ipv4, ipv6=ipv6, owner=args.owner or "",
            department=args.department or "", groups=frozenset(args.group or ()),
            ownership=Ownership(args.ownership), platform=args.platform, os_version=args.os_version,
            valid_from=_parse_time(args.valid_from, "--valid-from"),
            valid_until=_parse_time(args.valid_until, "--valid-until")),
            audit=AuditEntry(operator_name(), "device-added", args.reason or ""))
    except RegistryError as exc:
        return _error(Text("端末を登録できません: {e}", "Cannot add the device: {e}").format(e=exc))
    print(json.dumps(record_as_dict(rec), ensure_ascii=False) if args.json else
          f"{rec.device_id} {rec.ipv4} {rec.ipv6 or '-'} {rec.status}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    registry, _ = _registry(args)
    now = datetime.now(UTC)
    for rec in registry.all():
        if args.json:
            print(json.dumps(record_as_dict(rec), ensure_ascii=False))
        else:
            print(f"{rec.device_id}\t{rec.ipv4}\t{rec.effective_status(now)}\t{rec.owner}\t{','.join(sorted(rec.groups))}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    registry, _ = _registry(args)
    rec = registry.get(args.id)
    if rec is None:
        print(Text("端末がありません: {d}", "No such device: {d}").format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(record_as_dict(rec), ensure_ascii=False, indent=2))
    return EXIT_OK


def _change_status(args: argparse.Namespace, status: DeviceStatus, reason: str = "", until: datetime | None = None) -> int:
    registry, _ = _registry(args)
    rec = registry.get(args.id)
    if rec is None:
        print(Text("端末がありません: {d}", "No such device: {d}").format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    if rec.status is DeviceStatus.REVOKED and status is not DeviceStatus.REVOKED:
        return _error(Text("失効した端末は復帰できません: {d}", "A revoked device cannot be reinstated: {d}").format(d=args.id))
    registry.update(replace(rec, status=status, status_reason=reason, suspended_until=until),
                    audit=AuditEntry(operator_name(), AUDIT_ACTIONS[status], reason))
    print(f"{rec.device_id} {status}")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    return _change_status(args, DeviceStatus.REVOKED, args.reason)


def cmd_suspend(args: argparse.Namespace) -> int:
    return _change_status(args, DeviceStatus.SUSPENDED, args.reason or "", _parse_time(args.until, "--until"))


def cmd_resume(args: argparse.Namespace) -> int:
    return _change_status(args, DeviceStatus.ACTIVE)


AUDIT_ACTIONS = {
    DeviceStatus.REVOKED: "device-revoked", DeviceStatus.SUSPENDED: "device-suspended",
    DeviceStatus.ACTIVE: "device-resumed", DeviceStatus.QUARANTINED: "device-quarantined",
}
REVOKE_REASONS = ("lost", "stolen", "retired", "compromised", "policy-violation", "other")


def register(sub: argparse._SubParsersAction) -> None:
    device = sub.add_parser("device", help="manage registered devices")
    dsub = device.add_subparsers(dest="device_command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", required=True, help="gateway configuration (for the state directory)")
        return p

    add = with_config(dsub.add_parser("add", help="register a device with its WireGuard public key"))
    add.add_argument("--id", required=True)
    add.add_argument("--public-key", required=True, help="the device's WireGuard public key (base64)")
    add.add_argument("--owner")
    add.add_argument("--department")
    add.add_argument("--group", action="append")
    add.add_argument("--ownership", choices=[o.value for o in Ownership], default="org")
    add.add_argument("--platform")
    add.add_argument("--os-version")
    add.add_argument("--valid-from")
    add.add_argument("--valid-until")
    add.add_argument("--reason", help="why (audit log)")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_add)

    lst = with_config(dsub.add_parser("list", help="list devices"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    show = with_config(dsub.add_parser("show", help="show one device"))
    show.add_argument("id")
    show.set_defaults(func=cmd_show)

    revoke = with_config(dsub.add_parser("revoke", help="cut a device off for good"))
    revoke.add_argument("id")
    revoke.add_argument("--reason", required=True, choices=REVOKE_REASONS)
    revoke.set_defaults(func=cmd_revoke)

    suspend = with_config(dsub.add_parser("suspend", help="cut a device off until a time"))
    suspend.add_argument("id")
    suspend.add_argument("--until", help="ISO 8601; without it, until `resume`")
    suspend.add_argument("--reason")
    suspend.set_defaults(func=cmd_suspend)

    resume = with_config(dsub.add_parser("resume", help="end a suspension"))
    resume.add_argument("id")
    resume.set_defaults(func=cmd_resume)
