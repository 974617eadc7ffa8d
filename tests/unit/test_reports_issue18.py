"""Issue #18 report computations: last month beside this month, destinations grouped by
registered domain (Public Suffix List: multi-level suffixes, IDN), the IPA 組織的対策 9.5
fields and the incident timeline, mail indicators as words, the sign-off block. Records are
written with the real LogStore and read back through reports.sources."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

import pytest

from gateway.logstore import LogStore
from gateway.cli import report as commands
from gateway.reports.charts import ChartMaker
from gateway.reports.compare import beside, change_text, previous_month
from gateway.reports.domains import Transfer, group_by_registered_domain, registered_domain, unicode_form
from gateway.reports.flash import FactsError, cap_timeline, check_facts, timeline_entry
from gateway.reports.html import render_incident
from gateway.reports.incident import build_incident
from gateway.reports.labels import FIREWALL_REASONS, MAIL_INDICATORS, label
from gateway.reports.model import Count, IncidentFacts, TimelineEntry
from gateway.reports.review import build_review, parse_month
from gateway.reports.sources import stream_records
from gateway.net.firewalllog import REASONS
from gateway.mail.indicators import ALL_NAMES
from gateway.i18n import Text

DEC = datetime(2025, 12, 10, 9, tzinfo=UTC)
JAN = datetime(2026, 1, 10, 9, tzinfo=UTC)
DICT_TEXT = re.compile(r"\{'|\{&#x27;|&#x27;: |': ")   # a Python dict's repr, escaped or not


class Clock:
    now = JAN

    def __call__(self) -> datetime:
        return self.now


def _fw(device, dst, port, reason, packets):
    return {"event.dataset": "kanmon.firewall", "event.action": "packet-dropped", "kanmon.verdict": "block",
            "rule.id": f"kanmon:fw-{reason}", "kanmon.firewall.reason": reason, "kanmon.firewall.packets": packets,
            "device.id": device, "user.name": f"u-{device}", "source.ip": "10.77.0.2", "destination.ip": dst,
            "destination.port": port, "network.transport": "udp"}


def _tunnel(device, event, outer, action="wireguard-handshake", previous=None):
    record = {"event.dataset": "kanmon.tunnel", "event.action": action, "event.outcome": "success",
              "kanmon.tunnel.event": event, "device.id": device, "user.name": f"u-{device}", "source.ip": outer,
              "client.ip": outer, "device.groups": ["telework"]}
    if previous:
        record["kanmon.tunnel.previous_ip"] = previous
    return record


def _proxy(device, url, host, up, verdict="allow", rule="default", down=100):
    return {"device.id": device, "user.name": f"u-{device}", "source.ip": "10.77.0.2", "kanmon.verdict": verdict,
            "rule.id": rule, "url.full": url, "url.domain": host, "http.request.method": "POST" if up else "GET",
            "http.request.body.bytes": up, "http.response.body.bytes": down}


@pytest.fixture
def logs(tmp_path):
    """December 2025 and January 2026 for device d1 (and a little of d2)."""
    clock = Clock()
    store = LogStore(tmp_path, clock=clock)

    def put(stream, when, record):
        clock.now = when
        store.append(stream, {"@timestamp": when, **record})

    # December: 2 QUIC records (5 packets), one not-tcp (2), one session start
    put("conn", DEC, _fw("d1", "198.51.100.9", 443, "quic", 3))
    put("conn", DEC, _fw("d1", "198.51.100.9", 443, "quic", 2))
    put("conn", DEC, _fw("d1", "198.51.100.9", 5000, "not-tcp", 2))
    put("auth", DEC, _tunnel("d1", "session-start", "203.0.113.7"))
    # January: QUIC 1 packet, device-to-device 4 packets, no not-tcp; start + roam off the line
    put("conn", JAN, _fw("d1", "198.51.100.9", 443, "quic", 1))
    put("conn", JAN, _fw("d1", "10.77.0.3", 22, "device-to-device", 4))
    put("auth", JAN, _tunnel("d1", "session-start", "203.0.113.7"))
    put("auth", JAN + timedelta(minutes=5), _tunnel("d1", "roamed", "198.18.5.5", "wireguard-endpoint-changed",
                                                     previous="203.0.113.7"))
    # January proxy traffic: uploads to hosts under multi-level suffixes and an IDN
    put("proxy", JAN + timedelta(minutes=1), _proxy("d1", "https://www.example.co.jp/up", "www.example.co.jp", 5000))
    put("proxy", JAN + timedelta(minutes=2), _proxy("d1", "https://files.example.co.jp/up", "files.example.co.jp", 7000))
    put("proxy", JAN + timedelta(minutes=3), _proxy("d1", "https://www.city.chiyoda.lg.jp/", "www.city.chiyoda.lg.jp", 0))
    put("proxy", JAN + timedelta(minutes=4), _proxy("d1", "https://mail.xn--r8jz45g.jp/", "mail.xn--r8jz45g.jp", 300))
    put("proxy", JAN + timedelta(minutes=4), _proxy("d1", "https://www.例え.jp/", "www.例え.jp", 200))
    put("proxy", JAN + timedelta(minutes=6), _proxy("d1", "https://dropper.example.net/x.exe", "dropper.example.net", 0,
                                                     verdict="block", rule="kanmon:virus-found"))
    # a raw TCP flow: bytes the device sent, by address
    put("conn", JAN + timedelta(minutes=7), {"device.id": "d1", "source.ip": "10.77.0.2", "kanmon.verdict": "allow",
                                              "rule.id": "default", "event.action": "connection-closed",
                                              "destination.ip": "192.0.2.44", "destination.port": 8443,
                                              "network.transport": "tcp", "source.bytes": 123456, "destination.bytes": 10})
    # mail with indicators, as addons/mail.py writes them (objects, not names)
    put("mail", JAN + timedelta(minutes=8), {
        "device.id": "d1", "source.ip": "10.77.0.2", "kanmon.verdict": "block", "rule.id": "kanmon:mail",
        "email.from.address": "attacker@example.org", "kanmon.mail.verdict": "quarantine", "event.action": "mail-inbound",
        "kanmon.mail.indicators": [{"name": "virus-detected", "weight": 100, "evidence": "Eicar-Test-Signature"},
                                   {"name": "double-extension", "weight": 40, "evidence": "report.pdf.exe"}]})
    put("audit", JAN + timedelta(minutes=9), {"event.action": "device-quarantined", "device.id": "d1",
                                               "user.name": "kanmon-auto", "event.outcome": "success",
                                               "event.reason": "virus in mail"})
    store.close()
    return tmp_path


def review_of(directory, month, **kw):
    start, end = parse_month(month, UTC)
    return build_review(month, start, end, "UTC", stream_records(directory, start, end),
                        generated_at=datetime(2026, 2, 1, tzinfo=UTC), **kw)


# ---- last month beside this month ----------------------------------------------------------

def test_previous_month_wraps_the_year():
    assert previous_month("2026-01") == "2025-12" and previous_month("2026-03") == "2026-02"


def test_beside_lines_up_keys_of_both_months():
    rows = beside([Count("quic", 1), Count("device-to-device", 4)], [Count("not-tcp", 2), Count("quic", 5)])
    assert [(r.key, r.this, r.last, r.change) for r in rows] == [
        ("quic", 1, 5, -4), ("device-to-device", 4, 0, 4), ("not-tcp", 0, 2, -2)]
    assert [r.new for r in rows] == [False, True, False]
    assert [change_text(r) for r in rows] == ["-4", "+4", "-2"]


def test_beside_of_top_lists_does_not_invent_zeros():
    [row] = beside([Count("a.example", 3)], [Count("b.example", 9)], complete=False)[:1]
    assert row.last is None and row.change is None and change_text(row) == "?"


def test_month_over_month_from_real_logs(logs):
    this, last = review_of(logs, "2026-01"), review_of(logs, "2025-12")
    rows = {r.key: (r.this, r.last) for r in beside(this.firewall.by_reason, last.firewall.by_reason)}
    assert rows == {"device-to-device": (4, 0), "quic": (1, 5), "not-tcp": (0, 2)}
    events = {r.key: (r.this, r.last) for r in beside(this.tunnel.events, last.tunnel.events)}
    assert events == {"session-start": (1, 1), "roamed": (1, 0)}


def test_cli_review_shows_last_month_beside_and_the_sign_off_block(logs, tmp_path):
    lines = tmp_path / "lines.yaml"
    lines.write_text("telework: [203.0.113.0/24]\n")
    out = tmp_path / "review.html"
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["report", "review", "--month", "2026-01", "--logs", str(logs), "--out", str(out),
                              "--approved-lines", str(lines)])
    assert args.func(args) == commands.EXIT_OK
    html = out.read_text(encoding="utf-8")
    assert 'id="month-over-month"' in html and "2025-12" in html
    fw = html.split('id="firewall-drops"')[1].split("</section>")[0]
    # QUIC: 1 this month, 5 last month, -4; the reason in words in both languages, code in small print
    assert re.search(r"QUIC（UDP 443.*?<td class=\"n\">1</td><td class=\"n\">5</td><td class=\"n down\">-4</td>", fw)
    assert "端末間の通信" in fw and "device to device" in fw and "TCP 以外" in fw
    tunnel = html.split('id="tunnel-sessions"')[1].split("</section>")[0]
    assert "接続元の変更（ローミング）" in tunnel and "198.18.5.5" in tunnel and "203.0.113.0/24" in tunnel
    sign = html.split('id="sign-off"')[1].split("</section>")[0]
    for words in ("確認者", "確認日", "所見", "対応", "Reviewer", "Findings", "Action taken",
                  "結果の記録：レビュー結果を記録し、異常が検知された場合は管理者へ報告する。"):
        assert words in sign, words
    assert "@media print" in html and "break-before:page" in html
    assert not DICT_TEXT.search(html)


# ---- registered domains ---------------------------------------------------------------------

@pytest.mark.parametrize("host,domain", [
    ("www.example.co.jp", "example.co.jp"),
    ("a.b.example.co.jp", "example.co.jp"),
    ("www.city.shibuya.tokyo.jp", "city.shibuya.tokyo.jp"),     # shibuya.tokyo.jp is a suffix
    ("www.city.chiyoda.lg.jp", "chiyoda.lg.jp"),                # the list has lg.jp only
    ("www.soumu.go.jp", "soumu.go.jp"),
    ("WWW.Example.COM.", "example.com"),
    ("mail.例え.jp", "xn--r8jz45g.jp"),                          # IDN: one form, punycode
    ("mail.xn--r8jz45g.jp", "xn--r8jz45g.jp"),
    ("ｗｗｗ．例え．ｊｐ", "xn--r8jz45g.jp"),                       # full-width (UTS 46 mapping)
    ("foo.blogspot.com", "blogspot.com"),                       # private suffixes are not split
    ("co.jp", "co.jp"),                                         # a suffix stands for itself
    ("192.0.2.44", "192.0.2.44"), ("2001:DB8::1", "2001:db8::1"),
    ("intranet", "intranet"),
])
def test_registered_domain(host, domain):
    assert registered_domain(host) == domain


def test_unicode_form_of_an_idn_and_of_a_broken_label():
    assert unicode_form("xn--r8jz45g.jp") == "例え.jp"
    assert unicode_form("example.jp") == "example.jp"
    assert unicode_form("xn--zz-invalid--.jp").endswith(".jp")


def test_grouping_adds_bytes_sent_and_keeps_hosts():
    groups = group_by_registered_domain([
        Transfer("www.example.co.jp", 5000), Transfer("files.example.co.jp", 7000, 10),
        Transfer("mail.xn--r8jz45g.jp", 300), Transfer("www.例え.jp", 200, blocked=True),
        Transfer("quiet.example.org", 0, 999)])
    assert [(g.domain, g.requests, g.upload_bytes, g.blocked) for g in groups] == [
        ("example.co.jp", 2, 12000, 0), ("xn--r8jz45g.jp", 2, 500, 1), ("example.org", 1, 0, 0)]
    assert groups[0].hosts == ("files.example.co.jp", "www.example.co.jp")
    assert groups[1].display == "例え.jp" and groups[1].hosts == ("mail.xn--r8jz45g.jp", "www.xn--r8jz45g.jp")


def test_grouping_lists_a_bounded_number_of_hosts():
    [group] = group_by_registered_domain([Transfer(f"h{i}.example.jp", 1) for i in range(20)], max_hosts=5)
    assert len(group.hosts) == 5 and group.more_hosts == 15 and group.upload_bytes == 20


# ---- IPA 9.5 fields, timeline ----------------------------------------------------------------

def incident(directory, **facts):
    return build_incident("d1", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC),
                          stream_records(directory, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC),
                                         device="d1"),
                          generated_at=datetime(2026, 1, 11, tzinfo=UTC), facts=check_facts(IncidentFacts(**facts)))


def test_incident_groups_destinations_by_registered_domain_with_bytes_sent(logs):
    report = incident(logs)
    by = {g.domain: g for g in report.domains}
    assert by["192.0.2.44"].upload_bytes == 123456            # the raw TCP flow, by its address
    assert by["example.co.jp"].upload_bytes == 12000 and by["example.co.jp"].requests == 2
    assert by["xn--r8jz45g.jp"].upload_bytes == 500 and by["xn--r8jz45g.jp"].display == "例え.jp"
    assert by["chiyoda.lg.jp"].upload_bytes == 0
    assert by["example.net"].blocked == 1
    assert report.domains[0].domain == "192.0.2.44"            # most bytes sent first
    assert "198.51.100.9" not in by                            # firewall drops are not transfers


def test_incident_timeline_and_9_5_dates_from_the_logs(logs):
    report = incident(logs)
    kinds = [(e.kind, e.time) for e in report.timeline]
    assert [k for k, _ in kinds] == ["firewall", "firewall", "tunnel", "tunnel", "block", "mail", "action"]
    assert [t for _, t in kinds] == sorted(t for _, t in kinds)
    roam = report.timeline[3]
    assert roam.what.ja == "接続元の変更（ローミング）" and roam.detail == "203.0.113.7 → 198.18.5.5"
    mail = report.timeline[5]
    assert "ウイルス検出" in mail.what.ja and "virus detected" in mail.what.en and "double extension" in mail.what.en
    assert report.first_suspicious == JAN                       # the first firewall drop
    assert report.first_response == JAN + timedelta(minutes=9)  # the quarantine
    # a virus in the logs suggests the category; the operator's word replaces the suggestion
    assert report.suggestion.category == "virus"
    assert [e.split(":")[0] for e in report.suggestion.evidence] == ["proxy", "mail", "audit"]
    assert "dropper.example.net" in report.suggestion.evidence[0] and "attacker@" in report.suggestion.evidence[1]
    stated = incident(logs, category="leak", level="2", reporter="情報政策課 山田",
                      prevention="添付ファイルの実行を禁止", detected_at=JAN + timedelta(hours=1))
    assert stated.suggestion is None and stated.first_response == JAN + timedelta(hours=1)


@pytest.mark.parametrize("facts,message", [
    ({"category": "fire"}, "the category is one of leak, tamper, virus"),
    ({"level": "4"}, "the accident level is 0 to 3"),
    ({"phase": "done"}, "the phase is one of discovery"),
    ({"cause": "x" * 2001}, "cause is too long"),
])
def test_bad_9_5_facts_are_refused(facts, message):
    with pytest.raises(FactsError, match=message) as caught:
        check_facts(IncidentFacts(**facts))
    assert caught.value.text.ja and caught.value.text.ja != caught.value.text.en


def test_blank_texts_become_blank_lines():
    assert check_facts(IncidentFacts(cause="  ", reporter=" 山田 ")) == IncidentFacts(reporter="山田")


def test_cli_refuses_a_bad_level_in_both_languages_and_writes_nothing(logs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    out = tmp_path / "i.html"
    args = parser.parse_args(["report", "incident", "--device", "d1", "--since", "2026-01-01", "--logs", str(logs),
                              "--out", str(out), "--level", "5"])
    assert args.func(args) == commands.EXIT_USAGE
    err = capsys.readouterr().err
    assert "事故レベルは 0〜3 です" in err and "the accident level is 0 to 3" in err and not out.exists()


def test_timeline_cap_keeps_start_end_and_every_action():
    entries = [TimelineEntry(JAN + timedelta(minutes=i), "block", Text("a", "a"), str(i)) for i in range(100)]
    entries.append(TimelineEntry(JAN + timedelta(minutes=50, seconds=1), "action", Text("隔離", "quarantined"), "q"))
    kept, left = cap_timeline(entries, 11)
    assert left == 90 and len(kept) == 11
    assert [e.detail for e in kept] == ["0", "1", "2", "3", "4", "q", "95", "96", "97", "98", "99"]


def test_routine_records_are_not_in_the_timeline():
    assert timeline_entry("proxy", {"@timestamp": "2026-01-10T09:00:00Z", "kanmon.verdict": "allow"}) is None
    assert timeline_entry("audit", {"@timestamp": "2026-01-10T09:00:00Z", "event.action": "policy-reloaded"}) is None


def test_rendered_incident_has_the_9_5_form_timeline_domains_and_words(logs):
    html = render_incident(incident(logs, level="2", reporter="情報政策課 山田"), ChartMaker())
    form = html.split('id="report-form"')[1].split("</section>")[0]
    for words in ("区分", "事故レベル", "原因", "再発防止策", "報告者", "発生日時", "発覚日時", "被害を受けたシステムの状況",
                  "Category", "Accident level", "Presumed cause", "Measures against recurrence", "Reporter",
                  "情報政策課 山田", "レベル 2", "ウイルス感染", "インシデントの分類、責任者・担当者、発覚日時"):
        assert words in form, words
    assert 'id="suggested-category"' in form
    assert 'id="timeline"' in html and 'id="registered-domains"' in html
    domains = html.split('id="registered-domains"')[1].split("</section>")[0]
    assert "example.co.jp" in domains and "12,000" in domains and "例え.jp" in domains
    mail = html.split('id="mail"')[1].split("</section>")[0]
    assert "ウイルス検出" in mail and "virus detected" in mail and "二重拡張子" in mail and "double extension" in mail
    assert "隔離" in mail and "quarantined" in mail                 # the mail verdict as words
    assert not DICT_TEXT.search(html) and "'weight'" not in html and "&#x27;name&#x27;" not in html
    auth = html.split('id="auth"')[1].split("</section>")[0]
    assert "VPN ハンドシェイク" in auth and "VPN handshake" in auth and "成功" in auth
    assert "wireguard-handshake" not in auth and "wireguard-endpoint-changed" not in auth
    assert "受信メール" in mail and "inbound mail" in mail and "mail-inbound" not in mail


# ---- every code has words ---------------------------------------------------------------------

def test_every_firewall_reason_and_mail_indicator_has_words_in_both_languages():
    for table, codes in ((FIREWALL_REASONS, REASONS), (MAIL_INDICATORS, ALL_NAMES + ("message-too-complex",))):
        for code in codes:
            words = label(table, code)
            assert words.ja and words.en and words.ja != words.en and code not in words.ja, code


def test_an_unknown_code_is_marked_not_dropped():
    words = label(FIREWALL_REASONS, "new-reason")
    assert "new-reason" in words.ja and "unknown code" in words.en


def test_a_top_list_shorter_than_its_limit_is_complete_last_month():
    from gateway.reports.html import _counts
    headers = [Text("宛先", "destination"), Text("件数", "count")]
    full = _counts(headers, [Count("new.example", 3)], [Count("a.example", 9), Count("b.example", 8)], top=2)
    short = _counts(headers, [Count("new.example", 3)], [Count("a.example", 9)], top=2)
    assert re.search(r"new\.example</td><td class=\"n\">3</td><td class=\"n\">\?</td>", full)
    assert re.search(r"new\.example</td><td class=\"n\">3</td><td class=\"n\">0</td><td class=\"n up\">\+3</td>", short)
    assert "a.example" in short and "-9" in short           # gone this month: listed with its drop


def test_the_example_approved_lines_match_the_example_policy():
    from pathlib import Path

    import yaml

    from gateway.reports.evidence import parse_approved_lines
    root = Path(__file__).resolve().parents[2]
    lines = parse_approved_lines(yaml.safe_load((root / "policies/approved-lines.example.yaml").read_text()))
    policy = yaml.safe_load((root / "policies/example.yaml").read_text())
    in_policy = {}
    for group in policy.get("groups", policy.get("rule_groups", [])) or []:
        device_group = (group.get("applies_to") or {}).get("device_group")
        for rule in group.get("rules", []):
            nets = (rule.get("unless") or {}).get("underlay_network")
            if device_group and nets:
                in_policy[device_group] = tuple(nets)
    assert in_policy, "the example policy has telework lines"
    assert {g: tuple(str(n) for n in nets) for g, nets in lines.items()} == in_policy


def test_many_names_under_one_domain_keep_memory_bounded_and_are_counted():
    from gateway.reports.domains import DomainTally
    tally = DomainTally(max_hosts=3)
    for i in range(50):
        for _ in range(3):            # the same name again does not count as another
            tally.add(Transfer(f"h{i}.example.co.jp", 2))
    [group] = tally.result()
    assert group.hosts == ("h0.example.co.jp", "h1.example.co.jp", "h2.example.co.jp")
    assert group.more_hosts == 47 and group.requests == 150 and group.upload_bytes == 300


def test_the_first_month_of_the_epoch_has_no_month_before_it(tmp_path):
    clock = Clock()
    clock.now = datetime(1970, 1, 2, tzinfo=UTC)
    store = LogStore(tmp_path / "logs", clock=clock)
    store.append("conn", {"@timestamp": clock.now, **_fw("d1", "198.51.100.9", 443, "quic", 1)})
    store.close()
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    out = tmp_path / "r.html"
    args = parser.parse_args(["report", "review", "--month", "1970-01", "--logs", str(tmp_path / "logs"), "--out", str(out)])
    assert args.func(args) == commands.EXIT_OK
    html = out.read_text(encoding="utf-8")
    assert 'id="firewall-drops"' in html and 'id="month-over-month"' not in html and 'id="sign-off"' in html


def test_a_chart_without_a_cjk_font_draws_japanese_domain_names_in_ascii(logs, recwarn):
    """Without a CJK font the destinations chart labels an IDN by its punycode form (matplotlib
    warned "Glyph … missing" and drew boxes); the table keeps the Unicode name."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Glyph", category=UserWarning)
        html = render_incident(incident(logs, level="2", reporter="情報政策課 山田"), ChartMaker())
    assert "<img" in html.split('id="destinations"')[1].split("</section>")[0]
