"""`kanmon device ...`: the operator's view of the registry. The running gateway's
reconciler notices every change (registry revision) and applies it within ~50 ms."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import secrets
import sqlite3
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway.cli.common import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, NO_SUCH_DEVICE, add_config_argument, cannot_read, error,
                                load_config_or_exit, operator_name, os_reason)
from gateway.devices.binding import WireGuardKeyError, parse_wg_key, wg_key_text
from gateway.runtime import lifecycle
from gateway.runtime.lifecycle import APPLY_CONFIRM_SECONDS, AUDIT_ACTIONS, REVOKE_REASONS  # noqa: F401 (the CLI's names)
from gateway.i18n import Text, current_lang
from gateway.posture import POSTURE_REASON_PREFIX, PosturePolicy, apply_posture
from gateway.registry.model import (AuditEntry, DeviceRecord, DeviceRegistry, DeviceStatus, Ownership, RegistryError, record_as_dict)


def _registry(args: argparse.Namespace) -> tuple[DeviceRegistry, object]:
    """The registry the config selects: the embedded SQLite file, or the shared PostgreSQL
    registry of a multi-node deployment (registry.url)."""
    from gateway.registry.factory import open_registry

    cfg = load_config_or_exit(args.config)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return open_registry(cfg), cfg


def _parse_time(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(error(Text("{w} の日時が不正です: {t}", "{w}: not an ISO 8601 time: {t}").format(w=what, t=text)))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _bad_key(value: str) -> int:
    return error(Text("WireGuard 公開鍵が不正です: {k}", "Not a WireGuard public key: {k}").format(k=value))


# ---------------------------------------------------------------- shared helpers (issue #3)

def _posture_policy(cfg) -> PosturePolicy:
    return PosturePolicy.from_pairs(getattr(cfg, "posture_min_os", ()), getattr(cfg, "posture_quarantine_jailbroken", True))


def _normalize_key(value: str) -> str | None:
    try:
        return wg_key_text(parse_wg_key(value))
    except WireGuardKeyError:
        return None


def _yes_no(value: str | None) -> bool | None:
    """yes/no/true/false/1/0 (case-insensitive); '' or None: not reported."""
    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    if v in ("yes", "true", "1", "y", "はい"):
        return True
    if v in ("no", "false", "0", "n", "いいえ"):
        return False
    raise ValueError(value)


def _with_posture(cfg, record: DeviceRecord) -> tuple[DeviceRecord, str | None]:
    """The record after the posture rules, and the audit action they imply (or None)."""
    outcome = apply_posture(_posture_policy(cfg), record)
    if outcome.action == "device-quarantined":
        print(Text("姿勢(OS バージョン/脱獄)が基準を満たさないため隔離しました: {d}: {r}",
                   "quarantined for posture (OS version / jailbreak): {d}: {r}")
              .format(d=record.device_id, r=outcome.record.status_reason).render(), file=sys.stderr)
    elif outcome.action == "device-released":
        print(Text("姿勢が基準を満たしたので隔離を解除しました: {d}", "posture compliant again, released: {d}")
              .format(d=record.device_id).render(), file=sys.stderr)
    return outcome.record, outcome.action


class _Files:
    """Files written for one device; removed again when the registry refuses the change, so
    a failed command leaves nothing behind. Never overwrites an existing file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: list[Path] = []

    def write(self, name: str, data: bytes, private: bool = False) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.written.append(path)
        return path

    def check_free(self, names: list[str]) -> str | None:
        taken = [n for n in names if (self.directory / n).exists()]
        return ", ".join(str(self.directory / n) for n in taken) or None

    def undo(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)


