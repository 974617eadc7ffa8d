"""The console's operator pages that are not about one device (issue #21): live blocks (SSE
with resume), policy (in force, test, diff, apply), feeds, reports, alerts -- each page, the
role matrix enforced server-side, CSRF, bad input (bilingual, nothing changed)."""

from __future__ import annotations

import json
import re
import socket
import textwrap
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway.console.blocks import EXTENSION, LiveState
from gateway.logstore import LogStore
from gateway.logstore.live import format_cursor, parse_cursor
from tests.unit.console_fixtures import client_of, csrf_of, make_app, post, signed_in

POLICY = textwrap.dedent("""\
    version: 1
    settings: {default_action: allow, timezone: Asia/Tokyo}
    lists:
      mail: {file: lists/mail.txt, description: "free web mail"}
    rules:
      - {id: block-mail, action: block, match: {list: mail}, description: "free mail", description_ja: "無料メール"}
      - {id: block-storage, action: block, match: {domain: storage.example}, category: storage}
    """)
CANDIDATE = POLICY.replace("  - {id: block-storage, action: block, match: {domain: storage.example}, category: storage}\n",
                           "  - {id: block-video, action: block, match: {domain: video.example}}\n")
BAD = "version: 1\nrules:\n  - {id: x, action: blok, match: {domain: a.example}}\n"


@pytest.fixture
def console(tmp_path):
    app, idp, apply, registry = make_app(tmp_path)
    cfg = app.extensions["kanmon_console"].cfg
    policies = tmp_path / "etc"
    (policies / "lists").mkdir(parents=True)
    (policies / "lists" / "mail.txt").write_text("gmail.com\n")
    (policies / "policy.yaml").write_text(POLICY)
    cfg.applied_policy_link.symlink_to(policies / "policy.yaml")
    from gateway.policy import load_policy
    version = load_policy(policies / "policy.yaml", feeds_dir=cfg.state_dir / "feeds").version
    cfg.policy_status_path.write_text(json.dumps({"result": "success", "version": version,
                                                  "path": str(policies / "policy.yaml")}))
    return app, cfg, registry, policies


def client_as(app, person):
    c = client_of(app)
    if person is not None:
        signed_in(c, person)
    return c


READ_PAGES = ("/live", "/policy", "/policy/test?urls=https://gmail.com/", "/feeds", "/reports", "/alerts",
              "/live/live.js")


@pytest.mark.parametrize("person", ["admin", "helpdesk", "auditor"])
def test_read_roles_see_every_page(console, person):
    app, *_ = console
    c = client_as(app, person)
    for path in READ_PAGES:
        r = c.get(path)
        assert r.status_code == 200, (path, r.status_code)


def test_a_user_without_a_role_is_refused_and_anonymous_goes_to_sign_in(console):
    app, *_ = console
    c = client_as(app, "alice")
    for path in READ_PAGES + ("/live/events", "/reports/review?month=2026-01"):
        assert c.get(path).status_code == 403, path
    anon = client_as(app, None)
    r = anon.get("/policy")
    assert r.status_code == 302 and "/signin" in r.headers["Location"]
    assert anon.get("/live/events").status_code == 302


@pytest.mark.parametrize("person,expected", [("auditor", 403), ("helpdesk", 403), ("admin", 200)])
def test_diff_and_apply_are_admin_only_server_side(console, person, expected):
    app, cfg, _reg, policies = console
    c = client_as(app, person)
    token = csrf_of(c, "/policy")
    assert post(c, "/policy/diff", {"candidate": CANDIDATE}, token=token).status_code == expected
    r = post(c, "/policy/apply", {"candidate": CANDIDATE}, token=token)
    assert r.status_code == expected
    if expected == 403:
        assert cfg.active_policy_path() == policies / "policy.yaml"
        assert not list(policies.glob("policy.console-*"))


def test_post_without_csrf_token_or_from_another_origin_is_refused(console):
    app, cfg, _reg, policies = console
    c = client_as(app, "admin")
    token = csrf_of(c, "/policy")
    assert post(c, "/policy/apply", {"candidate": CANDIDATE}).status_code == 403
    assert post(c, "/policy/apply", {"candidate": CANDIDATE}, token="wrong").status_code == 403
    assert post(c, "/policy/apply", {"candidate": CANDIDATE}, token=token, origin="https://evil.example").status_code == 403
    assert post(c, "/policy/apply", {"candidate": CANDIDATE}, token=token, site="cross-site").status_code == 403
    assert cfg.active_policy_path() == policies / "policy.yaml"


# -- policy ----------------------------------------------------------------------------------------

