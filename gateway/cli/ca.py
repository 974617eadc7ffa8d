"""`kanmon ca ...`: create the organization device CA, trust external (MDM/SCEP) CA bundles,
import CRLs, show what is trusted. The PKI lives in <state-dir>/pki (ca.pki_dir)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography import x509

from gateway.cli.common import CONFIG_ENV, cannot_read, error, load_config_or_exit, operator_name, say
from gateway.devices.ca import (CaStore, DeviceCaError, fingerprint_sha256, init_ca, pki_dir,
                                prepare_crl_import, store_crl, trust_bundle)
from gateway.i18n import Text

# Refusals caused by the current state rather than by bad input: "check failed" (1).
_STATE_CONFLICTS = frozenset({"ca-exists", "crl-older"})


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ca = subparsers.add_parser("ca", help="device certificate authorities / 端末認証局")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)

    p = ca_sub.add_parser("init", help="create the organization device CA / 組織の端末 CA を作成")
    _where(p)
    p.add_argument("--org", required=True, help="organization name / 組織名")
    p.add_argument("--days", type=int, default=3650, help="CA validity in days (default 3650)")
    p.add_argument("--common-name", default=None)
    p.set_defaults(func=cmd_init)

    p = ca_sub.add_parser("trust", help="trust an external CA bundle (PEM) / 外部 CA を信頼")
    _where(p)
    p.add_argument("file", type=Path, metavar="FILE.pem")
    p.set_defaults(func=cmd_trust)

    p = ca_sub.add_parser("import-crl", help="import a CRL from a trusted CA / CRL を取り込む")
    _where(p, config_help="gateway configuration: its state directory and its registry (SQLite or PostgreSQL)",
           state_help="state directory with an embedded SQLite registry")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_import_crl)

    p = ca_sub.add_parser("show", help="show trusted CAs and CRLs / 信頼済み CA と CRL を表示")
    _where(p)
    p.set_defaults(func=cmd_show)


NO_STATE = Text("--config（または環境変数 KANMON_CONFIG）か --state-dir を指定してください",
                "give --config (or KANMON_CONFIG) or --state-dir")


def _where(p: argparse.ArgumentParser, config_help: str = "gateway configuration: its state directory",
           state_help: str = "state directory (the PKI is in <state-dir>/pki)") -> None:
    """--config FILE (default $KANMON_CONFIG), as every other group, or --state-dir DIR."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", default=os.environ.get(CONFIG_ENV) or None,
                       help=f"{config_help} (default: ${CONFIG_ENV}) / 設定ファイル")
    where.add_argument("--state-dir", type=Path, help=state_help)


def _state_dir(args: argparse.Namespace) -> Path:
    """--state-dir when given (it wins over $KANMON_CONFIG), else the config's state_dir."""
    if args.state_dir is not None:
        return args.state_dir
    if not args.config:
        raise SystemExit(error(NO_STATE))
    return Path(load_config_or_exit(args.config).state_dir)


def _fail(exc: DeviceCaError) -> int:
    print(exc.text.render(), file=sys.stderr)
    return 1 if exc.code in _STATE_CONFLICTS else 2


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        print(cannot_read(path, exc).render(), file=sys.stderr)
        return None


def cmd_init(args: argparse.Namespace) -> int:
    args.state_dir = _state_dir(args)
    try:
        ca = init_ca(pki_dir(args.state_dir), args.org, valid_days=args.days,
                     common_name=args.common_name)
    except DeviceCaError as exc:
        return _fail(exc)
    store = CaStore(pki_dir(args.state_dir))
    say(Text(
        f"組織の端末 CA を作成しました: {ca.cert.subject.rfc4514_string()}\n"
        f"  証明書: {store.cert_path}\n  秘密鍵: {store.key_path}(0600、バックアップして厳重に保管)\n"
        f"  SHA-256: {fingerprint_sha256(ca.cert)}\n  有効期限: {ca.cert.not_valid_after_utc:%Y-%m-%d}",
        f"created the organization device CA: {ca.cert.subject.rfc4514_string()}\n"
        f"  certificate: {store.cert_path}\n  private key: {store.key_path} (0600; back it up, keep it safe)\n"
        f"  SHA-256: {fingerprint_sha256(ca.cert)}\n  valid until: {ca.cert.not_valid_after_utc:%Y-%m-%d}"))
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    args.state_dir = _state_dir(args)
    data = _read(args.file)
    if data is None:
        return 2
    try:
        certs = trust_bundle(pki_dir(args.state_dir), data)
    except DeviceCaError as exc:
        return _fail(exc)
    for cert in certs:
        say(Text(f"信頼しました: {cert.subject.rfc4514_string()}  SHA-256 {fingerprint_sha256(cert)}",
                  f"trusted: {cert.subject.rfc4514_string()}  SHA-256 {fingerprint_sha256(cert)}"))
    return 0