def _issue_files(args: argparse.Namespace, cfg, device_id: str, owner: str, wg_public: str | None,
                 valid_until: datetime | None) -> tuple[object, _Files, str | None] | int:
    """Issue the device certificate with the org CA and write it to --out. Returns
    (issued, files, generated WireGuard public key or None) or an exit code."""
    from gateway.devices.ca import CaStore, DeviceCaError, device_pkcs12, issue_device_certificate, pki_dir

    if not args.out:
        return error(Text("証明書の出力先 --out DIR が必要です", "--out DIR is required to write the certificate"))
    if not owner:
        return error(Text("証明書には所有者 --owner が必要です", "a certificate needs an owner (--owner)"))
    csr = None
    if getattr(args, "csr", None):
        try:
            csr = Path(args.csr).read_bytes()
        except OSError as exc:
            return error(cannot_read(args.csr, exc))
    files = _Files(Path(args.out))
    names = [f"{device_id}.cert.pem"]
    if csr is None:
        names += [f"{device_id}.key.pem", f"{device_id}.p12", f"{device_id}.p12-password.txt"]
    generated_private = None
    if wg_public is None:
        from wireguard_tools import WireguardKey
        generated_private = WireguardKey.generate()
        wg_public = str(generated_private.public_key())
        names.append(f"{device_id}.wg.key")
    taken = files.check_free(names)
    if taken:
        return error(Text("出力先のファイルが既にあります(上書きしません): {f}",
                           "output files already exist (not overwriting): {f}").format(f=taken))
    now = datetime.now(UTC)
    not_after = now + timedelta(days=args.days)
    if valid_until is not None:
        not_after = min(not_after, valid_until)
    try:
        ca = CaStore(pki_dir(cfg.state_dir)).load_org_ca()
        issued = issue_device_certificate(ca, device_id, wg_public, owner, now, not_after, csr=csr)
        p12 = None
        if csr is None:
            password = (Path(args.p12_password_file).read_text().strip().encode() if args.p12_password_file
                        else secrets.token_urlsafe(12).encode())
            p12 = device_pkcs12(issued, ca.cert, password, device_id, legacy=args.legacy_p12)
    except DeviceCaError as exc:
        return error(exc.text)
    except OSError as exc:
        return error(cannot_read(exc.filename or args.p12_password_file, exc))
    try:
        files.write(f"{device_id}.cert.pem", issued.cert_pem)
        if not (files.directory / "ca.cert.pem").exists():   # shared by every device of the directory
            files.write("ca.cert.pem", ca.cert.public_bytes(serialization.Encoding.PEM))
        if p12 is not None:
            files.write(f"{device_id}.key.pem", issued.key_pem, private=True)
            files.write(f"{device_id}.p12", p12, private=True)
            files.write(f"{device_id}.p12-password.txt", password + b"\n", private=True)
        if generated_private is not None:
            files.write(f"{device_id}.wg.key", (str(generated_private) + "\n").encode(), private=True)
    except OSError as exc:
        files.undo()
        return error(Text("ファイルを書けません: {e}", "cannot write the files: {e}").format(e=exc))
    return issued, files, (wg_public if generated_private is not None else None)


def cmd_add(args: argparse.Namespace) -> int:
    key = _normalize_key(args.public_key) if args.public_key is not None else None
    if args.public_key is not None and key is None:
        return _bad_key(args.public_key)
    try:
        jailbroken = _yes_no(args.jailbroken)
    except ValueError:
        return error(Text("--jailbroken は yes か no です", "--jailbroken must be yes or no"))
    if args.reason and args.reason.startswith(POSTURE_REASON_PREFIX):
        return error(Text("理由の先頭に {p} は使えません", "a reason may not start with {p}").format(p=POSTURE_REASON_PREFIX))
    valid_from = _parse_time(args.valid_from, "--valid-from")
    valid_until = _parse_time(args.valid_until, "--valid-until")
    registry, cfg = _registry(args)
    if registry.get(args.id) is not None:
        print(Text("端末は既に登録されています: {d}", "the device is already registered: {d}").format(d=args.id).render(),
              file=sys.stderr)
        return EXIT_FAIL
    issued, files, generated = None, None, None
    if args.issue_cert or args.csr:
        result = _issue_files(args, cfg, args.id, args.owner or "", key, valid_until)
        if isinstance(result, int):
            return result
        issued, files, generated = result
    try:
        ipv4, ipv6 = registry.allocate_addresses(cfg.ipv4_prefix, cfg.ipv6_prefix)
        record = DeviceRecord(
            device_id=args.id, wg_public_key=key, ipv4=ipv4, ipv6=ipv6, owner=args.owner or "",
            department=args.department or "", groups=frozenset(args.group or ()),
            ownership=Ownership(args.ownership), platform=args.platform, os_version=args.os_version,
            jailbroken=bool(jailbroken), valid_from=valid_from, valid_until=valid_until,
            cert_serial=format(issued.certificate.serial_number, "x") if issued else None,
            cert_fingerprint=issued.fingerprint_sha256 if issued else None)
        record, _ = _with_posture(cfg, record)
        rec = registry.add(record, audit=AuditEntry(operator_name(), "device-added",
                                                    args.reason or record.status_reason))
    except RegistryError as exc:
        if files is not None:
            files.undo()
        return error(Text("端末を登録できません: {e}", "Cannot add the device: {e}").format(e=exc))
    if files is not None:
        for path in files.written:
            print(Text("書き出しました: {p}", "wrote: {p}").format(p=path).render(), file=sys.stderr)
    if rec.wg_public_key is None:
        print(Text("端末は登録済みで、登録手続き(POST /v1/enroll)を待っています: {d}",
                   "the device is registered and awaits enrollment (POST /v1/enroll): {d}").format(d=rec.device_id).render(),
              file=sys.stderr)
    print(json.dumps(record_as_dict(rec), ensure_ascii=False) if args.json else
          f"{rec.device_id} {rec.ipv4} {rec.ipv6 or '-'} {rec.status}")
    return EXIT_OK