def test_policy_in_force_is_rendered_with_descriptions_in_the_page_language(console):
    app, *_ = console
    c = client_as(app, "auditor")
    ja = c.get("/policy").get_data(as_text=True)
    assert 'data-rule="block-mail"' in ja and "無料メール" in ja and "free web mail" in ja
    assert re.search(r'data-list="mail">.*?<td data-label="[^"]+">1</td>', ja, re.S)
    c.get("/lang/en")
    en = c.get("/policy").get_data(as_text=True)
    assert "free mail" in en and "Rules, in the order they are tried" in en


def test_url_test_for_a_group_and_for_a_registered_device(console):
    app, *_ = console
    c = client_as(app, "helpdesk")
    page = c.get("/policy/test?urls=https://gmail.com/%0Astorage.example%0Ahttps://ok.example/&groups=staff")
    body = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'data-url="https://gmail.com/" data-verdict="block" data-rule="block-mail"' in body
    assert 'data-url="storage.example" data-verdict="block" data-rule="block-storage"' in body
    assert 'data-url="https://ok.example/" data-verdict="allow"' in body
    assert "https://" in body and "として判定しました" in body          # the shorthand's warning (CLI's text)
    dev = c.get("/policy/test?urls=https://gmail.com/&device=alice-phone").get_data(as_text=True)
    assert 'data-verdict="block"' in dev
    missing = c.get("/policy/test?urls=https://gmail.com/&device=nope")
    assert missing.status_code == 400 and "登録されていない端末です: nope" in missing.get_data(as_text=True)


def test_url_test_gives_the_same_verdicts_as_the_cli(console, capsys):
    from gateway.cli import main as kanmon
    app, cfg, _reg, policies = console
    urls = ["https://gmail.com/", "https://storage.example/x", "https://ok.example/", "htps://gmail.com"]
    assert kanmon(["policy", "test", "--policy", str(policies / "policy.yaml"), "--group", "staff", "--json", *urls]) == 2
    cli = {json.loads(line)["url"]: json.loads(line)["rule"] for line in capsys.readouterr().out.splitlines()}
    body = client_as(app, "auditor").get("/policy/test?groups=staff&urls=" + "%0A".join(urls)).get_data(as_text=True)
    console_rules = dict(re.findall(r'data-url="([^"]+)" data-verdict="[^"]*" data-rule="([^"]*)"', body))
    assert {u: (r or None) for u, r in console_rules.items()} == cli


def test_diff_shows_rule_changes_and_the_urls_whose_verdict_changes(console):
    app, *_ = console
    c = client_as(app, "admin")
    r = post(c, "/policy/diff", {"candidate": CANDIDATE, "urls": "https://storage.example/\nhttps://video.example/\nhttps://gmail.com/",
                                 "groups": "staff"}, token=csrf_of(c, "/policy"))
    body = r.get_data(as_text=True)
    assert r.status_code == 200
    assert 'data-name="block-video" data-kind="added"' in body and 'data-name="block-storage" data-kind="removed"' in body
    assert 'data-changed="2" data-tested="3"' in body
    assert 'data-url="https://storage.example/" data-old="block" data-new="allow"' in body
    assert 'id="apply-form"' in body


def test_diff_upload_a_file(console):
    app, *_ = console
    c = client_as(app, "admin")
    import io
    r = c.post("/policy/diff", data={"csrf_token": csrf_of(c, "/policy"),
                                     "candidate_file": (io.BytesIO(CANDIDATE.encode()), "cand.yaml")},
               headers={"Origin": "https://console.test:9443", "Sec-Fetch-Site": "same-origin"},
               content_type="multipart/form-data")
    assert r.status_code == 200 and 'data-kind="added"' in r.get_data(as_text=True)
    bad = c.post("/policy/diff", data={"csrf_token": csrf_of(c, "/policy"),
                                       "candidate_file": (io.BytesIO(b"version: 1\n\xff\xfe"), "cand.yaml")},
                 headers={"Origin": "https://console.test:9443", "Sec-Fetch-Site": "same-origin"},
                 content_type="multipart/form-data")
    assert bad.status_code == 400 and "UTF-8" in bad.get_data(as_text=True)


