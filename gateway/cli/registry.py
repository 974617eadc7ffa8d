"""`kanmon registry check`: diagnose the embedded SQLite registry without changing it
(SQLite's integrity_check, the schema version, rows that do not parse into a device).

Exit codes: 0 nothing found, 1 findings (each printed, bilingual), 2 bad input (invalid
config, no registry file, a PostgreSQL registry: check that one with the server's tools).
The file is opened read-only and never created, migrated or repaired here."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from gateway.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_config_argument, load_config_or_exit
from gateway.i18n import Text

_MAX_INTEGRITY_LINES = 100


def check_registry(path: Path) -> list[Text]:
    """Every problem found in the registry file at `path` (which must exist)."""
    from gateway.registry.model import BadRow, RegistryDamaged
    from gateway.registry.sqlite import SCHEMA_VERSION, _parse_row, check_registry_header, schema_problems

    try:
        check_registry_header(path)
    except RegistryDamaged as exc:
        return [exc.text]
    findings: list[Text] = []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return [Text(f"読み取り専用で開けません: {exc}", f"cannot open it read-only: {exc}")]
    db.row_factory = sqlite3.Row
    try:
        problems = [r[0] for r in db.execute(f"PRAGMA integrity_check({_MAX_INTEGRITY_LINES})")]
        if problems != ["ok"]:
            for problem in problems:
                findings.append(Text(f"integrity_check: {problem}", f"integrity_check: {problem}"))
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            findings.append(Text(
                f"スキーマ版 {version} はこの Kanmon が扱える版 ({SCHEMA_VERSION}) より新しいです(Kanmon を更新してください)",
                f"schema version {version} is newer than this Kanmon knows ({SCHEMA_VERSION}); upgrade Kanmon"))
        elif version == 0:
            findings.append(Text("スキーマ版が 0 です(端末の表が作られていません)",
                                 "schema version is 0 (the device tables were never created)"))
        else:
            missing = schema_problems(db)
            if missing:
                findings.append(Text("表がありません: " + ", ".join(missing), "tables are missing: " + ", ".join(missing)))
            else:
                rows = db.execute("SELECT * FROM devices ORDER BY device_id").fetchall()
                for row in rows:
                    parsed = _parse_row(row)
                    if isinstance(parsed, BadRow):
                        findings.append(Text(f"端末 {parsed.device_id!r} の行を読めません: {parsed.reason}",
                                             f"the row of device {parsed.device_id!r} does not parse: {parsed.reason}"))
    except sqlite3.DatabaseError as exc:
        findings.append(Text(f"データベースが壊れています: {exc}", f"the database is corrupt: {exc}"))
    finally:
        db.close()
    return findings


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.registry.factory import registry_url_of

    cfg = load_config_or_exit(args.config)
    if registry_url_of(cfg) is not None:
        print(Text("この設定は PostgreSQL の端末レジストリを使っています。`registry check` は SQLite ファイルだけを診断します",
                   "this configuration uses a PostgreSQL registry; `registry check` diagnoses the SQLite file only")
              .render(), file=sys.stderr)
        return EXIT_USAGE
    path = Path(cfg.registry_path)
    from gateway.registry.sqlite import created_marker

    if not path.exists() and created_marker(path).exists():
        print(Text(f"端末レジストリ {path} がありません。以前は存在していました({created_marker(path)}): 削除または移動されています",
                   f"the device registry {path} is missing although one existed ({created_marker(path)}): "
                   "it was deleted or moved").render())
        return EXIT_FAIL
    if not path.exists():
        print(Text(f"端末レジストリ {path} がありません(まだ作成されていません)",
                   f"there is no device registry at {path} (not created yet)").render(), file=sys.stderr)
        return EXIT_USAGE
    findings = check_registry(path)
    for finding in findings:
        print(f"{path}: {finding.render()}")
    if findings:
        print(Text(f"問題が {len(findings)} 件見つかりました", f"{len(findings)} problem(s) found").render(), file=sys.stderr)
        return EXIT_FAIL
    print(Text(f"端末レジストリに問題はありません: {path}", f"the device registry is sound: {path}").render())
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    registry = subparsers.add_parser("registry", help="device registry tools / 端末レジストリの診断")
    sub = registry.add_subparsers(dest="registry_command", required=True)
    p = sub.add_parser("check", help="diagnose the registry file without changing it / レジストリを変更せずに診断")
    add_config_argument(p, help="gateway configuration (for the state directory)")
    p.set_defaults(func=cmd_check)
