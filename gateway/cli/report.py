"""``kanmon report review|incident``: the monthly log review and the incident flash report
as self-contained HTML files (IPA SME sample regulations 技術的対策 3.3, 3.8.5, 3.8.6)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from gateway.cli.common import EXIT_OK, EXIT_USAGE, error
from gateway.i18n import Text
from gateway.yamlsource import SourceErrors

from gateway.reports.generate import (BAD_DAYS, BAD_LIMIT, BAD_LINES, BAD_MONTH, BAD_RANGE, BAD_TIME,  # noqa: F401
                                      BAD_ZONE, NO_LOG_DIR, NO_LOG_FILES, NO_RECORDS_MONTH, UNKNOWN_DEVICE,
                                      ReportInputError, approved_lines, charts, incident_html, incident_inputs, log_dir,
                                      parse_time, review_html, review_inputs, zone_of)
from gateway.reports.sources import write_atomically


BAD_POLICY = Text("ポリシーファイルに誤りがあります:", "the policy file is invalid:")
NO_OUT_DIR = Text("出力先のディレクトリがありません: {path}", "output directory does not exist: {path}")
WRITE_FAILED = Text("レポートを書き込めません: {path}: {error}", "cannot write the report: {path}: {error}")
WROTE = Text("レポートを作成しました: {path}", "report written: {path}")
ENGLISH_CHARTS = Text("CJK フォントがないため、グラフの文字は英語のみです（fonts-noto-cjk を導入してください）",
                      "no CJK font installed: chart labels are English only (install fonts-noto-cjk)")


_InputError = ReportInputError      # the shared code path: gateway/reports/generate.py (issue #21)
_zone = zone_of
_time = parse_time
_log_dir = log_dir
_approved_lines = approved_lines


def _out_path(value: str) -> Path:
    out = Path(value)
    if not out.parent.is_dir():
        raise _InputError(NO_OUT_DIR.format(path=out.parent))
    return out


def _charts():
    return charts(lambda: print(ENGLISH_CHARTS.render(), file=sys.stderr))


def _write(out: Path, html: str) -> int:
    try:
        write_atomically(out, html)
    except OSError as exc:
        return error(WRITE_FAILED.format(path=out, error=exc))
    print(WROTE.format(path=out).render())
    return EXIT_OK


def _run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return body(args)
    except _InputError as exc:
        return error(exc.text)


def _review(args: argparse.Namespace) -> int:
    inputs = review_inputs(args.month, args.tz, args.expiring_days, args.logs)
    out = _out_path(args.out)
    now = args.now() if getattr(args, "now", None) else datetime.now(UTC)
    approved = _approved_lines(args.approved_lines) if getattr(args, "approved_lines", None) else None
    try:
        html = review_html(inputs, now, _charts, Path(args.policy) if args.policy else None, approved)
    except SourceErrors as exc:
        print(BAD_POLICY.render(), file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return EXIT_USAGE
    return _write(out, html)


def _incident(args: argparse.Namespace) -> int:
    now = args.now() if getattr(args, "now", None) else datetime.now(UTC)
    facts = {name: getattr(args, name, None) for name in ("category", "level", "phase", "cause", "background",
                                                          "prevention", "reporter", "responsible", "detected")}
    inputs = incident_inputs(args.device, args.since, args.until, args.tz, args.limit, now, facts)
    directory = _log_dir(args.logs)
    out = _out_path(args.out)
    return _write(out, incident_html(inputs, directory, now, _charts))


def cmd_review(args: argparse.Namespace) -> int:
    return _run(_review, args)


def cmd_incident(args: argparse.Namespace) -> int:
    return _run(_incident, args)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    report = subparsers.add_parser("report", help="monthly review and incident reports (HTML) / 月次レビュー・インシデント速報")
    sub = report.add_subparsers(dest="report_command", required=True)

    p = sub.add_parser("review", help="monthly log review (IPA 3.8.5) / 月次ログレビュー")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--logs", required=True, help="log directory / ログディレクトリ")
    p.add_argument("--out", required=True, help="HTML file to write / 出力する HTML ファイル")
    p.add_argument("--policy", help="policy file, to list rules that expire soon / 期限の近いルールを表示するポリシー")
    p.add_argument("--expiring-days", type=int, default=30, metavar="N",
                   help="rules expiring within N days (default 30) / N 日以内に期限切れ")
    p.add_argument("--tz", default="UTC", help="time zone of the month and its days, e.g. Asia/Tokyo (default UTC)")
    p.add_argument("--approved-lines", metavar="FILE",
                   help="YAML {group: [network, ...]}: outer networks approved per group; tunnel sessions from "
                        "others are listed / グループごとの承認回線（YAML）")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("incident", help="incident flash report for one device (IPA 3.3) / 端末のインシデント速報")
    p.add_argument("--device", required=True, help="device id / 端末 ID")
    p.add_argument("--since", required=True, help="ISO 8601 (in --tz when no offset)")
    p.add_argument("--until", help="ISO 8601, exclusive (default now)")
    p.add_argument("--logs", required=True, help="log directory / ログディレクトリ")
    p.add_argument("--out", required=True, help="HTML file to write / 出力する HTML ファイル")
    p.add_argument("--limit", type=int, default=200, help="rows per table (newest; default 200)")
    p.add_argument("--tz", default="UTC", help="time zone for times without an offset and for display (default UTC)")
    # IPA 組織的対策 9.5 fields a person states; left blank on the printed form when not given.
    p.add_argument("--category", help="区分 / classification: leak | tamper | virus (IPA 9.4)")
    p.add_argument("--level", help="事故レベル / accident level 0-3 (IPA 9.4)")
    p.add_argument("--phase", help="discovery | initial | investigation | recovery | final (IPA 9.4 ①-⑤)")
    p.add_argument("--reporter", help="報告者 / who reports")
    p.add_argument("--responsible", help="責任者・担当者 / person responsible and in charge")
    p.add_argument("--cause", help="想定される原因 / presumed cause")
    p.add_argument("--background", help="原因発生の背景 / background of the cause")
    p.add_argument("--prevention", help="再発防止策 / measures against recurrence")
    p.add_argument("--detected", help="発覚日時 / when it was found, ISO 8601 (default: from the logs)")
    p.set_defaults(func=cmd_incident)
