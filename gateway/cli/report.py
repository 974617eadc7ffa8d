"""``kanmon report review|incident``: the monthly log review and the incident flash report
as self-contained HTML files (IPA SME sample regulations 技術的対策 3.3, 3.8.5, 3.8.6)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.cli.common import EXIT_OK, EXIT_USAGE, error
from gateway.i18n import Text
from gateway.yamlsource import SourceErrors

from gateway.reports.charts import ChartMaker, find_cjk_font
from gateway.reports.compare import previous_month
from gateway.reports.flash import FactsError, check_facts
from gateway.reports.model import IncidentFacts
from gateway.reports.html import render_incident, render_review
from gateway.reports.evidence import parse_approved_lines
from gateway.reports.incident import build_incident
from gateway.reports.review import build_review, expiring_rules_from, parse_month
from gateway.reports.sources import expiring_policy_rules, has_log_files, stream_records, write_atomically


NO_LOG_DIR = Text("ログディレクトリがありません: {path}", "log directory does not exist: {path}")
NO_LOG_FILES = Text("ログディレクトリにログファイルがありません: {path}", "no log files in the log directory: {path}")
BAD_MONTH = Text("--month は YYYY-MM 形式で指定してください（例 2026-01）: {value!r}",
                 "--month must be YYYY-MM (e.g. 2026-01): {value!r}")
BAD_ZONE = Text("タイムゾーンが不明です: {value!r}（例 Asia/Tokyo、UTC）", "unknown time zone: {value!r} (e.g. Asia/Tokyo, UTC)")
BAD_TIME = Text("{option} の日時を解釈できません: {value!r}（ISO 8601 形式、例 2026-01-31T09:00:00+09:00）",
                "cannot parse {option}: {value!r} (use ISO 8601, e.g. 2026-01-31T09:00:00+09:00)")
BAD_RANGE = Text("--since は --until より前にしてください", "--since must be before --until")
BAD_LIMIT = Text("--limit は 1 以上にしてください", "--limit must be at least 1")
BAD_LINES = Text("--approved-lines のファイルを読めません: {path}: {error}",
                 "cannot read the --approved-lines file: {path}: {error}")
BAD_DAYS = Text("--expiring-days は 0 以上にしてください", "--expiring-days must be 0 or more")
NO_RECORDS_MONTH = Text("{month} のログレコードがありません（{path}）", "no log records for {month} in {path}")
UNKNOWN_DEVICE = Text("端末 {device} のログレコードが {since} 以降にありません（端末 ID を確認してください）",
                      "no log records for device {device} since {since} (check the device id)")
BAD_POLICY = Text("ポリシーファイルに誤りがあります:", "the policy file is invalid:")
NO_OUT_DIR = Text("出力先のディレクトリがありません: {path}", "output directory does not exist: {path}")
WRITE_FAILED = Text("レポートを書き込めません: {path}: {error}", "cannot write the report: {path}: {error}")
WROTE = Text("レポートを作成しました: {path}", "report written: {path}")
ENGLISH_CHARTS = Text("CJK フォントがないため、グラフの文字は英語のみです（fonts-noto-cjk を導入してください）",
                      "no CJK font installed: chart labels are English only (install fonts-noto-cjk)")


class _InputError(Exception):
    def __init__(self, text: Text):
        super().__init__(text.en)
        self.text = text


def _zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _InputError(BAD_ZONE.format(value=name)) from None


def _time(option: str, value: str | None, zone: tzinfo) -> datetime | None:
    """ISO 8601 date or date-time; without an offset it is taken in ``--tz``."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _InputError(BAD_TIME.format(option=option, value=value)) from None
    return moment.replace(tzinfo=zone) if moment.tzinfo is None else moment


def _log_dir(value: str) -> Path:
    directory = Path(value)
    if not directory.is_dir():
        raise _InputError(NO_LOG_DIR.format(path=value))
    if not has_log_files(directory):
        raise _InputError(NO_LOG_FILES.format(path=value))
    return directory


