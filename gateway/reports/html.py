"""Report model -> one self-contained HTML page (inline CSS, charts as data: URIs), in
Japanese and English. Pure: no file or network I/O.

Written with the standard library's ``html.escape`` rather than a template engine: the
pages are a header and a few tables and charts, and every value passes through ``_e``."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape

from gateway.i18n import Text

from .charts import ALT_COLOUR, ChartMaker
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
code{background:#f4f4f4;padding:0 .2em}
"""

NONE_TEXT = Text("（なし）", "(none)")
NOTHING = Text("該当なし", "nothing to report")
STREAM_NAMES = {
    "proxy": Text("プロキシ", "proxy"), "conn": Text("通信（ファイアウォール）", "connections (firewall)"),
    "dns": Text("DNS", "DNS"), "mail": Text("メール", "mail"), "auth": Text("認証", "authentication"),
    "audit": Text("監査", "audit"),
}
ACTION_NAMES = {
    "device-quarantined": Text("隔離", "quarantined"), "device-revoked": Text("失効", "revoked"),
    "device-suspended": Text("一時停止", "suspended"), "device-resumed": Text("再開", "resumed"),
    "device-released": Text("隔離解除", "released from quarantine"), "device-renewed": Text("証明書更新", "certificate renewed"),
    "device-posture-updated": Text("状態情報更新", "posture updated"),
    "device-added": Text("登録", "added"), "device-enrolled": Text("登録完了", "enrolled"),
}


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _t(text: Text) -> str:
    return f'<span lang="ja">{_e(text.ja)}</span> / <span lang="en" class="en">{_e(text.en)}</span>'


def _key(key: str) -> str:
    return _t(NONE_TEXT) if key == NONE_KEY else _e(key)


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
    body = "\n".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                      for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _counts(headers: Sequence[Text], counts: Sequence[Count]) -> str:
    return _table(headers, ([_key(c.key), f"{c.count:,}"] for c in counts), numeric=(1,))


def _img(png: bytes, alt: Text) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt.ja + " / " + alt.en)}">'


def _page(title: Text, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"ja\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title.ja)} / {_e(title.en)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<h1>{_t(title)}</h1>\n{body}</body>\n</html>\n")


def _chart_counts(charts: ChartMaker, title: Text, counts: Sequence[Count], limit: int = 15) -> str:
    if not counts:
        return ""
    shown = counts[:limit]
    labels = [f"{NONE_TEXT.ja} {NONE_TEXT.en}" if charts.cjk_family and c.key == NONE_KEY
              else (NONE_TEXT.en if c.key == NONE_KEY else c.key) for c in shown]
    return _img(charts.bars(title, labels, [c.count for c in shown]), title)


