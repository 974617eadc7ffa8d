"""Report model -> one self-contained HTML page (inline CSS, charts as data: URIs), in
Japanese and English. Pure: no file or network I/O.

Written with the standard library's ``html.escape`` rather than a template engine: the
pages are a header and a few tables and charts, and every value passes through ``_e``."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape

from gateway.hostname import normalize_host
from gateway.i18n import Text

from .charts import ALT_COLOUR, ChartMaker
from .compare import beside, change_text
from .flash import GUIDELINE_9_5
from .labels import (AUDIT_ACTIONS, AUTH_FAILURE_WORDS, CATEGORIES, REVOKE_REASONS, DEVICE_STATUS, EVENT_ACTIONS, FIREWALL_REASONS,
                     INCIDENT_CATEGORIES,
                     INCIDENT_LEVELS, INCIDENT_PHASES, MAIL_INDICATORS, MAIL_VERDICTS, NONE_TEXT, OUTCOMES, STREAMS,
                     TUNNEL_EVENTS, VERDICTS, label)
from .model import NONE_KEY, AuditAction, Count, EventRow, IncidentReport, ReviewReport

CSS = """
body{font-family:"Noto Sans CJK JP","Noto Sans JP","Hiragino Sans","Yu Gothic",Meiryo,sans-serif;
 margin:2em auto;max-width:1100px;color:#222;line-height:1.5;padding:0 1em}
h1{font-size:1.6em;border-bottom:3px solid #b03a2e;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:2em;border-left:6px solid #b03a2e;padding-left:.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3ece9} td.n{text-align:right;font-variant-numeric:tabular-nums}
.en{color:#555} .note{color:#555;font-size:.9em} .empty{color:#777;font-style:italic}
.warn{color:#b03a2e;font-weight:bold} img{max-width:100%;display:block;margin:.5em 0}
code{background:#f4f4f4;padding:0 .2em} code.code{font-size:.75em;color:#666;margin-left:.4em}
td.up{color:#b03a2e} td.down{color:#1e6b3a} .quote{border-left:4px solid #ccc;margin:.6em 0;padding:.2em .8em;color:#333}
table.form{width:100%} table.form th{width:22%} table.form td.blank{height:3.2em}
.signoff{border:2px solid #b03a2e;padding:.6em 1em;margin-top:1em;break-inside:avoid;page-break-inside:avoid}
@media print{
 @page{size:A4;margin:15mm 12mm}
 body{margin:0;max-width:none;font-size:10pt;color:#000}
 h1{font-size:15pt} h2{font-size:12pt;break-after:avoid;page-break-after:avoid}
 section{break-inside:auto} table,img{break-inside:avoid;page-break-inside:avoid} tr{break-inside:avoid}
 img{max-width:80%} .en{color:#333} th{background:#eee !important;-webkit-print-color-adjust:exact;print-color-adjust:exact}
 #sign-off,#report-form{break-before:page;page-break-before:always}
 a{color:#000;text-decoration:none}
}
"""

NOTHING = Text("該当なし", "nothing to report")
# Words for codes live in labels.py (one place, to move to the message catalogue as a whole).
STREAM_NAMES = STREAMS
ACTION_NAMES = AUDIT_ACTIONS


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _t(text: Text) -> str:
    return f'<span lang="ja">{_e(text.ja)}</span> / <span lang="en" class="en">{_e(text.en)}</span>'


def _key(key: str, words: Mapping[str, Text] | None = None, show_code: bool = True, open_codes: bool = False) -> str:
    """A counted key: the words for it when ``words`` names it (with the code in small
    print, to search the logs by), else the value itself. ``open_codes``: a code the table
    does not know (a category the policy names itself) is shown as written, not as unknown."""
    if key == NONE_KEY:
        return _t(NONE_TEXT)
    if words is not None and open_codes and key not in words:
        return _e(key)
    if words is not None:
        code = f'<code class="code">{_e(key)}</code>' if show_code else ""
        return f'{_t(label(words, key))}{code}'
    return _e(key)


def _time(moment: datetime | None, zone=None) -> str:
    if moment is None:
        return "-"
    if zone is not None:
        moment = moment.astimezone(zone)
    return moment.strftime("%Y-%m-%d %H:%M:%S %z")


def _section(anchor: str, title: Text, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_t(title)}</h2>\n{body}\n</section>\n'


def _table(headers: Sequence[Text], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    rows = list(rows)
    if not rows:
        return f'<p class="empty">{_t(NOTHING)}</p>'
    head = "".join(f"<th>{_t(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(_cell(i, c, numeric) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


LAST_MONTH = Text("先月", "last month")
CHANGE = Text("増減", "change")


def _cell(index: int, cell: str | tuple[str, str], numeric: Sequence[int]) -> str:
    if isinstance(cell, tuple):          # (css class, content)
        return f'<td class="{cell[0]}">{cell[1]}</td>'
    return f'<td class="n">{cell}</td>' if index in numeric else f"<td>{cell}</td>"


def _counts(headers: Sequence[Text], counts: Sequence[Count], last: Sequence[Count] | None = None, *,
            top: int | None = None, words: Mapping[str, Text] | None = None, show_code: bool = True,
            open_codes: bool = False) -> str:
    """A table of counts; with ``last`` (the previous month's table) two more columns, last
    month and the change. ``top``: both are top-N tables; a key missing from last month's
    full top-N table has an unknown count there (compare.beside)."""
    if last is None:
        return _table(headers, ([_key(c.key, words, show_code, open_codes), f"{c.count:,}"] for c in counts), numeric=(1,))
    rows = []
    complete = top is None or len(last) < top
    for row in beside(counts, last, complete=complete):
        change = row.change
        css = "n up" if change and change > 0 else ("n down" if change and change < 0 else "n")
        rows.append([_key(row.key, words, show_code, open_codes), f"{row.this:,}", "?" if row.last is None else f"{row.last:,}",
                     (css, change_text(row))])
    return _table([*headers, LAST_MONTH, CHANGE], rows, numeric=(1, 2))


def _img(png: bytes, alt: Text) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt.ja + " / " + alt.en)}">'


def _page(title: Text, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"ja\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title.ja)} / {_e(title.en)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{_t(title)}</h1>\n{body}</body>\n</html>\n")


def _chart_label(charts: ChartMaker, key: str, words: Mapping[str, Text] | None) -> str:
    if words is None or key not in words:
        return key
    return words[key].ja if charts.cjk_family else words[key].en


def _host_label(charts: ChartMaker, host: str) -> str:
    """A destination on a chart: as written with a CJK font, else its ASCII (punycode) form, so a
    Japanese domain name is never drawn as boxes (the table under the chart keeps the Unicode form)."""
    if charts.cjk_family or host.isascii():
        return host
    try:
        return normalize_host(host)
    except Exception:   # not a host name: shown escaped rather than as boxes
        return host.encode("ascii", "backslashreplace").decode("ascii")


def _chart_counts(charts: ChartMaker, title: Text, counts: Sequence[Count], limit: int = 15,
                  words: Mapping[str, Text] | None = None) -> str:
    if not counts:
        return ""
    shown = counts[:limit]
    labels = [f"{NONE_TEXT.ja} {NONE_TEXT.en}" if charts.cjk_family and c.key == NONE_KEY
              else (NONE_TEXT.en if c.key == NONE_KEY else _chart_label(charts, c.key, words)) for c in shown]
    return _img(charts.bars(title, labels, [c.count for c in shown]), title)


# ---- review ------------------------------------------------------------------------------

HEADLINE: dict[str, Text] = {
    **{f"records-{k}": Text(f"レコード数: {v.ja}", f"records: {v.en}") for k, v in STREAMS.items()},
    "blocked": Text("遮断", "blocked"), "auth-failures": Text("認証失敗", "authentication failures"),
    "auth-bursts": Text("認証失敗の集中", "authentication failure bursts"),
    "devices": Text("通信のあった端末", "devices with traffic"), "unusual": Text("通常と異なる端末", "unusual devices"),
    "unknown-sources": Text("登録されていない端末の接続元", "sources of unregistered devices"),
    "status-changes": Text("端末の状態変更", "device status changes"),
    "fw-packets": Text("ファイアウォールで遮断したパケット", "packets dropped by the firewall"),
    "fw-devices": Text("遮断されたパケットを送った端末", "devices with dropped packets"),
    "tunnel-devices": Text("VPN 接続のあった端末", "devices with VPN sessions"),
    "off-line": Text("承認されていない回線からの接続", "sessions from networks not approved"),
}


def headline(report: ReviewReport) -> tuple[Count, ...]:
    """The month's key figures, as counts keyed by HEADLINE (compared month over month)."""
    rows = [Count(f"records-{c.key}", c.count) for c in report.records_by_stream]
    rows += [Count("blocked", report.blocked_total), Count("auth-failures", report.auth_failures),
             Count("auth-bursts", len(report.auth_bursts)), Count("devices", report.devices_seen),
             Count("unusual", len(report.unusual_devices)), Count("unknown-sources", len(report.unknown_device_sources)),
             Count("status-changes", len(report.device_actions))]
    if report.firewall is not None:
        rows += [Count("fw-packets", report.firewall.packets),
                 Count("fw-devices", sum(1 for c in report.firewall.by_source if not c.key.startswith("(")))]
    if report.tunnel is not None:
        rows.append(Count("tunnel-devices", report.tunnel.devices))
        if report.tunnel.off_line is not None:
            rows.append(Count("off-line", len(report.tunnel.off_line)))
    return tuple(rows)


GUIDELINE_3_8_5 = Text(
    "「結果の記録：レビュー結果を記録し、異常が検知された場合は管理者へ報告する。」"
    "（IPA 中小企業の情報セキュリティ対策ガイドライン 付録5 技術的対策 3.8.5 ログのレビュー）",
    "\"Recording the result: record the result of the review and, when an anomaly was found, report it to the "
    "manager.\" (IPA SME guidelines appendix 5, technical measures 3.8.5 log review)")


def sign_off_block() -> str:
    """The printable record of the review: who checked, when, what was found, what was done."""
    blank = ('<td class="blank"></td>')
    rows = "".join(f"<tr><th>{_t(t)}</th>{blank}</tr>" for t in (
        Text("確認者（氏名・所属）", "Reviewer (name, unit)"), Text("確認日", "Date of review"),
        Text("所見", "Findings"), Text("対応", "Action taken")))
    outcome = (f'<p>☐ {_t(Text("異常なし", "no anomaly"))}　　'
               f'☐ {_t(Text("異常あり（管理者へ報告済み: 報告日　　／　　）", "anomaly found (reported to the manager on:    /    )"))}</p>')
    approval = (f'<table class="form"><tr><th>{_t(Text("管理者の確認（署名・日付）", "Manager (signature, date)"))}</th>'
                f'{blank}</tr></table>')
    return (f'<div class="signoff"><blockquote class="quote">{_t(GUIDELINE_3_8_5)}</blockquote>'
            f'<table class="form">{rows}</table>{outcome}{approval}</div>')


def _last(report: ReviewReport, *path: str):
    """The previous month's value at ``path`` (attribute names), () when that month has no
    such table, None when there is no previous month (no comparison columns)."""
    value = report.previous
    if value is None:
        return None
    for name in path:
        value = getattr(value, name, None)
        if value is None:
            return ()
    return value


def render_review(report: ReviewReport, charts: ChartMaker) -> str:
    zone = report.start.tzinfo
    th = report.thresholds
    parts: list[str] = []
    parts.append(f"""<p>{_t(Text("対象期間: {a} から {b} の前まで（{z}）", "Period: {a} up to {b} ({z})").format(
        a=_time(report.start), b=_time(report.end), z=report.timezone))}<br>
{_t(Text("作成日時: {t}", "Generated: {t}").format(t=_time(report.generated_at, zone)))}</p>
<p class="note">{_t(Text(
        "IPA「中小企業の情報セキュリティ対策ガイドライン」付録5 技術的対策 3.8.5 ログのレビュー（認証ログは月1回以上）に基づく月次レビューです。"
        "大量の認証失敗、管理外の接続、許可なく接続された機器、不審な通信を確認し、結果を記録してください。",
        "Monthly log review per IPA SME guidelines appendix 5, technical measures 3.8.5 (authentication logs at "
        "least monthly): look for mass authentication failures, unmanaged connections, unauthorised devices and "
        "suspicious traffic, and record the result."))}</p>""")

    summary = _table([Text("ログ", "stream"), Text("レコード数", "records"), Text("うち遮断", "of which blocked")],
                     ([_t(STREAM_NAMES[c.key]), f"{c.count:,}",
                       f"{next((b.count for b in report.blocked_by_stream if b.key == c.key), 0):,}"
                       if c.key in ("proxy", "conn", "dns", "mail") else "-"]
                      for c in report.records_by_stream), numeric=(1, 2))
    facts = Text("遮断 {b} 件、認証失敗 {f} 件（集中 {n} 回）、通信のあった端末 {d} 台、通常と異なる端末 {u} 台、端末の状態変更 {a} 件",
                 "{b} blocked, {f} authentication failures ({n} bursts), {d} devices with traffic, "
                 "{u} unusual devices, {a} device status changes").format(
        b=f"{report.blocked_total:,}", f=f"{report.auth_failures:,}", n=len(report.auth_bursts),
        d=report.devices_seen, u=len(report.unusual_devices), a=len(report.device_actions))
    parts.append(_section("summary", Text("概要", "Summary"), f"<p>{_t(facts)}</p>\n{summary}"))
    if report.previous is not None:
        parts.append(_section("month-over-month", Text("先月との比較（{m} と {p}）", "This month beside last month ({m} and {p})")
                              .format(m=report.month, p=report.previous.month),
                              f'<p class="note">{_t(Text("各表の「先月」「増減」の列も同じ比較です。「?」は先月の上位に入らなかった項目です。", "The last-month and change columns of the tables below compare the same way; ? marks an entry that was not in last month's top list."))}</p>'
                              + _counts([Text("項目", "item"), Text("今月 {m}", "this month {m}").format(m=report.month)],
                                        headline(report), headline(report.previous), words=HEADLINE, show_code=False)))

    t_cat = Text("カテゴリ別の遮断", "Blocked traffic by category")
    parts.append(_section("blocked-by-category", t_cat,
                          _chart_counts(charts, t_cat, report.blocked_by_category, words=CATEGORIES)
                          + _counts([Text("カテゴリ", "category"), Text("件数", "count")], report.blocked_by_category,
                                    _last(report, "blocked_by_category"), words=CATEGORIES, open_codes=True)))
    t_grp = Text("端末グループ別の遮断", "Blocked traffic by device group")
    parts.append(_section("blocked-by-group", t_grp, _chart_counts(charts, t_grp, report.blocked_by_group)
                          + _counts([Text("グループ", "group"), Text("件数", "count")], report.blocked_by_group,
                                    _last(report, "blocked_by_group"))
                          + f'<p class="note">{_t(Text("複数のグループに属する端末は各グループに数えます。", "A device in several groups counts in each."))}</p>'))
    t_day = Text("日別の遮断", "Blocked traffic per day")
    day_chart = _img(charts.daily(t_day, [d.day for d in report.blocked_by_day], [d.count for d in report.blocked_by_day],
                                  axis=Text("件数", "count")), t_day) if report.blocked_by_day else ""
    parts.append(_section("blocked-by-day", t_day, day_chart + _table(
        [Text("日付", "day"), Text("件数", "count")],
        ([d.day.isoformat(), f"{d.count:,}"] for d in report.blocked_by_day if d.count), numeric=(1,))))
    t_dom = Text("遮断の多い宛先", "Top blocked domains")
    parts.append(_section("top-blocked-domains", t_dom, _chart_counts(charts, t_dom, report.top_blocked_domains)
                          + _counts([Text("宛先", "destination"), Text("件数", "count")], report.top_blocked_domains,
                                    _last(report, "top_blocked_domains"), top=th.top)))
    parts.append(_section("top-blocking-rules", Text("遮断の多いルール", "Top blocking rules"),
                          _counts([Text("ルール ID", "rule id"), Text("件数", "count")], report.top_blocking_rules,
                                  _last(report, "top_blocking_rules"), top=th.top)))

    t_auth = Text("認証失敗（理由別）", "Authentication failures by reason")
    auth_body = (f"<p>{_t(Text('認証 {n} 件のうち失敗 {f} 件', '{f} failures out of {n} authentication events').format(n=f'{report.auth_total:,}', f=f'{report.auth_failures:,}'))}</p>"
                 + _chart_counts(charts, t_auth, report.auth_failures_by_reason, words=AUTH_FAILURE_WORDS)
                 + _counts([Text("理由", "reason"), Text("件数", "count")], report.auth_failures_by_reason,
                           _last(report, "auth_failures_by_reason"), words=AUTH_FAILURE_WORDS)
                 + f"<h3>{_t(Text('接続元別', 'By source'))}</h3>"
                 + _counts([Text("端末または接続元", "device or source address"), Text("件数", "count")],
                           report.auth_failures_by_source, _last(report, "auth_failures_by_source"), top=th.top))
    parts.append(_section("auth-failures", Text("認証失敗", "Authentication failures"), auth_body))
    burst_rule = Text("集中: 同じ接続元から {m} 分以内に {n} 件以上の認証失敗。",
                      "Burst: {n} or more failures from one source within {m} minutes.").format(
        n=th.burst_failures, m=th.burst_minutes)
    parts.append(_section("auth-bursts", Text("認証失敗の集中", "Authentication failure bursts"),
                          f'<p class="note">{_t(burst_rule)}</p>' + _table(
        [Text("端末", "device"), Text("接続元", "source"), Text("利用者", "users"), Text("開始", "start"),
         Text("終了", "end"), Text("失敗数", "failures"), Text("理由", "reasons")],
        ([_e(b.device_id or "-"), _e(b.source_ip or "-"), _e(", ".join(b.users) or "-"), _time(b.start, zone),
          _time(b.end, zone), f'<span class="warn">{b.failures:,}</span>',
          "<br>".join(_key(r, AUTH_FAILURE_WORDS) for r in b.reasons) or "-"]
         for b in report.auth_bursts), numeric=(5,))))

    unusual_rule = Text(
        "通常と異なる端末: プロキシ・通信・DNS のレコード数、または異なる接続先の数が、その月の全端末の中央値の {f:g} 倍以上"
        "（かつ {r} 件以上／{d} か所以上）の端末。「この端末のみ」はほかの端末が接続しなかった宛先の例です。",
        "Unusual device: its proxy+conn+dns records, or its number of distinct destinations, are at least {f:g}x the "
        "month's median over all devices (and at least {r} records / {d} destinations). \"Only this device\" lists "
        "destinations no other device reached.").format(f=th.unusual_factor, r=th.unusual_min_records,
                                                         d=th.unusual_min_destinations)
    parts.append(_section("unusual-devices", Text("通常と異なる接続先・通信量の端末", "Devices with unusual destinations or volumes"),
                          f'<p class="note">{_t(unusual_rule)}</p>' + _table(
        [Text("端末", "device"), Text("利用者", "users"), Text("レコード数", "records"), Text("接続先数", "destinations"),
         Text("理由", "why"), Text("この端末のみ", "only this device")],
        ([_e(u.device_id), _e(", ".join(u.users) or "-"), f"{u.records:,}", f"{u.destinations:,}",
          "<br>".join(_t(r) for r in u.reasons), _e(", ".join(u.only_this_device) or "-")]
         for u in report.unusual_devices), numeric=(2, 3))))
    parts.append(_section("unknown-devices", Text("登録されていない端末からの通信", "Traffic from unregistered devices"),
                          f'<p class="note">{_t(Text("端末 ID のないレコード（許可なく接続された機器・管理外の接続の可能性）。", "Records without a device id (possibly unauthorised devices or unmanaged connections)."))}</p>'
                          + _counts([Text("接続元", "source address"), Text("件数", "records")], report.unknown_device_sources,
                                    _last(report, "unknown_device_sources"), top=th.top)))

    parts.append(_section("device-actions", Text("隔離・失効などの端末の状態変更", "Quarantines, revocations and other device status changes"),
                          _counts([Text("操作", "action"), Text("件数", "count")], report.device_actions_by_kind,
                                  _last(report, "device_actions_by_kind"), words=AUDIT_ACTIONS)
                          + _audit_table(report.device_actions, zone)
                          + (f"<h3>{_t(Text('その他の監査記録', 'Other audit records'))}</h3>"
                             + _counts([Text("操作", "action"), Text("件数", "count")], report.other_audit_by_action,
                                       _last(report, "other_audit_by_action"))
                             if report.other_audit_by_action else "")))

    parts.extend(_evidence_sections(report, charts, zone))

    if report.expiring_rules is None:
        expiring = f'<p class="empty">{_t(Text("ポリシーファイルが指定されていません（--policy）。", "No policy file given (--policy)."))}</p>'
    else:
        expiring = (f'<p class="note">{_t(Text("{d} 日以内に期限が切れる、または期限切れのルール（IPA 技術的対策 3.2.2、3.3）。", "Rules expiring within {d} days or already expired (IPA technical measures 3.2.2, 3.3).").format(d=report.expiring_days))}</p>'
                    + _table([Text("ルール ID", "rule id"), Text("期限", "expires"), Text("担当", "owner"),
                              Text("場所", "location"), Text("状態", "state")],
                             ([_e(r.rule_id), r.expires.isoformat(), _e(r.owner or "-"), _e(r.location),
                               f'<span class="warn">{_t(Text("期限切れ", "expired"))}</span>' if r.expired
                               else _t(Text("まもなく期限", "expiring soon"))] for r in report.expiring_rules)))
    parts.append(_section("expiring-rules", Text("まもなく期限が切れるルール", "Rules that expire soon"), expiring))

    parts.append(_section("sign-off", Text("レビュー結果の記録（確認・承認）", "Review record and sign-off"), sign_off_block()))
    return _page(Text("月次ログレビュー {m}", "Monthly log review {m}").format(m=report.month), "\n".join(parts))


def _evidence_sections(report: ReviewReport, charts: ChartMaker, zone) -> list[str]:
    """Issue #18: what the firewall dropped, and the WireGuard sessions (gateway/reports/evidence.py)."""
    parts = []
    th = report.thresholds
    fw = report.firewall
    if fw is not None:
        t_reason = Text("ファイアウォールで遮断したパケット（理由別）", "Packets dropped by the firewall, by reason")
        body = (f'<p class="note">{_t(Text("ファイアウォールログ（conn）の集約レコード {r} 件、パケット {p} 件。カーネルは規則ごとに毎秒200件まで記録します（超えた分は遮断されますが数えられません）。", "{r} aggregated firewall records (conn), {p} packets. The kernel logs at most 200 packets/s per rule (the rest is dropped too, but not counted here).").format(r=f"{fw.records:,}", p=f"{fw.packets:,}"))}</p>'
                + _chart_counts(charts, t_reason, fw.by_reason, words=FIREWALL_REASONS)
                + _counts([Text("理由", "reason"), Text("パケット", "packets")], fw.by_reason,
                          _last(report, "firewall", "by_reason"), words=FIREWALL_REASONS)
                + f"<h3>{_t(Text('端末別（括弧内は端末のないトンネルアドレス）', 'By device (in brackets: tunnel addresses of no device)'))}</h3>"
                + _counts([Text("端末", "device"), Text("パケット", "packets")], fw.by_source,
                          _last(report, "firewall", "by_source"), top=th.top)
                + f"<h3>{_t(Text('宛先別', 'By destination'))}</h3>"
                + _counts([Text("宛先", "destination"), Text("パケット", "packets")], fw.top_destinations,
                          _last(report, "firewall", "top_destinations"), top=th.top)
                + f"<h3>{_t(Text('失効・停止中の端末からのパケット', 'Packets from revoked or suspended devices'))}</h3>"
                + _counts([Text("端末", "device"), Text("パケット", "packets")], fw.blocked_devices,
                          _last(report, "firewall", "blocked_devices")))
        parts.append(_section("firewall-drops", Text("ファイアウォールで遮断した通信", "Traffic dropped by the firewall"), body))
    tn = report.tunnel
    if tn is not None:
        body = (f'<p>{_t(Text("接続記録のあった端末 {d} 台", "{d} devices with tunnel sessions").format(d=tn.devices))}</p>'
                + _counts([Text("記録", "event"), Text("件数", "count")], tn.events, _last(report, "tunnel", "events"),
                          words=TUNNEL_EVENTS)
                + f"<h3>{_t(Text('複数の接続元アドレスから接続した端末', 'Devices seen from more than one outer address'))}</h3>"
                + _counts([Text("端末", "device"), Text("アドレス数", "addresses")], tn.many_outer_addresses,
                          _last(report, "tunnel", "many_outer_addresses"))
                + f"<h3>{_t(Text('承認されていない回線からの接続', 'Sessions from outer networks not approved for the group'))}</h3>")
        if tn.off_line is None:
            body += f'<p class="empty">{_t(Text("承認回線が指定されていません（--approved-lines）。", "No approved lines given (--approved-lines)."))}</p>'
        else:
            body += (f'<p class="note">{_t(Text("承認回線（--approved-lines）: ", "Approved lines (--approved-lines): "))}'
                     + _e("; ".join(f"{g}: {', '.join(nets)}" for g, nets in tn.approved)) + "</p>")
            body += _table([Text("端末", "device"), Text("利用者", "user"), Text("グループ", "groups"), Text("接続元", "outer address"),
                            Text("最初", "first"), Text("最後", "last"), Text("記録数", "events")],
                           ([_e(s.device_id), _e(s.user or "-"), _e(", ".join(s.groups)), f'<span class="warn">{_e(s.outer_ip)}</span>',
                             _time(s.first, zone), _time(s.last, zone), f"{s.events:,}"] for s in tn.off_line), numeric=(6,))
        parts.append(_section("tunnel-sessions", Text("VPN（WireGuard）の接続記録", "VPN (WireGuard) sessions"), body))
    return parts


def _audit_table(actions: Sequence[AuditAction], zone) -> str:
    return _table([Text("日時", "time"), Text("操作", "action"), Text("端末", "device"), Text("実施者", "operator"),
                   Text("理由", "reason"), Text("結果", "outcome")],
                  ([_time(a.time, zone), _t(ACTION_NAMES[a.action]) if a.action in ACTION_NAMES else _e(a.action),
                    _e(a.device_id or "-"), _e(a.operator or "-"),
                    _key(a.reason, REVOKE_REASONS) if a.reason in REVOKE_REASONS else _e(a.reason or "-"),
                    _t(label(OUTCOMES, a.outcome)) if a.outcome else "-"]
                   for a in actions))


# ---- incident ------------------------------------------------------------------------------

def _verdict(row: EventRow) -> str:
    if row.stream == "mail" and row.mail_verdict:
        words = _t(label(MAIL_VERDICTS, row.mail_verdict))
    elif row.verdict:
        words = _t(label(VERDICTS, row.verdict))
    else:
        return "-"
    return f'<span class="warn">{words}</span>' if row.verdict == "block" else words


def _indicators(names: Sequence[str]) -> str:
    """Mail indicators as words, one per line (never the record's objects as text)."""
    return "<br>".join(f'{_t(label(MAIL_INDICATORS, n))}<code class="code">{_e(n)}</code>' for n in names)


def _events(rows: Sequence[EventRow], zone) -> str:
    rows = list(rows)
    mail = any(r.indicators for r in rows)
    headers = [Text("日時", "time"), Text("ログ", "stream"), Text("判定", "verdict"), Text("ルール", "rule"),
               Text("宛先・接続元", "target"), Text("詳細", "detail")]
    if mail:
        headers.append(Text("標的型攻撃メールの特徴（IPA 7.4）", "targeted-attack indicators (IPA 7.4)"))
    return _table(headers, ([_time(r.time, zone), _t(label(STREAMS, r.stream)), _verdict(r), _e(r.rule or "-"),
                             _e(r.target), _detail(r)] + ([_indicators(r.indicators) or "-"] if mail else [])
                            for r in rows))


def _detail(row: EventRow) -> str:
    """What happened (event.action, event.outcome) in words, then the record's own details."""
    words = []
    if row.action:
        words.append(_t(label(EVENT_ACTIONS, row.action)) if row.action in EVENT_ACTIONS
                     else _t(label(AUDIT_ACTIONS, row.action)) if row.action in AUDIT_ACTIONS else _e(row.action))
    if row.outcome:
        words.append(_t(label(OUTCOMES, row.outcome)))
    if row.reason:
        words.append(_key(row.reason, AUTH_FAILURE_WORDS))
    if row.detail:
        words.append(_e(row.detail))
    return " · ".join(words)


def _blank_or(value: str | None) -> str:
    return _e(value) if value else ""


def _report_form(report: IncidentReport, zone) -> str:
    """IPA 組織的対策 9.5: the fields of the report, filled from the logs where they can be,
    from the operator's statements (kanmon report incident --category …), blank otherwise."""
    facts = report.facts
    if facts.category:
        category = _t(label(INCIDENT_CATEGORIES, facts.category))
    else:
        boxes = "　".join(f"☐ {_t(t)}" for t in INCIDENT_CATEGORIES.values())
        category = boxes
        if report.suggestion is not None:
            suggested = label(INCIDENT_CATEGORIES, report.suggestion.category)
            category += (f'<br><span class="warn" id="suggested-category">'
                         f'{_t(Text("ログからの推定: " + suggested.ja, "suggested by the logs: " + suggested.en))}</span>'
                         f'<br><span class="note">{_e("; ".join(report.suggestion.evidence))}</span>')
    level = _t(label(INCIDENT_LEVELS, facts.level)) if facts.level else "　".join(f"☐ {n}" for n in INCIDENT_LEVELS)
    phase = _t(label(INCIDENT_PHASES, facts.phase)) if facts.phase else "　".join(f"☐ {_t(t)}" for t in INCIDENT_PHASES.values())
    status = _t(label(DEVICE_STATUS, report.status_now)) if report.status_now else "-"
    damaged = Text("端末 {d}（利用者 {u}、グループ {g}）、現在の状態: ", "device {d} (users {u}, groups {g}), status now: ").format(
        d=report.device_id, u=", ".join(report.users) or "-", g=", ".join(report.groups) or "-")
    happened = Text("遮断 {b} 件、ファイアウォール・メール・隔離などの記録 {t} 件（時系列を参照）",
                    "{b} blocks, {t} firewall, mail, quarantine and other notable records (see the timeline)").format(
        b=f"{report.blocked_total:,}", t=f"{len(report.timeline) + report.timeline_left_out:,}")
    logged = Text("（ログから）", "(from the logs)")
    rows = [
        (Text("区分", "Category"), category),
        (Text("事故レベル", "Accident level"), level),
        (Text("フェーズ", "Phase"), phase),
        (Text("報告者", "Reporter"), _blank_or(facts.reporter)),
        (Text("責任者・担当者", "Person responsible / in charge"), _blank_or(facts.responsible)),
        (Text("発生日時", "When it happened"),
         (_time(report.first_suspicious, zone) + " " + _t(logged)) if report.first_suspicious else ""),
        (Text("発覚日時", "When it was found"),
         _time(report.first_response, zone) + ("" if report.facts.detected_at else " " + _t(logged))
         if report.first_response else ""),
        (Text("発生事象", "What happened"), _t(happened)),
        (Text("被害を受けたシステムの状況", "State of the damaged system"), _t(damaged) + status),
        (Text("対応経過", "Course of the response"), _t(Text("時系列（下記）を参照", "see the timeline below"))),
        (Text("想定される原因", "Presumed cause"), _blank_or(facts.cause)),
        (Text("原因発生の背景", "Background of the cause"), _blank_or(facts.background)),
        (Text("再発防止策", "Measures against recurrence"), _blank_or(facts.prevention)),
    ]
    body = "".join(f'<tr><th>{_t(k)}</th><td class="{"" if v else "blank"}">{v}</td></tr>' for k, v in rows)
    return (f'<blockquote class="quote">{_t(GUIDELINE_9_5)}</blockquote>'
            f'<table class="form">{body}</table>')


def _timeline(report: IncidentReport, zone) -> str:
    note = ""
    if report.timeline_left_out:
        note = f'<p class="note">{_t(Text("{n} 件を省略（最初と最新を表示、端末の状態変更はすべて表示）。", "{n} entries left out (the first and the newest are shown, every device status change is).").format(n=f"{report.timeline_left_out:,}"))}</p>'
    return note + _table([Text("日時", "time"), Text("出来事", "event"), Text("詳細", "detail")],
                         ([_time(e.time, zone), _t(e.what), _e(e.detail)] for e in report.timeline))


def _domains(report: IncidentReport) -> str:
    note = (f'<p class="note">{_t(Text("登録ドメイン（公開接尾辞リスト: co.jp、lg.jp など）ごとに集計。送信バイト数はリクエスト本文と TCP 通信の端末側の合計です（多い順）。", "Grouped by registered domain (Public Suffix List: co.jp, lg.jp, …). Bytes sent are request bodies plus the device side of raw TCP flows (most first)."))}</p>')
    return note + _table(
        [Text("登録ドメイン", "registered domain"), Text("ホスト名", "host names"), Text("件数", "records"),
         Text("送信バイト数", "bytes sent"), Text("受信バイト数", "bytes received"), Text("うち遮断", "blocked")],
        ([_e(g.domain) + (f'<br><span class="en">{_e(g.display)}</span>' if g.display != g.domain else ""),
          _e(", ".join(g.hosts)) + (_e(f" (+{g.more_hosts})") if g.more_hosts else ""),
          f"{g.requests:,}", f'<span class="warn">{g.upload_bytes:,}</span>' if g.upload_bytes else "0",
          f"{g.download_bytes:,}", f"{g.blocked:,}"] for g in report.domains), numeric=(2, 3, 4, 5))


def render_incident(report: IncidentReport, charts: ChartMaker) -> str:
    zone = report.since.tzinfo
    parts: list[str] = []
    status = _t(label(DEVICE_STATUS, report.status_now)) if report.status_now else "-"
    parts.append(f"""<p class="note">{_t(Text(
        "IPA 付録5 技術的対策 3.3「インシデントの速報レポート」、3.8.6、組織的対策 9.5「インシデント報告」に基づく、端末 1 台のログの速報です。",
        "Incident flash report for one device, per IPA SME appendix 5 technical measures 3.3 (incident flash report) and 3.8.6, "
        "and organizational measures 9.5 (incident reporting)."))}</p>""")
    summary = _table([Text("項目", "item"), Text("値", "value")], [
        [_t(Text("端末 ID", "device id")), _e(report.device_id)],
        [_t(Text("利用者", "users")), _e(", ".join(report.users) or "-")],
        [_t(Text("トンネル IP", "tunnel IP")), _e(", ".join(report.source_ips) or "-")],
        [_t(Text("グループ", "groups")), _e(", ".join(report.groups) or "-")],
        [_t(Text("対象期間", "period")), f"{_time(report.since)} – {_time(report.until)}"],
        [_t(Text("作成日時", "generated")), _time(report.generated_at, zone)],
        [_t(Text("最後の状態変更", "status after last change")), status],
        [_t(Text("遮断数", "blocked")), f"{report.blocked_total:,}"],
    ])
    counts = _table([Text("ログ", "stream"), Text("レコード数", "records")],
                    ([_t(STREAM_NAMES[c.key]), f"{c.count:,}"] for c in report.records_by_stream), numeric=(1,))
    parts.append(_section("summary", Text("概要", "Summary"), summary + counts))
    parts.append(_section("report-form", Text("インシデント報告（IPA 組織的対策 9.5）", "Incident report (IPA organizational measures 9.5)"),
                          _report_form(report, zone)))
    parts.append(_section("timeline", Text("時系列", "Timeline"), _timeline(report, zone)))
    parts.append(_section("actions", Text("実施済みの対応（隔離・失効など）", "Actions taken (quarantine, revocation, …)"),
                          _audit_table(report.actions, zone)))
    parts.append(_section("registered-domains", Text("登録ドメイン別の接続先と送信量", "Destinations by registered domain, with bytes sent"),
                          _domains(report)))
    t_dest = Text("接続の多い宛先", "Top destinations")
    chart = _img(charts.bars(t_dest, [_host_label(charts, c.key) for c in report.top_destinations], [c.count for c in report.top_destinations],
                             colour=ALT_COLOUR), t_dest) if report.top_destinations else ""
    parts.append(_section("destinations", t_dest, chart + _counts([Text("宛先", "destination"), Text("件数", "count")],
                                                                   report.top_destinations)))
    limited = Text("新しい順に最大 {n} 件を表示（件数は全件）。", "Showing at most the newest {n} rows (counts cover all records).").format(n=report.limit)
    for anchor, title, rows in (("blocks", Text("遮断", "Blocks"), report.blocks),
                                ("connections", Text("最近の接続（プロキシ・通信）", "Recent connections (proxy and firewall)"), report.connections),
                                ("dns", Text("DNS 問い合わせ", "DNS queries"), report.dns),
                                ("mail", Text("メール判定", "Mail verdicts"), report.mail),
                                ("auth", Text("登録・認証", "Enrollment and authentication"), report.auth)):
        note = f'<p class="note">{_t(limited)}</p>' if anchor in report.truncated else ""
        parts.append(_section(anchor, title, note + _events(rows, zone)))
    return _page(Text("インシデント速報: 端末 {d}", "Incident flash report: device {d}").format(d=report.device_id),
                 "\n".join(parts))
