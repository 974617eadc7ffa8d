"""The console's Logs and Audit trail pages (issue #21): read roles only, the search of
`kanmon logs search` (same records), filters, times in the page's zone, bounded newest-first
output, bilingual 400 for bad input, hostile log values escaped."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.console import logs as console_logs
from gateway.logstore import LogStore
from gateway.logstore.query import newest
from tests.unit.console_fixtures import client_of, make_app, signed_in

T0 = datetime(2026, 1, 31, 0, 0, tzinfo=UTC)          # 09:00 in Tokyo


class Clock:
    def __init__(self, at: datetime):
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def console(tmp_path):
    app, _idp, _apply, registry = make_app(tmp_path)
    cfg = app.extensions["kanmon_console"].cfg
    return app, cfg, registry


def client_as(app, person, lang="en"):
    c = client_of(app)
    c.get(f"/lang/{lang}")
    if person is not None:
        signed_in(c, person)
    return c


def write(cfg, records, start=T0, step=timedelta(minutes=1)):
    """Append ``(stream, record)`` pairs, one ``step`` apart from ``start``."""
    clock = Clock(start)
    store = LogStore(cfg.log_dir, clock=clock)
    try:
        for stream, record in records:
            store.append(stream, record)
            clock.at += step
    finally:
        store.close()


def rows(body: str, table: str) -> list[str]:
    m = re.search(rf'<table class="cards" id="{table}">(.*?)</table>', body, re.S)
    return re.findall(r"<tr data-[a-z]+=.*?</tr>", m.group(1), re.S) if m else []


def cells(row: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]


def matched(body: str) -> int:
    return int(re.search(r'data-matched="(\d+)"', body).group(1))


def proxy(device, verdict="block", url="https://gmail.com/", user="alice"):
    return ("proxy", {"device.id": device, "user.name": user, "kanmon.verdict": verdict, "rule.id": "block-mail",
                      "url.full": url, "source.ip": "10.77.0.2"})


def audit_record(action, device=None, actor="console:ada", reason="r"):
    # the fields gateway/runtime/app.py ship_audit writes for a registry audit entry
    return ("audit", {"event.dataset": "kanmon.audit", "event.action": action, "event.outcome": "success",
                      "event.reason": reason, "user.name": actor, "device.id": device})


# -- roles -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("person", ["admin", "helpdesk", "auditor"])
def test_read_roles_see_both_pages_and_their_nav_entries(console, person):
    app, *_ = console
    c = client_as(app, person)
    for path in ("/logs", "/audit"):
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code)
        body = r.get_data(as_text=True)
        assert 'data-nav="logs.logs_page"' in body and 'data-nav="audittrail.audit_page"' in body


def test_a_plain_user_is_refused_and_anonymous_goes_to_sign_in(console):
    app, *_ = console
    c = client_as(app, "alice")
    for path in ("/logs", "/audit", "/logs?stream=dns&device=alice-phone", "/audit?operator=x"):
        assert c.get(path).status_code == 403, path
    assert 'data-nav="logs.logs_page"' not in c.get("/me/devices").get_data(as_text=True)
    anon = client_as(app, None)
    for path in ("/logs", "/audit"):
        r = anon.get(path)
        assert r.status_code == 302 and "/signin" in r.headers["Location"]


def test_the_pages_have_no_unsafe_method(console):
    app, *_ = console
    rules = [r for r in app.url_map.iter_rules() if r.endpoint.split(".")[0] in ("logs", "audittrail")]
    assert {r.rule for r in rules} == {"/logs", "/audit"}
    assert all(r.methods <= {"GET", "HEAD", "OPTIONS"} for r in rules)
    c = client_as(app, "admin")
    assert c.post("/logs").status_code in (403, 405)


# -- logs: filters, zone, same records as the CLI -----------------------------------------------

def test_logs_filters_by_device_verdict_rule_and_text_newest_first(console):
    app, cfg, _ = console
    write(cfg, [proxy("alice-phone", url="https://gmail.com/1"), proxy("bob-phone", url="https://gmail.com/2"),
                proxy("alice-phone", "allow", url="https://ok.example/3"), proxy("alice-phone", url="https://Drive.example/4")])
    c = client_as(app, "auditor")
    since = "&since=2026-01-31T00:00Z"
    body = c.get("/logs?device=alice-phone" + since).get_data(as_text=True)
    got = [cells(r)[-1] for r in rows(body, "logs-rows")]
    assert got == ["https://Drive.example/4", "https://ok.example/3", "https://gmail.com/1"]   # newest first
    body = c.get("/logs?device=alice-phone&verdict=block" + since).get_data(as_text=True)
    assert [cells(r)[-1] for r in rows(body, "logs-rows")] == ["https://Drive.example/4", "https://gmail.com/1"]
    body = c.get("/logs?text=drive.EXAMPLE" + since).get_data(as_text=True)   # case-insensitive
    assert [cells(r)[-1] for r in rows(body, "logs-rows")] == ["https://Drive.example/4"]
    body = c.get("/logs?rule=nope" + since).get_data(as_text=True)
    assert matched(body) == 0 and rows(body, "logs-rows") == []
    body = c.get("/logs?stream=dns" + since).get_data(as_text=True)
    assert matched(body) == 0


def test_logs_times_are_shown_and_read_in_the_zone(console):
    app, cfg, _ = console
    write(cfg, [proxy("d1", url=f"https://x.example/{i}") for i in range(4)], step=timedelta(hours=1))
    c = client_as(app, "auditor")
    # 10:00 JST = 01:00Z: the records of 01:00Z, 02:00Z and 03:00Z, shown at +09:00
    body = c.get("/logs?since=2026-01-31T10:00&tz=Asia/Tokyo").get_data(as_text=True)
    times = [cells(r)[0] for r in rows(body, "logs-rows")]
    assert [t[:19] + t[-6:] for t in times] == ["2026-01-31T12:00:00+09:00", "2026-01-31T11:00:00+09:00",
                                                  "2026-01-31T10:00:00+09:00"]
    body = c.get("/logs?since=2026-01-31T01:00&until=2026-01-31T03:00&tz=UTC").get_data(as_text=True)
    assert [cells(r)[-1] for r in rows(body, "logs-rows")] == ["https://x.example/2", "https://x.example/1"]


def test_logs_page_shows_the_records_the_cli_prints(console, capsys):
    from gateway.cli import main as kanmon
    app, cfg, _ = console
    write(cfg, [proxy("alice-phone" if i % 3 else "bob-phone", "block" if i % 2 else "allow",
                      url=f"https://x.example/{i}") for i in range(30)])
    capsys.readouterr()
    assert kanmon(["logs", "search", "--dir", str(cfg.log_dir), "--stream", "proxy", "--device", "alice-phone",
                   "--verdict", "block", "--since", "2026-01-31T09:00", "--tz", "Asia/Tokyo"]) == 0
    cli = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    body = client_as(app, "auditor").get("/logs?device=alice-phone&verdict=block&since=2026-01-31T09:00"
                                         "&tz=Asia/Tokyo").get_data(as_text=True)
    page = [cells(r) for r in rows(body, "logs-rows")]
    assert len(cli) == len(page) > 0
    assert [(line[0], line[1], line[-1]) for line in reversed(cli)] == [(p[0], p[1], p[-1]) for p in page]


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("query,en,ja", [
    ("since=yesterday", "cannot parse time", "日時を解釈できません"),
    ("until=2026-13-01", "cannot parse time", "日時を解釈できません"),
    ("since=2026-01-31T10:00Z&until=2026-01-31T09:00Z", "must be before", "より前にしてください"),
    ("tz=Mars/Olympus", "No such time zone", "そのタイムゾーンはありません"),
    ("tz=../../etc/passwd", "No such time zone", "そのタイムゾーンはありません"),
    ("stream=secrets", "No such log kind", "そのログの種類はありません"),
    ("device=" + "x" * 5000, "longer than 200", "200 文字を超えています"),
    ("text=a%00b", "control characters", "制御文字"),
])
def test_bad_filters_are_a_bilingual_400_without_traceback(console, query, en, ja):
    app, cfg, _ = console
    write(cfg, [proxy("d1")])
    for lang, expected in (("en", en), ("ja", ja)):
        r = client_as(app, "auditor", lang).get("/logs?" + query)
        body = r.get_data(as_text=True)
        assert r.status_code == 400, (query, r.status_code)
        assert expected in html.unescape(body) and 'id="search-error"' in body, (lang, query)
        assert "Traceback" not in body and 'id="logs-rows"' not in body
        assert len(body) < 20_000          # the 5000-character value is not echoed back whole


def test_audit_bad_input_is_refused_too(console):
    app, *_ = console
    r = client_as(app, "auditor").get("/audit?since=soon")
    assert r.status_code == 400 and "cannot parse time" in html.unescape(r.get_data(as_text=True))


def test_without_a_log_directory_the_page_says_so(console):
    app, cfg, _ = console
    assert not cfg.log_dir.exists()
    r = client_as(app, "auditor").get("/logs")
    assert r.status_code == 200 and 'id="no-logs"' in r.get_data(as_text=True)


# -- hostile values -----------------------------------------------------------------------------

def test_a_hostile_hostname_is_escaped_cut_and_stripped_of_control_characters(console):
    app, cfg, _ = console
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    huge = "a" * 100_000 + ".example"
    write(cfg, [("dns", {"device.id": evil, "dns.question.name": evil + "\x1b[2J\r\nX-Injected: 1"}),
                ("dns", {"device.id": "d2", "dns.question.name": huge})])
    body = client_as(app, "auditor").get("/logs?stream=dns&since=2026-01-31T00:00Z").get_data(as_text=True)
    assert "<script>alert" not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", body)
    assert "\ufffd[2J\ufffd\ufffdX-Injected: 1" in body      # one cell, one line: the controls are shown as U+FFFD
    found = rows(body, "logs-rows")
    assert len(found) == 2
    long_cell = cells(found[0])[-1]
    assert len(long_cell) == console_logs.MAX_CELL + 1 and long_cell.endswith("…")
    assert len(body) < 50_000


# -- bounds -------------------------------------------------------------------------------------

def test_output_is_bounded_to_the_newest_and_says_so(console):
    app, cfg, _ = console
    n = console_logs.LIMIT + 100
    write(cfg, [proxy("d1", url=f"https://x.example/{i}") for i in range(n)], step=timedelta(seconds=1))
    body = client_as(app, "auditor").get("/logs?since=2026-01-31T00:00Z").get_data(as_text=True)
    shown = rows(body, "logs-rows")
    assert len(shown) == console_logs.LIMIT and matched(body) == n
    assert 'id="search-truncated"' in body
    assert cells(shown[0])[-1] == f"https://x.example/{n - 1}" and cells(shown[-1])[-1] == "https://x.example/100"


def test_the_default_window_is_the_last_day(console):
    app, cfg, _ = console
    now = datetime.now(UTC)
    write(cfg, [proxy("d1", url="https://old.example/")], start=now - timedelta(days=2))
    write(cfg, [proxy("d1", url="https://new.example/")], start=now - timedelta(minutes=5))
    body = client_as(app, "auditor").get("/logs").get_data(as_text=True)
    assert [cells(r)[-1] for r in rows(body, "logs-rows")] == ["https://new.example/"]


def test_newest_keeps_only_limit_records_and_counts_the_rest(tmp_path: Path):
    write_cfg = type("C", (), {"log_dir": tmp_path / "logs"})
    write(write_cfg, [proxy("d1", url=f"u{i}") for i in range(50)])
    result = newest(tmp_path / "logs", "proxy", limit=7)
    assert [r["url.full"] for r in result.records] == [f"u{i}" for i in range(49, 42, -1)]
    assert result.matched == 50 and result.truncated and result.problems == 0
    with pytest.raises(ValueError):
        newest(tmp_path / "logs", "proxy", limit=0)


# -- audit trail --------------------------------------------------------------------------------

def test_audit_trail_filters_by_device_operator_and_action_newest_first(console):
    app, cfg, _ = console
    write(cfg, [audit_record("device-added", "alice-phone", "cli:root"),
                audit_record("device-suspended", "alice-phone", "console:ada", "lost on the train"),
                audit_record("console-signin", None, "console:aki"),
                audit_record("device-suspended", "bob-phone", "console:hiro"),
                proxy("alice-phone")])
    c = client_as(app, "auditor")
    since = "&since=2026-01-31T00:00Z"
    body = c.get("/audit?" + since).get_data(as_text=True)
    assert [cells(r)[3] for r in rows(body, "audit-rows")] == [
        "device-suspended", "console-signin", "device-suspended", "device-added"]
    body = c.get("/audit?device=alice-phone" + since).get_data(as_text=True)
    assert [cells(r)[3] for r in rows(body, "audit-rows")] == ["device-suspended", "device-added"]
    body = c.get("/audit?operator=console:ada" + since).get_data(as_text=True)
    assert [cells(r)[-1] for r in rows(body, "audit-rows")] == ["lost on the train"]
    body = c.get("/audit?action=device-suspended" + since).get_data(as_text=True)
    assert [cells(r)[2] for r in rows(body, "audit-rows")] == ["console:hiro", "console:ada"]
    assert matched(c.get("/audit?action=device-deleted" + since).get_data(as_text=True)) == 0


def test_audit_is_not_a_kind_of_the_logs_page(console):
    app, *_ = console
    assert client_as(app, "auditor").get("/logs?stream=audit").status_code == 400


# -- catalog ------------------------------------------------------------------------------------

def test_every_message_of_these_pages_has_its_japanese_text():
    from babel.messages.extract import extract_from_dir
    from babel.messages.pofile import read_po
    from gateway.console.opscatalog import po_path
    root = Path(__file__).resolve().parents[2]
    method_map = [(f"gateway/console/ops_templates/{t}.html", "jinja2") for t in ("ops_logs", "ops_audit", "ops_results")]
    method_map += [(f"gateway/console/{m}.py", "python") for m in ("logs", "audittrail")]
    ids = set()
    for _f, _l, message, _c, _ctx in extract_from_dir(str(root), method_map, keywords={"_": None, "O_": None}):
        ids.add(message if isinstance(message, str) else message[0])
    with po_path("ja").open("rb") as f:
        catalog = read_po(f, locale="ja")
    translated = {m.id for m in catalog if m.id and m.string}
    assert len(ids) > 20 and ids <= translated, sorted(ids - translated)