# ---- review ------------------------------------------------------------------------------

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

    t_cat = Text("カテゴリ別の遮断", "Blocked traffic by category")
    parts.append(_section("blocked-by-category", t_cat, _chart_counts(charts, t_cat, report.blocked_by_category)
                          + _counts([Text("カテゴリ", "category"), Text("件数", "count")], report.blocked_by_category)))
    t_grp = Text("端末グループ別の遮断", "Blocked traffic by device group")
    parts.append(_section("blocked-by-group", t_grp, _chart_counts(charts, t_grp, report.blocked_by_group)
                          + _counts([Text("グループ", "group"), Text("件数", "count")], report.blocked_by_group)
                          + f'<p class="note">{_t(Text("複数のグループに属する端末は各グループに数えます。", "A device in several groups counts in each."))}</p>'))
    t_day = Text("日別の遮断", "Blocked traffic per day")
    day_chart = _img(charts.daily(t_day, [d.day for d in report.blocked_by_day], [d.count for d in report.blocked_by_day],
                                  axis=Text("件数", "count")), t_day) if report.blocked_by_day else ""
    parts.append(_section("blocked-by-day", t_day, day_chart + _table(
        [Text("日付", "day"), Text("件数", "count")],
        ([d.day.isoformat(), f"{d.count:,}"] for d in report.blocked_by_day if d.count), numeric=(1,))))
    t_dom = Text("遮断の多い宛先", "Top blocked domains")
    parts.append(_section("top-blocked-domains", t_dom, _chart_counts(charts, t_dom, report.top_blocked_domains)
                          + _counts([Text("宛先", "destination"), Text("件数", "count")], report.top_blocked_domains)))
    parts.append(_section("top-blocking-rules", Text("遮断の多いルール", "Top blocking rules"),
                          _counts([Text("ルール ID", "rule id"), Text("件数", "count")], report.top_blocking_rules)))

    t_auth = Text("認証失敗（理由別）", "Authentication failures by reason")
    auth_body = (f"<p>{_t(Text('認証 {n} 件のうち失敗 {f} 件', '{f} failures out of {n} authentication events').format(n=f'{report.auth_total:,}', f=f'{report.auth_failures:,}'))}</p>"
                 + _chart_counts(charts, t_auth, report.auth_failures_by_reason)
                 + _counts([Text("理由", "reason"), Text("件数", "count")], report.auth_failures_by_reason)
                 + f"<h3>{_t(Text('接続元別', 'By source'))}</h3>"
                 + _counts([Text("端末または接続元", "device or source address"), Text("件数", "count")],
                           report.auth_failures_by_source))
    parts.append(_section("auth-failures", Text("認証失敗", "Authentication failures"), auth_body))
    burst_rule = Text("集中: 同じ接続元から {m} 分以内に {n} 件以上の認証失敗。",
                      "Burst: {n} or more failures from one source within {m} minutes.").format(
        n=th.burst_failures, m=th.burst_minutes)
    parts.append(_section("auth-bursts", Text("認証失敗の集中", "Authentication failure bursts"),
                          f'<p class="note">{_t(burst_rule)}</p>' + _table(
        [Text("端末", "device"), Text("接続元", "source"), Text("利用者", "users"), Text("開始", "start"),
         Text("終了", "end"), Text("失敗数", "failures"), Text("理由", "reasons")],
        ([_e(b.device_id or "-"), _e(b.source_ip or "-"), _e(", ".join(b.users) or "-"), _time(b.start, zone),
          _time(b.end, zone), f'<span class="warn">{b.failures:,}</span>', _e(", ".join(b.reasons) or "-")]
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
                          + _counts([Text("接続元", "source address"), Text("件数", "records")], report.unknown_device_sources)))

    parts.append(_section("device-actions", Text("隔離・失効などの端末の状態変更", "Quarantines, revocations and other device status changes"),
                          _counts([Text("操作", "action"), Text("件数", "count")], report.device_actions_by_kind)
                          + _audit_table(report.device_actions, zone)
                          + (f"<h3>{_t(Text('その他の監査記録', 'Other audit records'))}</h3>"
                             + _counts([Text("操作", "action"), Text("件数", "count")], report.other_audit_by_action)
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

    parts.append(_section("review-record", Text("レビュー結果の記録", "Review record"), _t(Text(
        "確認者・確認日・所見・対応を記録し、異常があれば管理者へ報告してください（3.8.5「結果の記録」）。",
        "Record reviewer, date, findings and actions; report anomalies to the manager (3.8.5 \"record the result\")."))))
    return _page(Text("月次ログレビュー {m}", "Monthly log review {m}").format(m=report.month), "\n".join(parts))


def _evidence_sections(report: ReviewReport, charts: ChartMaker, zone) -> list[str]:
    """Issue #18: what the firewall dropped, and the WireGuard sessions (gateway/reports/evidence.py)."""
    parts = []
    fw = report.firewall
    if fw is not None:
        t_reason = Text("ファイアウォールで遮断したパケット（理由別）", "Packets dropped by the firewall, by reason")
        body = (f'<p class="note">{_t(Text("ファイアウォールログ（conn）の集約レコード {r} 件、パケット {p} 件。カーネルは規則ごとに毎秒200件まで記録します（超えた分は遮断されますが数えられません）。", "{r} aggregated firewall records (conn), {p} packets. The kernel logs at most 200 packets/s per rule (the rest is dropped too, but not counted here).").format(r=f"{fw.records:,}", p=f"{fw.packets:,}"))}</p>'
                + _chart_counts(charts, t_reason, fw.by_reason)
                + _counts([Text("理由", "reason"), Text("パケット", "packets")], fw.by_reason)
                + f"<h3>{_t(Text('端末別（括弧内は端末のないトンネルアドレス）', 'By device (in brackets: tunnel addresses of no device)'))}</h3>"
                + _counts([Text("端末", "device"), Text("パケット", "packets")], fw.by_source)
                + f"<h3>{_t(Text('宛先別', 'By destination'))}</h3>"
                + _counts([Text("宛先", "destination"), Text("パケット", "packets")], fw.top_destinations)
                + f"<h3>{_t(Text('失効・停止中の端末からのパケット', 'Packets from revoked or suspended devices'))}</h3>"
                + _counts([Text("端末", "device"), Text("パケット", "packets")], fw.blocked_devices))
        parts.append(_section("firewall-drops", Text("ファイアウォールで遮断した通信", "Traffic dropped by the firewall"), body))
    tn = report.tunnel
    if tn is not None:
        body = (f'<p>{_t(Text("接続記録のあった端末 {d} 台", "{d} devices with tunnel sessions").format(d=tn.devices))}</p>'
                + _counts([Text("記録", "event"), Text("件数", "count")], tn.events)
                + f"<h3>{_t(Text('複数の接続元アドレスから接続した端末', 'Devices seen from more than one outer address'))}</h3>"
                + _counts([Text("端末", "device"), Text("アドレス数", "addresses")], tn.many_outer_addresses)
                + f"<h3>{_t(Text('承認されていない回線からの接続', 'Sessions from outer networks not approved for the group'))}</h3>")
        if tn.off_line is None:
            body += f'<p class="empty">{_t(Text("承認回線が指定されていません（--approved-lines）。", "No approved lines given (--approved-lines)."))}</p>'
        else:
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
                    _e(a.device_id or "-"), _e(a.operator or "-"), _e(a.reason or "-"), _e(a.outcome or "-")]
                   for a in actions))


# ---- incident ------------------------------------------------------------------------------

def _events(rows: Sequence[EventRow], zone) -> str:
    return _table([Text("日時", "time"), Text("ログ", "stream"), Text("判定", "verdict"), Text("ルール", "rule"),
                   Text("宛先・接続元", "target"), Text("詳細", "detail")],
                  ([_time(r.time, zone), _e(r.stream), f'<span class="warn">{_e(r.verdict)}</span>' if r.verdict == "block"
                    else _e(r.verdict or "-"), _e(r.rule or "-"), _e(r.target), _e(r.detail)] for r in rows))


def render_incident(report: IncidentReport, charts: ChartMaker) -> str:
    zone = report.since.tzinfo
    parts: list[str] = []
    status = report.status_now or "-"
    parts.append(f"""<p class="note">{_t(Text(
        "IPA 付録5 技術的対策 3.3「インシデントの速報レポート」および 3.8.6 に基づく、端末 1 台のログの速報です。",
        "Incident flash report for one device, per IPA SME appendix 5 technical measures 3.3 (incident flash report) and 3.8.6."))}</p>""")
    summary = _table([Text("項目", "item"), Text("値", "value")], [
        [_t(Text("端末 ID", "device id")), _e(report.device_id)],
        [_t(Text("利用者", "users")), _e(", ".join(report.users) or "-")],
        [_t(Text("トンネル IP", "tunnel IP")), _e(", ".join(report.source_ips) or "-")],
        [_t(Text("グループ", "groups")), _e(", ".join(report.groups) or "-")],
        [_t(Text("対象期間", "period")), f"{_time(report.since)} – {_time(report.until)}"],
        [_t(Text("作成日時", "generated")), _time(report.generated_at, zone)],
        [_t(Text("最後の状態変更", "status after last change")), _e(status)],
        [_t(Text("遮断数", "blocked")), f"{report.blocked_total:,}"],
    ])
    counts = _table([Text("ログ", "stream"), Text("レコード数", "records")],
                    ([_t(STREAM_NAMES[c.key]), f"{c.count:,}"] for c in report.records_by_stream), numeric=(1,))
    parts.append(_section("summary", Text("概要", "Summary"), summary + counts))
    parts.append(_section("actions", Text("実施済みの対応（隔離・失効など）", "Actions taken (quarantine, revocation, …)"),
                          _audit_table(report.actions, zone)))
    t_dest = Text("接続の多い宛先", "Top destinations")
    chart = _img(charts.bars(t_dest, [c.key for c in report.top_destinations], [c.count for c in report.top_destinations],
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