def _state_and_registry_opener(args: argparse.Namespace):
    """(state dir, function opening the registry or returning None). With --config: the
    registry the config selects, opened by the same factory as every `kanmon device` command
    (SQLite or PostgreSQL). With --state-dir: its embedded SQLite file, if there is one."""
    if args.state_dir is None:
        if not args.config:
            raise SystemExit(error(NO_STATE))
        from gateway.registry.factory import open_registry

        cfg = load_config_or_exit(args.config)
        return Path(cfg.state_dir), lambda: open_registry(cfg)
    from gateway.registry.factory import open_state_dir_registry

    return Path(args.state_dir), lambda: open_state_dir_registry(args.state_dir)


def cmd_import_crl(args: argparse.Namespace) -> int:
    """Validate the CRL completely, revoke the registered devices on it, and only then store
    it: a stored CRL is always one whose devices are revoked. If revoking fails (registry
    locked or unreachable), nothing is stored and running the import again finishes it."""
    import sqlite3

    from gateway.registry.model import RegistryDamaged, RegistryError

    data = _read(args.file)
    if data is None:
        return 2
    state_dir, open_registry = _state_and_registry_opener(args)
    try:
        prepared = prepare_crl_import(pki_dir(state_dir), data)
    except DeviceCaError as exc:
        return _fail(exc)
    issuer = prepared.crl.issuer.rfc4514_string()
    try:
        registry = open_registry()
    except RegistryDamaged:
        raise                    # cli.main prints it (exit 2); nothing was stored
    except (RegistryError, sqlite3.Error) as exc:
        text = getattr(exc, "text", None)
        print((text or Text(f"端末レジストリを開けません: {exc}", f"cannot open the device registry: {exc}")).render(),
              file=sys.stderr)
        print(Text("CRL は保存していません", "the CRL was not stored").render(), file=sys.stderr)
        return 1
    if registry is None:
        print(Text(f"{state_dir} に端末レジストリがないため、端末は確認していません"
                   "(PostgreSQL のレジストリには --config を使ってください)",
                   f"no device registry in {state_dir}: no device was checked against the CRL "
                   "(use --config for a PostgreSQL registry)").render(), file=sys.stderr)
        revoked: list[str] = []
    else:
        try:
            revoked = revoke_listed_devices(registry, prepared.crl, issuer)
        except (RegistryError, sqlite3.Error) as exc:
            text = getattr(exc, "text", None) or Text(str(exc), str(exc))
            print(Text(f"CRL により端末を失効できませんでした({text.ja})。CRL は保存していません。"
                       "もう一度 import-crl を実行してください",
                       f"could not revoke the devices on the CRL ({text.en}); the CRL was not stored. "
                       "Run import-crl again").render(), file=sys.stderr)
            return 1
        finally:
            registry.close()
    try:
        imported = store_crl(prepared)
    except OSError as exc:
        print(Text(f"CRL を保存できません: {exc}(端末の失効は完了しています)",
                   f"cannot store the CRL: {exc} (the devices on it are revoked)").render(), file=sys.stderr)
        return 1
    if prepared.replaces_damaged:
        print(Text("保存済みの CRL が壊れていたため置き換えました", "the stored CRL was damaged and has been replaced")
              .render(), file=sys.stderr)
    nxt = f"{imported.next_update:%Y-%m-%d %H:%M}Z" if imported.next_update else "-"
    say(Text(f"CRL を取り込みました: {imported.issuer}(失効 {imported.revoked_count} 件、次回更新 {nxt})",
              f"imported the CRL of {imported.issuer} ({imported.revoked_count} revoked, next update {nxt})"))
    for device_id in revoked:
        say(Text(f"CRL により端末を失効しました: {device_id}", f"device revoked by the CRL: {device_id}"))
    if revoked:
        from gateway.runtime.gatewayprocess import poke_reconcile
        poke_reconcile(state_dir / "kanmon.pid")
    return 0


