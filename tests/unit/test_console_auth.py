"""Issue #21: the operator console's sign-in, sessions, CSRF and role checks (Flask test client,
fake IdP: tests/unit/console_fixtures.py). The e2e tests run the same against the lab IdP in
Chromium (tests/e2e/test_console_browser.py)."""

from __future__ import annotations

import re

import pytest

from gateway.console.app import UNGUARDED
from gateway.console.auth import SESSION_COOKIE, SIGNIN_COOKIE
from gateway.registry.model import DeviceStatus
from tests.unit.console_fixtures import (ORIGIN, client_of, csrf_of, make_app, post, signed_in, start_signin)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def console(tmp_path):
    clock = Clock()
    app, idp, apply, registry = make_app(tmp_path, clock=clock)
    return app, idp, apply, registry, clock


def cookie(client, name=SESSION_COOKIE):
    c = client.get_cookie(name)
    return c.value if c is not None else None


def audit_actions(registry) -> list[tuple[str, str, str]]:
    rows = registry._db.execute("SELECT actor, action, reason FROM audit ORDER BY id").fetchall()
    return [(r["actor"], r["action"], r["reason"]) for r in rows]


# -- sign-in -------------------------------------------------------------------------------------

def test_not_signed_in_get_goes_to_signin_and_post_is_refused(console):
    app, *_ = console
    c = client_of(app)
    r = c.get("/devices")
    assert r.status_code == 302 and r.headers["Location"].startswith("/signin?next=/devices")
    r = post(c, "/devices/alice-phone/action", {"action": "revoke", "reason": "lost"}, token="x")
    assert r.status_code == 403


def test_signin_sets_a_host_prefixed_strict_cookie_and_shows_the_operator(console):
    app, _idp, _apply, registry, _ = console
    c = client_of(app)
    r = signed_in(c, "helpdesk")
    assert r.status_code == 200
    set_cookies = r.headers.getlist("Set-Cookie")
    session = next(h for h in set_cookies if h.startswith(SESSION_COOKIE + "="))
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in session, session
    assert "Domain" not in session and "Max-Age" not in session and "Expires" not in session
    assert re.search(r'http-equiv="refresh" content="0;url=/"', r.get_data(as_text=True))
    page = c.get("/devices").get_data(as_text=True)
    assert 'data-roles="helpdesk user"' in page and "hiro@city.example.jp" in page
    assert ("console:hiro@city.example.jp (sub=sub-help)", "console-signin", "roles=helpdesk,user amr=otp,pwd") \
        in audit_actions(registry)


def test_a_user_without_mfa_is_refused_with_a_bilingual_page_and_no_session(console):
    app, _idp, _apply, registry, _ = console
    c = client_of(app)
    r = signed_in(c, "nomfa")
    assert r.status_code == 403
    text = r.get_data(as_text=True)
    assert "多要素認証(MFA)が必要です" in text and "requires multi-factor authentication (MFA)" in text
    assert 'data-reason="mfa-missing"' in text
    assert cookie(c) is None
    assert c.get("/devices").status_code == 302
    assert any(a == "console-signin-refused" and r.startswith("mfa-missing") for _, a, r in audit_actions(registry))


def test_mfa_from_acr_counts_as_the_device_signin_counts_it(console):
    app, *_ = console
    c = client_of(app)
    assert signed_in(c, "acr").status_code == 200
    assert c.get("/devices").status_code == 200


def test_a_callback_without_the_browser_binding_or_replayed_is_refused(console):
    app, *_ = console
    c1, c2 = client_of(app), client_of(app)
    state = start_signin(c1)
    # another browser finishing c1's sign-in (login CSRF / stolen state)
    r = c2.get(f"/callback?code=code-helpdesk&state={state}")
    assert r.status_code == 400 and cookie(c2) is None
    # the state was used up by that attempt: c1 cannot finish with it either
    assert c1.get(f"/callback?code=code-helpdesk&state={state}").status_code == 400
    state = start_signin(c1)
    assert c1.get(f"/callback?code=code-helpdesk&state={state}").status_code == 200
    assert c1.get(f"/callback?code=code-helpdesk&state={state}").status_code == 400   # replay