def _approved_lines(value: str):
    """The --approved-lines YAML: {group: [network, ...]} (gateway/reports/evidence.py)."""
    import yaml
    try:
        return parse_approved_lines(yaml.safe_load(Path(value).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        raise _InputError(BAD_LINES.format(path=value, error=exc)) from None


def _out_path(value: str) -> Path:
    out = Path(value)
    if not out.parent.is_dir():
        raise _InputError(NO_OUT_DIR.format(path=out.parent))
    return out


def _charts() -> ChartMaker:
    family = find_cjk_font()
    if family is None:
        print(ENGLISH_CHARTS.render(), file=sys.stderr)
    return ChartMaker(family)


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
    zone = _zone(args.tz)
    try:
        start, end = parse_month(args.month, zone)
    except ValueError:
        raise _InputError(BAD_MONTH.format(value=args.month)) from None
    if args.expiring_days < 0:
        raise _InputError(BAD_DAYS)
    directory = _log_dir(args.logs)
    out = _out_path(args.out)
    now = args.now() if getattr(args, "now", None) else datetime.now(UTC)
    expiring = None
    if args.policy:
        try:
            infos, policy_zone = expiring_policy_rules(Path(args.policy), now, args.expiring_days)
        except SourceErrors as exc:
            print(BAD_POLICY.render(), file=sys.stderr)
            for err in exc.errors:
                print(f"  {err}", file=sys.stderr)
            return EXIT_USAGE
        expiring = expiring_rules_from(infos, now.astimezone(policy_zone).date())
    approved = _approved_lines(args.approved_lines) if getattr(args, "approved_lines", None) else None
    report = build_review(args.month, start, end, args.tz, stream_records(directory, start, end),
                          generated_at=now, expiring_rules=expiring, expiring_days=args.expiring_days,
                          approved_lines=approved)
    if sum(c.count for c in report.records_by_stream) == 0:
        raise _InputError(NO_RECORDS_MONTH.format(month=args.month, path=directory))
    # Last month beside this month (issue #18): the same review of the month before, from
    # its own records (none: zeros, which is what that month logged).
    last = previous_month(args.month)
    try:
        last_start, last_end = parse_month(last, zone)
    except ValueError:          # 1970-01 has no month before it in the log's time
        return _write(out, render_review(report, _charts()))
    previous = build_review(last, last_start, last_end, args.tz, stream_records(directory, last_start, last_end),
                            generated_at=now, approved_lines=approved)
    report = dataclasses.replace(report, previous=previous)
    return _write(out, render_review(report, _charts()))


def _incident(args: argparse.Namespace) -> int:
    zone = _zone(args.tz)
    since = _time("--since", args.since, zone)
    now = args.now() if getattr(args, "now", None) else datetime.now(UTC)
    until = _time("--until", args.until, zone) or now
    if since >= until:
        raise _InputError(BAD_RANGE)
    if args.limit < 1:
        raise _InputError(BAD_LIMIT)
    facts = _facts(args, zone)
    directory = _log_dir(args.logs)
    out = _out_path(args.out)
    report = build_incident(args.device, since.astimezone(zone), until.astimezone(zone),
                            stream_records(directory, since, until, device=args.device),
                            generated_at=now, limit=args.limit, facts=facts)
    if sum(c.count for c in report.records_by_stream) == 0:
        raise _InputError(UNKNOWN_DEVICE.format(device=args.device, since=since.isoformat()))
    return _write(out, render_incident(report, _charts()))


def _facts(args: argparse.Namespace, zone: tzinfo) -> IncidentFacts:
    """The IPA 9.5 fields the operator states (all optional: blank on the printed form)."""
    try:
        return check_facts(IncidentFacts(
            category=getattr(args, "category", None), level=getattr(args, "level", None),
            phase=getattr(args, "phase", None), cause=getattr(args, "cause", None),
            background=getattr(args, "background", None), prevention=getattr(args, "prevention", None),
            reporter=getattr(args, "reporter", None), responsible=getattr(args, "responsible", None),
            detected_at=_time("--detected", getattr(args, "detected", None), zone)))
    except FactsError as exc:
        raise _InputError(exc.text) from None


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