def revoke_listed_devices(registry, crl: x509.CertificateRevocationList, issuer: str) -> list[str]:
    """Revoke (audited) every registered device whose enrolled certificate is on the CRL;
    already revoked ones are left alone, so running it again is harmless. Any registry error
    propagates (the caller then does not store the CRL)."""
    from dataclasses import replace

    from gateway.registry.model import AuditEntry, DeviceStatus

    listed = {format(entry.serial_number, "x") for entry in crl}
    revoked = []
    for rec in registry.all():
        if rec.cert_serial and rec.cert_serial.lower().lstrip("0") in listed and rec.status is not DeviceStatus.REVOKED:
            reason = f"[crl] certificate {rec.cert_serial} revoked by {issuer}"
            registry.update(replace(rec, status=DeviceStatus.REVOKED, status_reason=reason),
                            audit=AuditEntry(operator_name(), "device-revoked", reason))
            revoked.append(rec.device_id)
    return revoked


def revoke_devices_on_crl(state_dir: Path, crl_data: bytes, issuer: str) -> list[str]:
    """Registered devices (embedded SQLite registry of `state_dir`) whose enrolled certificate
    is on the CRL are revoked now (audited), and the running gateway is asked to apply it."""
    from gateway.devices.ca import load_crl
    from gateway.runtime.gatewayprocess import poke_reconcile
    from gateway.registry.factory import open_state_dir_registry

    registry = open_state_dir_registry(state_dir)
    if registry is None:
        return []
    try:
        revoked = revoke_listed_devices(registry, load_crl(crl_data), issuer)
    finally:
        registry.close()
    if revoked:
        poke_reconcile(state_dir / "kanmon.pid")
    return revoked


def cmd_show(args: argparse.Namespace) -> int:
    store = CaStore(pki_dir(_state_dir(args)))
    try:
        own = store.org_ca_cert()
        trusted = store.trusted_cas()
        crls = store.crls()
    except ValueError as exc:
        print(Text(f"PKI ファイルが壊れています: {exc}", f"PKI files are corrupt: {exc}").render(),
              file=sys.stderr)
        return 2
    own_fp = fingerprint_sha256(own) if own is not None else None
    lines_ja: list[str] = []
    lines_en: list[str] = []
    for cert in trusted:
        fp = fingerprint_sha256(cert)
        kind = ("組織 CA", "org CA") if fp == own_fp else ("外部 CA", "external CA")
        lines_ja.append(f"{kind[0]}: {cert.subject.rfc4514_string()}  期限 {cert.not_valid_after_utc:%Y-%m-%d}  SHA-256 {fp}")
        lines_en.append(f"{kind[1]}: {cert.subject.rfc4514_string()}  until {cert.not_valid_after_utc:%Y-%m-%d}  SHA-256 {fp}")
    for crl in crls:
        revoked = len(list(crl))
        nxt = f"{crl.next_update_utc:%Y-%m-%d %H:%M}Z" if crl.next_update_utc else "-"
        lines_ja.append(f"CRL: {crl.issuer.rfc4514_string()}  失効 {revoked} 件  次回更新 {nxt}")
        lines_en.append(f"CRL: {crl.issuer.rfc4514_string()}  {revoked} revoked  next update {nxt}")
    if not trusted:
        lines_ja.append("信頼済みの CA はありません(`kanmon ca init` か `kanmon ca trust`)")
        lines_en.append("no trusted CA (`kanmon ca init` or `kanmon ca trust`)")
    say(Text("\n".join(lines_ja), "\n".join(lines_en)))
    return 0