LIST_COLUMNS = (("端末", "device"), ("IPv4", "IPv4"), ("状態", "status"), ("所有者", "owner"), ("グループ", "groups"))


def list_header(lang: str | None = None) -> str:
    """The header row of `device list` (tab-separated, as the rows) in the chosen language;
    both: "device/端末"."""
    lang = lang or current_lang()
    return "\t".join(ja if lang == "ja" else en if lang == "en" or ja == en else f"{en}/{ja}" for ja, en in LIST_COLUMNS)


def cmd_list(args: argparse.Namespace) -> int:
    registry, _ = _registry(args)
    now = datetime.now(UTC)
    if not args.json:   # --json stays one record per line, nothing else
        print(list_header())
    for rec in registry.all():
        if args.json:
            print(json.dumps(record_as_dict(rec), ensure_ascii=False))
        else:
            print(f"{rec.device_id}\t{rec.ipv4}\t{rec.effective_status(now)}\t{rec.owner}\t{','.join(sorted(rec.groups))}")
    for bad in getattr(registry, "bad_rows", ()):   # damaged rows: named, the rest listed (issue #15)
        print(bad.text.render(), file=sys.stderr)
    return EXIT_FAIL if getattr(registry, "bad_rows", None) else EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    registry, _ = _registry(args)
    rec = registry.get(args.id)
    if rec is None:
        print(NO_SUCH_DEVICE.format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(record_as_dict(rec), ensure_ascii=False, indent=2))
    return EXIT_OK