@pytest.mark.parametrize("text", [BAD, "version: 1\nrules: [\n", "", "just a string\n"])
def test_bad_candidate_is_refused_bilingually_and_the_policy_in_force_keeps_serving(console, text):
    app, cfg, registry, policies = console
    c = client_as(app, "admin")
    token = csrf_of(c, "/policy")
    for path in ("/policy/diff", "/policy/apply"):
        r = post(c, path, {"candidate": text}, token=token)
        body = r.get_data(as_text=True)
        assert r.status_code == 400, (path, r.status_code)
        assert 'id="refusal"' in body
        if text.strip():
            assert "現在のポリシーが有効のままです" in body and "candidate.yaml:" in body
    c.get("/lang/en")
    en = post(c, "/policy/apply", {"candidate": text}, token=token).get_data(as_text=True)
    assert ("the policy in force keeps serving" in en) or ("empty" in en)
    assert cfg.active_policy_path() == policies / "policy.yaml"
    assert not list(policies.glob("policy.console-*"))
    assert not [e for e in registry.unshipped_audit() if e.action == "policy-apply"]


def test_apply_stores_the_candidate_beside_the_policy_and_audits_the_operator(console):
    app, cfg, registry, policies = console
    c = client_as(app, "admin")
    r = post(c, "/policy/apply", {"candidate": CANDIDATE}, token=csrf_of(c, "/policy"))
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and 'data-outcome="stored"' in body    # no gateway runs in this test
    [stored] = policies.glob("policy.console-*.yaml")
    assert stored.read_text() == CANDIDATE
    assert cfg.active_policy_path() == stored.resolve()
    [entry] = [e for e in registry.unshipped_audit() if e.action == "policy-apply"]
    assert entry.actor.startswith("console:ada@city.example.jp") and str(stored.resolve()) in entry.reason
    # the page now shows the candidate's rules as the policy in force
    assert 'data-rule="block-video"' in c.get("/policy").get_data(as_text=True)


# -- live blocks -----------------------------------------------------------------------------------

def events_of(response) -> list[dict]:
    """The server-sent events of a finished stream: [{id, event, data}]."""
    out, current = [], {}
    for line in response.get_data(as_text=True).split("\n"):
        if not line:
            if current:
                out.append(current)
            current = {}
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(": ")
            current[key] = value
    return out


def blocks(events) -> list[dict]:
    return [json.loads(e["data"]) for e in events if e.get("event") == "block"]


@pytest.fixture
def live(console):
    app, cfg, *_ = console
    state = LiveState(cfg.log_dir, poll_seconds=0.02, stream_seconds=0.5)
    app.extensions[EXTENSION] = state
    store = LogStore(cfg.log_dir)
    yield app, cfg, store, state
    state.stop()
    store.close()


def write_blocks(store, n, start=0, device="alice-phone", category="webmail", stream="proxy"):
    for i in range(start, start + n):
        store.append(stream, {"device.id": device, "user.name": "alice", "kanmon.verdict": "block",
                              "rule.id": "block-mail", "rule.category": category, "url.full": f"https://gmail.com/{i}"})
        store.append(stream, {"device.id": device, "kanmon.verdict": "allow", "url.full": f"https://ok.example/{i}"})


def test_live_stream_delivers_blocks_and_resumes_without_loss_or_duplicates(live):
    app, cfg, store, state = live
    c = client_as(app, "auditor")
    first = c.get("/live/events")                    # fresh: from now on
    assert first.mimetype == "text/event-stream" and blocks(events_of(first)) == []
    cursor = events_of(first)[-1]["id"]
    write_blocks(store, 5)
    r = c.get("/live/events", headers={"Last-Event-ID": cursor})
    got = blocks(events_of(r))
    assert [b["url.full"] for b in got] == [f"https://gmail.com/{i}" for i in range(5)]
    assert all(b["device.id"] == "alice-phone" for b in got)
    # resume from the id of the third event: the fourth and fifth again, nothing else
    third = [e for e in events_of(r) if e.get("event") == "block"][2]["id"]
    write_blocks(store, 2, start=5)
    again = blocks(events_of(c.get("/live/events", headers={"Last-Event-ID": third})))
    assert [b["url.full"] for b in again] == [f"https://gmail.com/{i}" for i in (3, 4, 5, 6)]


def test_live_filters_by_device_and_category_and_advances_past_what_did_not_match(live):
    app, cfg, store, state = live
    c = client_as(app, "helpdesk")
    cursor = events_of(c.get("/live/events"))[-1]["id"]
    write_blocks(store, 2, device="bob-phone", category="storage")
    write_blocks(store, 2, start=2, device="alice-phone", category="webmail")
    r = c.get("/live/events?device=alice-phone", headers={"Last-Event-ID": cursor})
    evs = events_of(r)
    assert [b["url.full"] for b in blocks(evs)] == ["https://gmail.com/2", "https://gmail.com/3"]
    r = c.get("/live/events?category=storage", headers={"Last-Event-ID": cursor})
    assert [b["device.id"] for b in blocks(events_of(r))] == ["bob-phone", "bob-phone"]
    # the last id is past everything read, matching or not
    assert parse_cursor(evs[-1]["id"])["proxy"] == 8