def test_next_url_stays_on_the_console(console):
    app, *_ = console
    c = client_of(app)
    for evil in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        r = c.get("/signin/start", query_string={"next": evil})
        state = re.search(r"state=(st\d+)", r.headers["Location"]).group(1)
        page = c.get(f"/callback?code=code-helpdesk&state={state}").get_data(as_text=True)
        assert 'content="0;url=/"' in page, evil


# -- sessions: fixation, replay, timeouts ---------------------------------------------------------

def test_a_planted_session_cookie_is_never_adopted(console):
    app, *_ = console
    victim = client_of(app)
    victim.set_cookie(SESSION_COOKIE, "attacker-chosen-value", domain="localhost")
    signed_in(victim, "helpdesk")
    assert cookie(victim) not in (None, "attacker-chosen-value")
    attacker = client_of(app)
    attacker.set_cookie(SESSION_COOKIE, "attacker-chosen-value", domain="localhost")
    assert attacker.get("/devices").status_code == 302


def test_a_planted_live_session_of_the_attacker_is_ended_at_the_victims_signin(console):
    app, *_ = console
    attacker = client_of(app)
    signed_in(attacker, "bob")
    planted = cookie(attacker)
    victim = client_of(app)
    victim.set_cookie(SESSION_COOKIE, planted, domain="localhost")
    signed_in(victim, "helpdesk")
    assert cookie(victim) != planted
    assert attacker.get("/me/devices").status_code == 302   # the planted id is dead


def test_signout_ends_the_session_server_side_and_a_replayed_cookie_is_refused(console):
    app, _idp, _apply, registry, _ = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    old = cookie(c)
    token = csrf_of(c, "/devices")
    r = post(c, "/signout", {}, token=token)
    assert r.status_code == 303 and cookie(c) is None
    replay = client_of(app)
    replay.set_cookie(SESSION_COOKIE, old, domain="localhost")
    assert replay.get("/devices").status_code == 302
    r = post(replay, "/devices/alice-phone/action", {"action": "revoke", "reason": "lost"}, token=token)
    assert r.status_code == 403
    assert registry.get("alice-phone").status is DeviceStatus.ACTIVE


def test_idle_and_absolute_timeouts(console):
    app, _idp, _apply, _registry, clock = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    clock.now += 9 * 60
    assert c.get("/devices").status_code == 200      # 9 min idle < 10 min
    clock.now += 10 * 60 + 1
    assert c.get("/devices").status_code == 302      # idle too long
    signed_in(c, "helpdesk")
    for _ in range(7):                               # busy, but 1 h after sign-in it ends all the same
        clock.now += 9 * 60
        last = c.get("/devices").status_code
    assert last == 302


# -- CSRF ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["no-token", "wrong-token", "no-origin", "other-origin", "null-origin",
                                  "cross-site", "same-site-subdomain"])
def test_csrf_refusals_change_nothing(console, case):
    app, _idp, apply, registry, _ = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    token = csrf_of(c, "/devices/alice-phone")
    kwargs = {"token": token, "origin": ORIGIN, "site": "same-origin"}
    if case == "no-token":
        kwargs["token"] = None
    elif case == "wrong-token":
        kwargs["token"] = token[:-2] + "xx"
    elif case == "no-origin":
        kwargs["origin"] = None
    elif case == "other-origin":
        kwargs["origin"] = "https://evil.example"
    elif case == "null-origin":
        kwargs["origin"] = "null"
    elif case == "cross-site":
        kwargs["site"] = "cross-site"
    elif case == "same-site-subdomain":
        kwargs["site"] = "same-site"
    r = post(c, "/devices/alice-phone/action", {"action": "revoke", "reason": "lost"}, **kwargs)
    assert r.status_code == 403
    assert registry.get("alice-phone").status is DeviceStatus.ACTIVE and apply.calls == []