def _change_status(args: argparse.Namespace, status: DeviceStatus, reason: str = "", until: datetime | None = None) -> int:
    registry, _ = _registry(args)
    change = lifecycle.change_status(registry, args.id, status, actor=operator_name(), reason=reason, until=until)
    if change.missing:
        print(NO_SUCH_DEVICE.format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    if not change.ok:   # refused by the state (a revoked device): 1
        print(change.refused.render(), file=sys.stderr)
        return EXIT_FAIL
    print(f"{change.device_id} {status}")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    return _change_status(args, DeviceStatus.REVOKED, args.reason)


def cmd_suspend(args: argparse.Namespace) -> int:
    return _change_status(args, DeviceStatus.SUSPENDED, args.reason or "", _parse_time(args.until, "--until"))


def cmd_resume(args: argparse.Namespace) -> int:
    return _change_status(args, DeviceStatus.ACTIVE)


def cmd_quarantine(args: argparse.Namespace) -> int:
    if args.reason.startswith(POSTURE_REASON_PREFIX):
        return error(Text("理由の先頭に {p} は使えません(姿勢による自動隔離の印です)",
                           "a reason may not start with {p} (it marks automatic posture quarantines)")
                      .format(p=POSTURE_REASON_PREFIX))
    return _change_status(args, DeviceStatus.QUARANTINED, args.reason)


def cmd_release(args: argparse.Namespace) -> int:
    registry, cfg = _registry(args)
    change = lifecycle.release(registry, args.id, _posture_policy(cfg), actor=operator_name(), reason=args.reason or "")
    if change.missing:
        print(NO_SUCH_DEVICE.format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    if not change.ok:
        print(change.refused.render(), file=sys.stderr)
        return EXIT_FAIL
    if change.note is not None:
        print(change.note.render(), file=sys.stderr)
    print(f"{change.device_id} {DeviceStatus.ACTIVE}")
    return EXIT_OK


def cmd_renew(args: argparse.Namespace) -> int:
    key = _normalize_key(args.public_key) if args.public_key is not None else None
    if args.public_key is not None and key is None:
        return _bad_key(args.public_key)
    registry, cfg = _registry(args)
    check = lifecycle.renewable(registry, args.id)
    if check.missing:
        print(NO_SUCH_DEVICE.format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    if not check.ok:   # refused by the state (revoked): 1
        print(check.refused.render(), file=sys.stderr)
        return EXIT_FAIL
    rec = check.record
    result = _issue_files(args, cfg, rec.device_id, args.owner or rec.owner, key or rec.wg_public_key, rec.valid_until)
    if isinstance(result, int):
        return result
    issued, files, _generated = result
    try:
        lifecycle.record_renewal(registry, rec, issued.certificate, issued.fingerprint_sha256, key,
                                 actor=operator_name(), reason=args.reason or "")
    except RegistryError as exc:
        files.undo()
        return error(Text("更新できません: {e}", "cannot renew: {e}").format(e=exc))
    for path in files.written:
        print(Text("書き出しました: {p}", "wrote: {p}").format(p=path).render(), file=sys.stderr)
    print(f"{rec.device_id} renewed until {issued.certificate.not_valid_after_utc.isoformat()}")
    return EXIT_OK


def _report_posture(registry, cfg, rec: DeviceRecord, platform: str | None, os_version: str | None,
                    jailbroken: bool | None, why: str) -> str | None:
    """Apply reported posture to one record; returns the audit action written (or None)."""
    changed = replace(rec, platform=platform if platform is not None else rec.platform,
                      os_version=os_version if os_version is not None else rec.os_version,
                      jailbroken=jailbroken if jailbroken is not None else rec.jailbroken)
    changed, action = _with_posture(cfg, changed)
    if changed == rec:
        return None
    action = action or "device-posture-updated"
    reason = changed.status_reason if action in ("device-quarantined",) else why
    registry.update(changed, audit=AuditEntry(operator_name(), action, reason))
    return action


def cmd_update(args: argparse.Namespace) -> int:
    try:
        jailbroken = _yes_no(args.jailbroken)
    except ValueError:
        return error(Text("--jailbroken は yes か no です", "--jailbroken must be yes or no"))
    if args.platform is None and args.os_version is None and jailbroken is None:
        return error(Text("--platform、--os-version、--jailbroken のどれかを指定してください",
                           "give at least one of --platform, --os-version, --jailbroken"))
    registry, cfg = _registry(args)
    rec = registry.get(args.id)
    if rec is None:
        print(NO_SUCH_DEVICE.format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    _report_posture(registry, cfg, rec, args.platform, args.os_version, jailbroken, args.reason or "")
    now = registry.get(args.id)
    print(f"{now.device_id} {now.status} {now.platform or '-'} {now.os_version or '-'} jailbroken={now.jailbroken}")
    return EXIT_OK


POSTURE_COLUMNS = ("device_id", "platform", "os_version", "jailbroken")


def _read_csv_text(path: Path) -> str:
    """MDM exports in Japan come as UTF-8 (often with a BOM) or Shift_JIS (CP932)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp932")


T_CSV_EMPTY = Text("空です", "empty")
T_CSV_YES_NO = Text("{v!r} は yes か no で書いてください", "{v!r} is not yes/no/true/false")
T_CSV_TOO_MANY = Text("列が多すぎます", "too many fields")


def cmd_import_posture(args: argparse.Namespace) -> int:
    """All-or-nothing on format errors (file:line: column: message, exit 2, nothing
    imported); rows naming unknown devices are listed and skipped (exit 1)."""
    path = Path(args.file)
    try:
        text = _read_csv_text(path)
    except OSError as exc:
        return error(cannot_read(path, exc))
    except UnicodeDecodeError:
        return error(Text("{f}: UTF-8 でも Shift_JIS でもありません", "{f}: neither UTF-8 nor Shift_JIS").format(f=path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in POSTURE_COLUMNS if c not in header]
    if missing:
        return error(Text("{f}:1: 列がありません: {c}", "{f}:1: missing columns: {c}").format(f=path, c=", ".join(missing)))
    reader.fieldnames = header
    rows, errors = [], []
    try:
        for row in reader:
            line = reader.line_num
            device_id = (row.get("device_id") or "").strip()
            if not device_id:
                errors.append(f"{path}:{line}: device_id: {T_CSV_EMPTY.inline()}")
                continue
            try:
                jb = _yes_no(row.get("jailbroken"))
            except ValueError:
                errors.append(f"{path}:{line}: jailbroken: {T_CSV_YES_NO.format(v=row.get('jailbroken')).inline()}")
                continue
            if None in row:
                errors.append(f"{path}:{line}: {T_CSV_TOO_MANY.inline()}")
                continue
            rows.append((line, device_id, (row.get("platform") or "").strip() or None,
                         (row.get("os_version") or "").strip() or None, jb))
    except csv.Error as exc:
        errors.append(f"{path}:{reader.line_num}: {exc}")
    if errors:
        print(Text("取り込みを中止しました(何も変更していません):", "import aborted (nothing was changed):").render(),
              file=sys.stderr)
        for err in errors:
            print(f"  {err}", file=sys.stderr)
        return EXIT_USAGE
    registry, cfg = _registry(args)
    counts = {"device-quarantined": 0, "device-released": 0, "device-posture-updated": 0}
    unknown = []
    for line, device_id, platform, os_version, jb in rows:
        rec = registry.get(device_id)
        if rec is None:
            unknown.append(f"{path}:{line}: {device_id}")
            continue
        action = _report_posture(registry, cfg, rec, platform, os_version, jb, f"posture import {path.name}")
        if action is not None:
            counts[action] = counts.get(action, 0) + 1
    for entry in unknown:
        print(Text("未登録の端末(読み飛ばしました): {e}", "unknown device (skipped): {e}").format(e=entry).render(),
              file=sys.stderr)
    print(Text("{n} 行: 更新 {u}、隔離 {q}、解除 {r}、未登録 {x}", "{n} rows: {u} updated, {q} quarantined, {r} released, {x} unknown")
          .format(n=len(rows), u=counts["device-posture-updated"], q=counts["device-quarantined"],
                  r=counts["device-released"], x=len(unknown)).render())
    return EXIT_FAIL if unknown else EXIT_OK


def _register_bound_key(registry, rec: DeviceRecord, private_key, args: argparse.Namespace) -> DeviceRecord | int:
    """A device that has not enrolled, exported with the WireGuard key `device add --issue-cert`
    generated for it: the key is registered when the device's certificate (the one the registry
    recorded, `<id>.cert.pem` beside the key file or --cert) binds its public key — the same
    proof the enrollment endpoint accepts (gateway/devices/BINDING.md). Anything else: refused."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from gateway.devices.binding import certificate_wg_keys

    cert_path = Path(args.cert) if args.cert else Path(args.private_key_file).parent / f"{rec.device_id}.cert.pem"
    not_enrolled = Text("端末はまだ登録手続き前です(公開鍵が未登録): {d}。`device add --issue-cert` が書いた鍵なら、"
                        "同じフォルダの証明書 {c} が必要です(--cert で指定できます)",
                        "the device has not enrolled yet (no key registered): {d}. For the key `device add "
                        "--issue-cert` wrote, its certificate {c} is needed (or give it with --cert)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        print(not_enrolled.format(d=rec.device_id, c=cert_path).render(), file=sys.stderr)
        return EXIT_FAIL
    if not rec.cert_fingerprint or cert.fingerprint(hashes.SHA256()).hex() != rec.cert_fingerprint:
        return error(Text("{c} は端末 {d} に登録された証明書ではありません",
                          "{c} is not the certificate registered for {d}").format(c=cert_path, d=rec.device_id))
    public = str(private_key.public_key())
    try:
        bound = certificate_wg_keys(cert)
    except ValueError:          # a malformed extension: not bound, never a traceback
        bound = []
    if bound != [parse_wg_key(public)]:      # exactly one binding, this key (BINDING.md)
        return error(Text("この秘密鍵は端末 {d} の証明書に結び付けられた鍵ではありません",
                          "this private key is not the one bound in the certificate of {d}").format(d=rec.device_id))
    try:
        return registry.update(replace(rec, wg_public_key=public),
                               audit=AuditEntry(operator_name(), "device-key-registered",
                                                f"bound in certificate {rec.cert_serial}"))
    except RegistryError as exc:
        return error(Text("鍵を登録できません: {e}", "cannot register the key: {e}").format(e=exc))


def _keepalive(args: argparse.Namespace, cfg) -> int | None:
    """--persistent-keepalive, else tunnel.persistent_keepalive; 0 turns it off."""
    value = args.persistent_keepalive if args.persistent_keepalive is not None else cfg.wg_persistent_keepalive
    return value or None


def cmd_export_config(args: argparse.Namespace) -> int:
    from wireguard_tools import WireguardKey

    from gateway.devices.ca import CaStore, DeviceCaError, pki_dir, profile_signer
    from gateway.devices.clientconfig import (ClientConfigError, ios_mobileconfig, qr_png, qr_terminal, sign_profile,
                                              wg_quick_config)

    registry, cfg = _registry(args)
    rec = registry.get(args.id)
    if rec is None:
        print(NO_SUCH_DEVICE.format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    if rec.status is DeviceStatus.REVOKED:
        print(Text("失効した端末の設定は出力しません: {d}", "not exporting a revoked device's config: {d}")
              .format(d=args.id).render(), file=sys.stderr)
        return EXIT_FAIL
    if not cfg.endpoint:
        return error(Text("設定に tunnel.endpoint(端末から見たゲートウェイの host:port)がありません",
                           "the configuration has no tunnel.endpoint (host:port of the gateway as devices see it)"))
    try:
        gateway_public = str(WireguardKey(cfg.wg_private_key_file.read_text().strip()).public_key())
    except (OSError, ValueError) as exc:
        return error(Text("ゲートウェイの WireGuard 鍵を読めません(一度 `kanmon run` してください): {e}",
                           "cannot read the gateway's WireGuard key (run `kanmon run` once): {e}").format(e=exc))
    private = None
    if args.private_key_file:
        try:
            private_key = WireguardKey(Path(args.private_key_file).read_text().strip())
        except OSError as exc:
            return error(cannot_read(args.private_key_file, exc))
        except ValueError as exc:
            return error(Text("端末の秘密鍵を読めません: {e}", "cannot read the device private key: {e}").format(e=exc))
        if rec.wg_public_key is None:
            registered = _register_bound_key(registry, rec, private_key, args)
            if isinstance(registered, int):
                return registered
            rec = registered
        if str(private_key.public_key()) != rec.wg_public_key:
            return error(Text("この秘密鍵は端末 {d} の登録済み公開鍵と一致しません",
                               "this private key does not match the registered public key of {d}").format(d=args.id))
        private = str(private_key)
    dns = [str(cfg.gateway_ipv4)] + ([str(cfg.gateway_ipv6)] if cfg.gateway_ipv6 else [])
    try:
        text = wg_quick_config(private_key=private, address_v4=str(rec.ipv4),
                               address_v6=str(rec.ipv6) if rec.ipv6 else None,
                               gateway_public_key=gateway_public, endpoint=cfg.device_endpoint(rec.ipv4),
                               dns=dns, mtu=cfg.wg_mtu, persistent_keepalive=_keepalive(args, cfg))
        outputs: list[tuple[Path, bytes]] = []
        if args.qr_png:
            outputs.append((Path(args.qr_png), qr_png(text)))
        if args.mobileconfig:
            ca_path = cfg.mitmproxy_confdir / "mitmproxy-ca-cert.pem"
            try:
                inter_ca = ca_path.read_bytes()
            except OSError:
                return error(Text("インターセプト CA がありません: {p}(一度 `kanmon run` してください)",
                                   "no interception CA at {p} (run `kanmon run` once)").format(p=ca_path))
            org_cert = CaStore(pki_dir(cfg.state_dir)).org_ca_cert()
            org = "Kanmon"
            if org_cert is not None:
                from cryptography.x509.oid import NameOID
                names = org_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
                org = str(names[0].value) if names else org
            ident = f"{args.profile_prefix}.{re.sub(r'[^A-Za-z0-9-]', '-', rec.device_id)}"
            profile = ios_mobileconfig(
                config_text=text, profile_identifier=ident, tunnel_name=args.tunnel_name, organization=org,
                remote_address=cfg.device_endpoint(rec.ipv4), interception_ca=inter_ca, on_demand=not args.no_on_demand)
            if org_cert is not None:
                # Signed by the organization CA (a profile-signing leaf of it), which the phone
                # trusts with its device certificate: iOS shows the profile as verified.
                try:
                    signer, signer_key, ca = profile_signer(pki_dir(cfg.state_dir))
                except DeviceCaError as exc:
                    return error(exc.text)
                profile = sign_profile(profile, signer, signer_key, [ca.cert])
            else:
                print(Text("組織の端末 CA がないため、プロファイルは署名されません(`kanmon ca init`)",
                           "no organization device CA: the profile is not signed (`kanmon ca init`)").render(),
                      file=sys.stderr)
            outputs.append((Path(args.mobileconfig), profile))
        terminal = qr_terminal(text) if args.qr else None
    except ClientConfigError as exc:
        return error(exc.text)
    for path, data in outputs:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            reason = os_reason(exc)
            return error(Text(f"書けません: {path}: {reason.ja}", f"cannot write {path}: {reason.en}"))
        print(Text("書き出しました: {p}", "wrote: {p}").format(p=path).render(), file=sys.stderr)
    if terminal is not None:
        sys.stdout.write(terminal)
    elif not outputs:
        # The config carries the device's private key: printed only when no file was asked for.
        sys.stdout.write(text)
    return EXIT_OK



def _then_apply_now(handler):
    """After a command that changed the registry, ask the running gateway to reconcile at
    once (a revocation then takes effect in milliseconds, not at the next poll)."""
    def run(args: argparse.Namespace) -> int:
        try:
            code = handler(args)
        except sqlite3.OperationalError as exc:
            # e.g. another process holds the registry's write lock past the busy timeout
            # (found by tests/e2e/test_faults.py: this was a traceback). The transaction
            # was rolled back: nothing changed, and the gateway is not poked.
            print(lifecycle.T_REGISTRY_LOCKED.format(e=exc).render(), file=sys.stderr)
            return EXIT_FAIL
        if code in (EXIT_OK, EXIT_FAIL):  # import-posture: 1 = partly applied
            _apply_now(args)
        return code
    run.__name__ = handler.__name__
    return run


def _apply_now(args: argparse.Namespace) -> None:
    """Ask the running gateway to apply the change at once, and return only when it has
    (peers, drop set, live connections: issue #3 counts "cut off" from the command's return).
    No gateway running here: it applies the change when it starts (or another node's does)."""
    applied = lifecycle.apply_now(load_config_or_exit(args.config))
    if applied.warning is not None:
        print(applied.warning.render(), file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:
    device = sub.add_parser("device", help="manage registered devices / 端末の管理")
    dsub = device.add_subparsers(dest="device_command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_config_argument(p, help="gateway configuration (for the state directory)")
        return p

    def with_issue(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help="directory for the certificate, key, PKCS#12 (never overwritten)")
        p.add_argument("--csr", help="sign this CSR (PEM/DER) instead of generating a key pair")
        p.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365; "
                                                             "never beyond --valid-until)")
        p.add_argument("--p12-password-file", help="PKCS#12 password (default: generated, written next to it)")
        p.add_argument("--legacy-p12", action="store_true", help="3DES/SHA-1 PKCS#12 for Android < 12 / iOS < 15")

    add = with_config(dsub.add_parser("add", help="register a device (without --public-key it awaits enrollment)"))
    add.add_argument("--id", required=True)
    add.add_argument("--public-key", help="the device's WireGuard public key (base64); registered at once")
    add.add_argument("--issue-cert", action="store_true",
                     help="issue a device certificate with the org CA into --out (binds --public-key, "
                          "or a WireGuard key pair generated here)")
    with_issue(add)
    add.add_argument("--owner")
    add.add_argument("--department")
    add.add_argument("--group", action="append")
    add.add_argument("--ownership", choices=[o.value for o in Ownership], default="org")
    add.add_argument("--platform")
    add.add_argument("--os-version")
    add.add_argument("--jailbroken", help="yes|no")
    add.add_argument("--valid-from")
    add.add_argument("--valid-until")
    add.add_argument("--reason", help="why (audit log)")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=_then_apply_now(cmd_add))

    lst = with_config(dsub.add_parser("list", help="list devices"))
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)

    show = with_config(dsub.add_parser("show", help="show one device"))
    show.add_argument("id")
    show.set_defaults(func=cmd_show)

    revoke = with_config(dsub.add_parser("revoke", help="cut a device off for good"))
    revoke.add_argument("id")
    revoke.add_argument("--reason", required=True, choices=REVOKE_REASONS)
    revoke.set_defaults(func=_then_apply_now(cmd_revoke))

    suspend = with_config(dsub.add_parser("suspend", help="cut a device off until a time"))
    suspend.add_argument("id")
    suspend.add_argument("--until", help="ISO 8601; without it, until `resume`")
    suspend.add_argument("--reason")
    suspend.set_defaults(func=_then_apply_now(cmd_suspend))

    resume = with_config(dsub.add_parser("resume", help="end a suspension"))
    resume.add_argument("id")
    resume.set_defaults(func=_then_apply_now(cmd_resume))

    quarantine = with_config(dsub.add_parser("quarantine", help="allow only remediation destinations / 隔離"))
    quarantine.add_argument("id")
    quarantine.add_argument("--reason", required=True)
    quarantine.set_defaults(func=_then_apply_now(cmd_quarantine))

    release = with_config(dsub.add_parser("release", help="end a quarantine / 隔離解除"))
    release.add_argument("id")
    release.add_argument("--reason")
    release.set_defaults(func=_then_apply_now(cmd_release))

    renew = with_config(dsub.add_parser("renew", help="issue a new device certificate / 証明書の更新"))
    renew.add_argument("id")
    renew.add_argument("--public-key", help="bind (and register) this WireGuard key instead of the current one")
    renew.add_argument("--owner", help="owner in the certificate (default: the registry's)")
    renew.add_argument("--reason")
    with_issue(renew)
    renew.set_defaults(func=_then_apply_now(cmd_renew))

    update = with_config(dsub.add_parser("update", help="report posture: platform, OS version, jailbreak"))
    update.add_argument("id")
    update.add_argument("--platform")
    update.add_argument("--os-version")
    update.add_argument("--jailbroken", help="yes|no")
    update.add_argument("--reason")
    update.set_defaults(func=_then_apply_now(cmd_update))

    imp = with_config(dsub.add_parser("import-posture", help="posture from an MDM export (CSV: "
                                                             "device_id, platform, os_version, jailbroken)"))
    imp.add_argument("file", metavar="FILE.csv")
    imp.set_defaults(func=_then_apply_now(cmd_import_posture))

    export = with_config(dsub.add_parser("export-config", help="wg-quick config, QR code, iOS .mobileconfig"))
    export.add_argument("id")
    export.add_argument("--private-key-file", help="the device's WireGuard private key (else a placeholder)")
    export.add_argument("--cert", help="the device certificate binding that key, when the device has not enrolled "
                                       "(default: ID.cert.pem beside the key file)")
    export.add_argument("--persistent-keepalive", type=int, metavar="SECONDS",
                        help="PersistentKeepalive for a phone behind NAT (default: tunnel.persistent_keepalive; 0: off)")
    export.add_argument("--qr", action="store_true", help="print the QR code in the terminal instead of the text")
    export.add_argument("--qr-png", help="write the QR code as PNG")
    export.add_argument("--mobileconfig", help="write an iOS .mobileconfig (VPN + interception CA)")
    export.add_argument("--no-on-demand", action="store_true",
                        help="iOS profile without the always-on (VPN on demand) rules / 常時接続ルールなし")
    export.add_argument("--profile-prefix", default="jp.kanmon", help="reverse-DNS prefix of the profile id")
    export.add_argument("--tunnel-name", default="Kanmon VPN")
    export.set_defaults(func=cmd_export_config)