def test_live_bad_last_event_id_starts_fresh(live):
    app, cfg, store, state = live
    write_blocks(store, 3)
    c = client_as(app, "admin")
    evs = events_of(c.get("/live/events", headers={"Last-Event-ID": "proxy:1.evil:2"}))
    assert blocks(evs) == [] and parse_cursor(evs[0]["id"])["proxy"] == 6


def test_live_streams_are_bounded(live):
    app, cfg, store, state = live
    state.max_streams = 0
    r = client_as(app, "admin").get("/live/events")
    assert r.status_code == 503 and r.headers["Retry-After"]


def test_live_page_alone_may_run_its_script(live):
    app, *_ = live
    c = client_as(app, "admin")
    assert "script-src 'self'" in c.get("/live").headers["Content-Security-Policy"]
    assert "script-src" not in c.get("/policy").headers["Content-Security-Policy"]
    assert "<script src=\"/live/live.js\" defer></script>" in c.get("/live").get_data(as_text=True)


def test_live_cursor_format_is_what_the_page_receives(live):
    app, cfg, store, state = live
    ids = [e["id"] for e in events_of(client_as(app, "admin").get("/live/events"))]
    assert ids and all(format_cursor(parse_cursor(i)) == i for i in ids)


# -- feeds -----------------------------------------------------------------------------------------

def test_feeds_page_shows_each_feed_copy_and_its_failures(console):
    from gateway.feeds.formats import Category
    from gateway.feeds.store import FeedState, Snapshot, save_snapshot, save_state
    app, cfg, _reg, policies = console
    (policies / "policy.yaml").write_text(POLICY.replace(
        "lists:\n", "lists:\n  ut1: {url: 'https://feeds.example/ut1.tar.gz', format: ut1, categories: [webmail], refresh: 1d}\n"))
    c = client_as(app, "auditor")
    body = c.get("/feeds").get_data(as_text=True)
    if 'data-feed="ut1"' not in body:
        pytest.fail(body[-3000:])
    assert 'data-ok="no"' in body and 'id="feeds-missing"' in body
    feeds = cfg.state_dir / "feeds"
    save_snapshot(feeds, Snapshot("ut1", "https://feeds.example/ut1.tar.gz", 1.7e9, "ab" * 32,
                                  {"webmail": Category({"gmail.com", "yahoo.co.jp"}, set(), set(), 0)}))
    save_state(feeds, "ut1", FeedState(last_success=1.7e9, last_error="HTTP 503", last_error_reason="http",
                                       failures={"http": 3}))
    body = c.get("/feeds").get_data(as_text=True)
    assert "webmail: 2" in body and "http: 3" in body and "HTTP 503" in body


def test_feeds_page_without_feeds(console):
    app, *_ = console
    assert 'id="no-feeds"' in client_as(app, "helpdesk").get("/feeds").get_data(as_text=True)


# -- reports ---------------------------------------------------------------------------------------

def test_reports_download_the_cli_report_and_refuse_bad_input_bilingually(console):
    from tests.unit.test_reports_aggregation import write_month
    app, cfg, registry, _p = console
    write_month(cfg.log_dir)
    c = client_as(app, "auditor")
    r = c.get("/reports/review?month=2026-01&tz=Asia/Tokyo")
    assert r.status_code == 200 and r.headers["Content-Disposition"] == 'attachment; filename="kanmon-review-2026-01.html"'
    assert "<html" in r.get_data(as_text=True)[:500].lower()
    inc = c.get("/reports/incident?device=d1&since=2026-01-01&until=2026-02-01&tz=UTC&reporter=aki")
    assert inc.status_code == 200 and "aki" in inc.get_data(as_text=True)
    bad = c.get("/reports/review?month=2026-13")
    assert bad.status_code == 400 and "YYYY-MM" in bad.get_data(as_text=True)
    nobody = c.get("/reports/incident?device=nobody&since=2026-01-01")
    assert nobody.status_code == 400 and "端末 ID を確認してください" in nobody.get_data(as_text=True)
    assert [e.action for e in registry.unshipped_audit() if e.action == "console-report-downloaded"] == \
        ["console-report-downloaded"] * 2


def test_reports_without_logs_say_so(console):
    app, *_ = console
    r = client_as(app, "helpdesk").get("/reports/review?month=2026-01")
    assert r.status_code == 400 and "ログ" in r.get_data(as_text=True)


# -- alerts ----------------------------------------------------------------------------------------

