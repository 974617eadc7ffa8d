"""The monthly review and the incident report from the log directory: the one code path of
`kanmon report review|incident` and the console's reports page (issue #21). Inputs are
checked here (a bad one raises ``ReportInputError`` with a bilingual text); the caller writes
the HTML where it wants (a file for the CLI, a download for the console)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.i18n import Text
from gateway.reports.charts import ChartMaker, find_cjk_font
from gateway.reports.compare import previous_month
from gateway.reports.evidence import parse_approved_lines
from gateway.reports.flash import FactsError, check_facts
from gateway.reports.html import render_incident, render_review
from gateway.reports.incident import build_incident
from gateway.reports.model import IncidentFacts
from gateway.reports.review import build_review, expiring_rules_from, parse_month
from gateway.reports.sources import expiring_policy_rules, has_log_files, stream_records

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


class ReportInputError(Exception):
    def __init__(self, text: Text):
        super().__init__(text.en)
        self.text = text


def zone_of(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ReportInputError(BAD_ZONE.format(value=name)) from None


def parse_time(option: str, value: str | None, zone: tzinfo) -> datetime | None:
    """ISO 8601 date or date-time; without an offset it is taken in ``zone``."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ReportInputError(BAD_TIME.format(option=option, value=value)) from None
    return moment.replace(tzinfo=zone) if moment.tzinfo is None else moment


def log_dir(value: str | Path) -> Path:
    directory = Path(value)
    if not directory.is_dir():
        raise ReportInputError(NO_LOG_DIR.format(path=value))
    if not has_log_files(directory):
        raise ReportInputError(NO_LOG_FILES.format(path=value))
    return directory


def approved_lines(value: str | Path):
    """The --approved-lines YAML: {group: [network, ...]} (gateway/reports/evidence.py)."""
    import yaml
    try:
        return parse_approved_lines(yaml.safe_load(Path(value).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        raise ReportInputError(BAD_LINES.format(path=value, error=exc)) from None


def charts(on_english_only: Any = None) -> ChartMaker:
    """Charts with a CJK font when one is installed; ``on_english_only()`` is called otherwise."""
    family = find_cjk_font()
    if family is None and on_english_only is not None:
        on_english_only()
    return ChartMaker(family)


@dataclass(frozen=True)
class ReviewInputs:
    month: str
    tz: str
    zone: tzinfo
    start: datetime
    end: datetime
    directory: Path
    expiring_days: int


def review_inputs(month: str, tz: str, expiring_days: int, logs: str | Path) -> ReviewInputs:
    zone = zone_of(tz)
    try:
        start, end = parse_month(month, zone)
    except ValueError:
        raise ReportInputError(BAD_MONTH.format(value=month)) from None
    if expiring_days < 0:
        raise ReportInputError(BAD_DAYS)
    return ReviewInputs(month, tz, zone, start, end, log_dir(logs), expiring_days)


def review_html(inputs: ReviewInputs, now: datetime, chart_maker: Callable[[], ChartMaker], policy: Path | None = None,
                approved: Any = None) -> str:
    """The monthly review with last month beside it. SourceErrors: the policy is invalid;
    ReportInputError: no record in the month. ``chart_maker()`` is called only to render."""
    expiring = None
    if policy is not None:
        infos, policy_zone = expiring_policy_rules(Path(policy), now, inputs.expiring_days)
        expiring = expiring_rules_from(infos, now.astimezone(policy_zone).date())
    report = build_review(inputs.month, inputs.start, inputs.end, inputs.tz,
                          stream_records(inputs.directory, inputs.start, inputs.end),
                          generated_at=now, expiring_rules=expiring, expiring_days=inputs.expiring_days,
                          approved_lines=approved)
    if sum(c.count for c in report.records_by_stream) == 0:
        raise ReportInputError(NO_RECORDS_MONTH.format(month=inputs.month, path=inputs.directory))
    # Last month beside this month (issue #18): the same review of the month before, from
    # its own records (none: zeros, which is what that month logged).
    last = previous_month(inputs.month)
    try:
        last_start, last_end = parse_month(last, inputs.zone)
    except ValueError:          # 1970-01 has no month before it in the log's time
        return render_review(report, chart_maker())
    previous = build_review(last, last_start, last_end, inputs.tz,
                            stream_records(inputs.directory, last_start, last_end),
                            generated_at=now, approved_lines=approved)
    return render_review(dataclasses.replace(report, previous=previous), chart_maker())


@dataclass(frozen=True)
class IncidentInputs:
    device: str
    zone: tzinfo
    since: datetime
    until: datetime
    limit: int
    facts: IncidentFacts


def incident_inputs(device: str, since: str, until: str | None, tz: str, limit: int, now: datetime,
                    facts: dict[str, Any]) -> IncidentInputs:
    """``facts``: the IPA 9.5 fields the operator states (category, level, phase, cause,
    background, prevention, reporter, responsible, detected), all optional."""
    zone = zone_of(tz)
    since_at = parse_time("--since", since, zone)
    until_at = parse_time("--until", until, zone) or now
    if since_at is None or since_at >= until_at:
        raise ReportInputError(BAD_RANGE)
    if limit < 1:
        raise ReportInputError(BAD_LIMIT)
    try:
        checked = check_facts(IncidentFacts(
            category=facts.get("category"), level=facts.get("level"), phase=facts.get("phase"),
            cause=facts.get("cause"), background=facts.get("background"), prevention=facts.get("prevention"),
            reporter=facts.get("reporter"), responsible=facts.get("responsible"),
            detected_at=parse_time("--detected", facts.get("detected"), zone)))
    except FactsError as exc:
        raise ReportInputError(exc.text) from None
    return IncidentInputs(device, zone, since_at, until_at, limit, checked)


def incident_html(inputs: IncidentInputs, directory: Path, now: datetime, chart_maker: Callable[[], ChartMaker]) -> str:
    report = build_incident(inputs.device, inputs.since.astimezone(inputs.zone), inputs.until.astimezone(inputs.zone),
                            stream_records(directory, inputs.since, inputs.until, device=inputs.device),
                            generated_at=now, limit=inputs.limit, facts=inputs.facts)
    if sum(c.count for c in report.records_by_stream) == 0:
        raise ReportInputError(UNKNOWN_DEVICE.format(device=inputs.device, since=inputs.since.isoformat()))
    return render_incident(report, chart_maker())