def test_the_token_of_one_session_does_not_work_for_another(console):
    app, _idp, _apply, registry, _ = console
    a, b = client_of(app), client_of(app)
    signed_in(a, "helpdesk")
    signed_in(b, "helpdesk")
    token_a = csrf_of(a, "/devices/alice-phone")
    assert post(b, "/devices/alice-phone/action", {"action": "revoke", "reason": "lost"}, token=token_a).status_code == 403
    assert registry.get("alice-phone").status is DeviceStatus.ACTIVE


def test_a_correct_post_without_sec_fetch_site_still_needs_origin_and_token(console):
    app, _idp, apply, registry, _ = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    token = csrf_of(c, "/devices/alice-phone")
    r = post(c, "/devices/alice-phone/action", {"action": "suspend", "reason": "check"}, token=token, site=None)
    assert r.status_code == 303
    assert registry.get("alice-phone").status is DeviceStatus.SUSPENDED and len(apply.calls) == 1


# -- roles -----------------------------------------------------------------------------------------

GETS = ["/devices", "/devices/bob-phone", "/devices/new", "/me/devices"]
EXPECTED_GET = {   # person -> status per GETS
    "admin": [200, 200, 200, 200],
    "helpdesk": [200, 200, 200, 200],
    "auditor": [200, 200, 403, 200],
    "alice": [403, 403, 403, 200],
}


@pytest.mark.parametrize("person", sorted(EXPECTED_GET))
def test_role_matrix_for_pages(console, person):
    app, *_ = console
    c = client_of(app)
    signed_in(c, person)
    assert [c.get(p).status_code for p in GETS] == EXPECTED_GET[person]


@pytest.mark.parametrize("person,expected", [("admin", 303), ("helpdesk", 303), ("auditor", 403), ("alice", 403)])
def test_role_matrix_for_a_lifecycle_change(console, person, expected):
    app, _idp, _apply, registry, _ = console
    c = client_of(app)
    signed_in(c, person)
    token = csrf_of(c, "/me/devices")
    r = post(c, "/devices/bob-phone/action", {"action": "quarantine", "reason": "malware seen"}, token=token)
    assert r.status_code == expected
    assert (registry.get("bob-phone").status is DeviceStatus.QUARANTINED) == (expected == 303)


@pytest.mark.parametrize("path,data", [
    ("/devices/bob-phone/action", {"action": "revoke", "reason": "lost"}),
    ("/devices/new", {"device_id": "x-1", "owner": "aki", "ownership": "org"}),
    ("/me/devices/lost", {"device_id": "bob-phone"}),
])
def test_an_auditor_can_post_nothing_even_by_hand(console, path, data):
    app, _idp, apply, registry, _ = console
    c = client_of(app)
    signed_in(c, "auditor")
    token = csrf_of(c, "/devices")
    before = [(r.device_id, r.status) for r in registry.all()]
    r = post(c, path, data, token=token)
    assert r.status_code == 403
    assert [(r.device_id, r.status) for r in registry.all()] == before and apply.calls == []
    assert any(a == "console-refused" and "read-only" in reason for _, a, reason in audit_actions(registry))
    page = c.get("/devices/bob-phone").get_data(as_text=True)
    assert 'id="form-revoke"' not in page   # and the buttons are not shown either


def test_an_auditor_may_still_sign_out(console):
    app, *_ = console
    c = client_of(app)
    signed_in(c, "auditor")
    assert post(c, "/signout", {}, token=csrf_of(c, "/devices")).status_code == 303


def test_every_view_declares_its_roles(console):
    app, *_ = console
    unguarded = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        if rule.endpoint not in UNGUARDED and not getattr(view, "console_roles", None):
            unguarded.append(rule.endpoint)
    assert unguarded == []
    assert len(list(app.url_map.iter_rules())) > len(UNGUARDED)


def test_security_headers(console):
    app, *_ = console
    r = client_of(app).get("/signin")
    assert "script-src" not in r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    assert "<script" not in r.get_data(as_text=True)