def _prometheus(body: bytes, status: int = 200):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_alerts_not_configured_is_said_plainly(console):
    app, *_ = console
    body = client_as(app, "auditor").get("/alerts").get_data(as_text=True)
    assert 'data-state="not-configured"' in body and "Prometheus が設定されていない" in body


def test_alerts_firing_down_and_error(console):
    app, cfg, *_ = console
    answer = {"status": "success", "data": {"alerts": [
        {"labels": {"alertname": "KanmonLogWriteFailure", "severity": "warning"},
         "annotations": {"summary": "ログの書き込みに失敗 / Log write failures"}, "state": "firing",
         "activeAt": "2026-12-05T04:01:02Z"}]}}
    server = _prometheus(json.dumps(answer).encode())
    try:
        object.__setattr__(cfg, "alerts", {"prometheus": {"url": f"http://127.0.0.1:{server.server_address[1]}"}})
        c = client_as(app, "helpdesk")
        body = c.get("/alerts").get_data(as_text=True)
        assert 'data-alert="KanmonLogWriteFailure" data-state="firing"' in body and "ログの書き込みに失敗" in body
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    object.__setattr__(cfg, "alerts", {"prometheus": {"url": f"http://127.0.0.1:{port}", "timeout": 2}})
    down = client_as(app, "auditor").get("/alerts")
    body = down.get_data(as_text=True)
    assert down.status_code == 502 and 'data-state="error"' in body and 'id="alerts-none"' not in body
    broken = _prometheus(b"<html>proxy error</html>", 200)
    try:
        object.__setattr__(cfg, "alerts", {"prometheus": {"url": f"http://127.0.0.1:{broken.server_address[1]}"}})
        assert client_as(app, "auditor").get("/alerts").status_code == 502
    finally:
        broken.shutdown()
        broken.server_close()


# -- the catalog -----------------------------------------------------------------------------------

def test_every_message_of_these_pages_has_its_japanese_text():
    from babel.messages.extract import extract_from_dir
    from babel.messages.pofile import read_po
    from gateway.console.opscatalog import po_path
    root = Path(__file__).resolve().parents[2]
    ids = set()
    method_map = [("gateway/console/ops_templates/**.html", "jinja2")] + [
        (f"gateway/console/{m}.py", "python") for m in ("blocks", "policy", "feeds", "reports", "alerts", "opscatalog")]
    for _f, _l, message, _c, _ctx in extract_from_dir(str(root), method_map, keywords={"_": None, "O_": None}):
        ids.add(message if isinstance(message, str) else message[0])
    with po_path("ja").open("rb") as f:
        catalog = read_po(f, locale="ja")
    translated = {m.id for m in catalog if m.id and m.string}
    assert ids and ids <= translated, sorted(ids - translated)




def test_an_oversized_candidate_is_refused_and_nothing_changes(console):
    app, cfg, registry, policies = console
    c = client_as(app, "admin")
    huge = CANDIDATE + "# " + "x" * 70_000 + "\n"
    r = post(c, "/policy/apply", {"candidate": huge}, token=csrf_of(c, "/policy"))
    assert r.status_code == 413
    assert cfg.active_policy_path() == policies / "policy.yaml"
    assert not list(policies.glob("policy.console-*"))


def test_a_finished_or_abandoned_stream_gives_its_place_back(live):
    """The server closes every response (WSGI): the stream's place comes back then, whether it
    ran to its end or the browser went away before the first event."""
    app, cfg, store, state = live
    state.max_streams = 1
    c = client_as(app, "admin")
    with c.get("/live/events") as done:                       # read to its end (0.5 s)
        assert done.status_code == 200 and done.get_data()
    assert state.streams == 0
    abandoned = c.get("/live/events", buffered=False)         # nothing read yet
    assert state.streams == 1
    with c.get("/live/events") as refused:
        assert refused.status_code == 503
    abandoned.close()
    assert state.streams == 0
    with c.get("/live/events") as again:
        assert again.status_code == 200


def test_an_unreadable_log_store_is_said_in_the_stream_not_a_silent_page(live):
    import time as _time
    app, cfg, store, state = live
    hub = state.hub

    def broken():
        raise PermissionError(13, "Permission denied", str(cfg.log_dir))
    hub.poll_once = broken
    deadline = _time.monotonic() + 5
    while hub.last_error is None and _time.monotonic() < deadline:
        _time.sleep(0.02)
    with client_as(app, "auditor").get("/live/events") as r:
        problems = [json.loads(e["data"]) for e in events_of(r) if e.get("event") == "problem"]
    assert problems and "Permission denied" in problems[0]["error"]
