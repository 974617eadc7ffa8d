"""``kanmon logs ...``: verify, search and purge a log directory."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_FAIL, EXIT_OK, error
from gateway.i18n import Text

from gateway.logstore.anchor import ANCHOR_SUBDIR
from gateway.logstore.fields import json_default
from gateway.logstore.layout import STREAMS
from gateway.logstore.query import BAD_RANGE, BAD_TIME, BAD_ZONE  # noqa: F401  (shared with the console)
from gateway.logstore.query import local_time as _local_time, parse_time as _parse_time, target_of, zone_of as _zone
from gateway.logstore.retention import DEFAULT_RETENTION_DAYS, purge, retention_cutoff
from gateway.logstore.search import search
from gateway.logstore.verify import verify


NO_DIRECTORY = Text("ログディレクトリがありません: {path}", "log directory does not exist: {path}")
BAD_LIMIT = Text("--limit は 0（制限なし）以上にしてください", "--limit must be 0 (no limit) or more")
BAD_RETENTION = Text("--retention-days は 1 以上にしてください", "--retention-days must be at least 1")
VERIFY_OK = Text("改ざんは検出されませんでした（{files} ファイル、{records} レコード）",
                 "no tampering found ({files} files, {records} records)")
UNANCHORED = Text("注意: チェックポイントの検証鍵がありません ({anchor})。最新ファイルの削除・切り詰め・追記は検出できません",
                  "note: no checkpoint key in {anchor}: deleting, truncating or extending the newest file cannot be detected")
VERIFY_NOTICES = Text("注意 {count} 件（改ざんではありません）", "{count} notice(s) (not tampering)")
VERIFY_BAD = Text("改ざんまたは欠落を検出しました: {count} 件（{files} ファイル、{records} レコード）",
                  "tampering or loss detected: {count} finding(s) ({files} files, {records} records)")
PURGE_WOULD = Text("削除予定（--dry-run）: {path}", "would remove (--dry-run): {path}")
PURGE_DID = Text("削除しました: {path}", "removed: {path}")
PURGE_SUMMARY = Text("保存期間 {days} 日、基準日時 {cutoff}: {removed} ファイル（{bytes} バイト）を{verb}、{kept} ファイルを保持",
                     "retention {days} days, cutoff {cutoff}: {verb_en} {removed} file(s) ({bytes} bytes), kept {kept}")
SEARCH_PROBLEMS = Text("読めない行またはファイルが {count} 件ありました（`kanmon logs verify` で確認してください）",
                       "{count} unreadable line(s) or file(s) were skipped (check with `kanmon logs verify`)")
SEARCH_COUNT = Text("{count} 件", "{count} record(s)")


def _directory(args: argparse.Namespace) -> Path | None:
    path = Path(args.dir)
    return path if path.is_dir() else None


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _directory(args)
    if directory is None:
        return error(NO_DIRECTORY.format(path=args.dir))
    streams = tuple(args.stream) if args.stream else STREAMS
    anchor_dir = Path(args.anchor_dir) if args.anchor_dir else directory.resolve().parent / ANCHOR_SUBDIR
    report = verify(directory, streams, anchor_dir=anchor_dir)
    if args.json:
        for finding in report.findings:
            print(json.dumps({"kind": finding.kind, "file": str(finding.path), "line": finding.line,
                              "tamper": finding.tamper, "ja": finding.detail.ja, "en": finding.detail.en},
                             ensure_ascii=False))
    else:
        for finding in report.findings:
            print(finding.render())
    tampers = [f for f in report.findings if f.tamper]
    notices = len(report.findings) - len(tampers)
    out = sys.stderr if args.json else sys.stdout
    if not report.anchored:
        print(UNANCHORED.format(anchor=anchor_dir).render(), file=out)
    for note in report.notes:
        print(note.render(), file=out)
    if notices:
        print(VERIFY_NOTICES.format(count=notices).render(), file=out)
    if tampers:
        print(VERIFY_BAD.format(count=len(tampers), files=report.files, records=report.records).render(), file=out)
        return EXIT_FAIL
    print(VERIFY_OK.format(files=report.files, records=report.records).render(), file=out)
    return EXIT_OK


def _summary_line(record: dict[str, Any], zone: tzinfo = UTC) -> str:
    def get(name: str) -> str:
        value = record.get(name)
        return "-" if value is None else str(value)
    return "\t".join([_local_time(record.get("@timestamp"), zone), get("device.id"), get("source.ip"), get("user.name"),
                      get("kanmon.verdict"), get("rule.id"), target_of(record)])


def cmd_search(args: argparse.Namespace) -> int:
    directory = _directory(args)
    if directory is None:
        return error(NO_DIRECTORY.format(path=args.dir))
    zone = _zone(getattr(args, "tz", None))
    if zone is None:
        return error(BAD_ZONE.format(zone=args.tz))
    try:
        since = _parse_time("--since", args.since, zone)
        until = _parse_time("--until", args.until, zone)
    except ValueError as exc:
        return error(exc.args[0])
    if since and until and since >= until:
        return error(BAD_RANGE)
    if args.limit < 0:
        return error(BAD_LIMIT)
    count = 0
    problems: list[str] = []

    def report(path: Path, line: int | None, text: Text) -> None:   # file:line, carry on
        where = f"{path}:{line}" if line is not None else str(path)
        problems.append(where)
        print(f"{where}: {text.render()}", file=sys.stderr)

    try:
        for record in search(directory, args.stream, since, until, device=args.device,
                             rule=args.rule, verdict=args.verdict, on_problem=report):
            if args.json:
                sys.stdout.write(json.dumps(record, ensure_ascii=False, separators=(",", ":"),
                                            default=json_default) + "\n")
            else:
                sys.stdout.write(_summary_line(record, zone) + "\n")
            count += 1
            if args.limit and count >= args.limit:
                break
        sys.stdout.flush()
    except BrokenPipeError:       # `kanmon logs search ... | head`
        return EXIT_OK
    print(SEARCH_COUNT.format(count=count).render(), file=sys.stderr)
    if problems:
        print(SEARCH_PROBLEMS.format(count=len(problems)).render(), file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    directory = _directory(args)
    if directory is None:
        return error(NO_DIRECTORY.format(path=args.dir))
    if args.retention_days < 1:
        return error(BAD_RETENTION)
    cutoff = retention_cutoff(args.now() if args.now else datetime.now(UTC), args.retention_days)
    report = purge(directory, cutoff, dry_run=args.dry_run)
    line = PURGE_WOULD if args.dry_run else PURGE_DID
    for path in report.removed:
        print(line.format(path=path).render())
    print(PURGE_SUMMARY.format(
        days=args.retention_days, cutoff=cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"), removed=len(report.removed),
        bytes=report.removed_bytes, kept=report.kept,
        verb="削除予定" if args.dry_run else "削除", verb_en="would remove" if args.dry_run else "removed",
    ).render())
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    logs = subparsers.add_parser("logs", help="verify, search and purge logs / ログの検証・検索・削除")
    sub = logs.add_subparsers(dest="logs_command", required=True)

    p = sub.add_parser("verify", help="check the hash chains; exit 1 on tampering / ハッシュチェーンを検証")
    p.add_argument("--dir", required=True, help="log directory / ログディレクトリ")
    p.add_argument("--stream", action="append", choices=STREAMS, help="only this stream (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per finding")
    p.add_argument("--anchor-dir", help="signed checkpoints (default: log-anchor beside the log directory) / "
                                        "チェックポイントのディレクトリ")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("search", help="stream matching records / 条件に合うレコードを出力")
    p.add_argument("--dir", required=True, help="log directory / ログディレクトリ")
    p.add_argument("--stream", required=True, choices=STREAMS)
    p.add_argument("--device", help="device.id")
    p.add_argument("--rule", help="rule.id")
    p.add_argument("--verdict", help="kanmon.verdict (allow, block, monitor, no-inspect, tenant-restrict)")
    p.add_argument("--since", help="ISO 8601, inclusive (in --tz when no offset)")
    p.add_argument("--until", help="ISO 8601, exclusive (in --tz when no offset)")
    p.add_argument("--tz", metavar="ZONE", help="IANA time zone (e.g. Asia/Tokyo) for the printed times and for "
                                               "--since/--until without an offset (default UTC; --json stays UTC) / "
                                               "表示と --since/--until のタイムゾーン")
    p.add_argument("--limit", type=int, default=0, help="stop after N records")
    p.add_argument("--json", action="store_true", help="JSON Lines output")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("purge", help="remove files older than the retention / 保存期間を過ぎたファイルを削除")
    p.add_argument("--dir", required=True, help="log directory / ログディレクトリ")
    p.add_argument("--retention-days", type=int, default=DEFAULT_RETENTION_DAYS,
                   help=f"default {DEFAULT_RETENTION_DAYS} (3 years, IPA SME sample 技術的対策 3.8.3)")
    p.add_argument("--dry-run", action="store_true", help="list, do not remove / 一覧のみ")
    p.set_defaults(func=cmd_purge, now=None)      # now: clock injected by tests
