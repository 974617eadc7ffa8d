"""User sign-in through the gateway (issue #9), end to end in namespaces: a real OIDC provider
(npm oidc-provider) in the fake internet, devices tunnelling through Kanmon, a scripted
headless Chromium in the device namespace signing in; the gateway as OIDC client.

Devices: ``alice-phone`` (registered owner alice) and ``pool-tablet`` (group shared-pool:
anyone may sign in on it). Policy: files.example.test is a 機密性3 system that needs MFA
within 8 h; mdm.test is reachable before sign-in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlparse

import pytest
from wireguard_tools import WireguardKey

from gateway.lab.browser import run_browser
from gateway.lab.oidcprovider import TEST_USERS, OidcClient
from gateway.lab.topology import SPARE4, WEB4, Lab, wait_until
from tests.e2e.conftest import ARTIFACTS, require_lab, running_lab
from tests.e2e.test_device_lifecycle import DOWNLOAD
from tests.e2e.test_oidc_lab import _require_oidc_lab

pytestmark = pytest.mark.e2e

PORTAL = "signin.kanmon.internal"
CALLBACK = f"https://{PORTAL}/callback"
SESSION_SECONDS = 45

# Counts the TCP connections that reach an internet host within 4 seconds.
TCP_LISTENER = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(); srv.settimeout(0.2)
n, end = 0, time.time() + 4
while time.time() < end:
    try:
        srv.accept(); n += 1
    except socket.timeout:
        pass
print(n)
"""

POLICY = """\
version: 1
settings: {default_action: allow}
systems:
  personnel:
    class: 3
    hosts: [files.example.test]
    description: 人事システム (機密性3)
rules:
  - id: class3-needs-mfa
    action: block
    reason: 機密性3 のシステムは 8 時間以内の多要素認証が必要 / class-3 systems need MFA within 8 h
    match: {system_class: ">= 3"}
    unless: {mfa_within: 8h}
    dns_block: sinkhole      # the name resolves to the gateway, so the user sees why (block page)
"""


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    require_lab()
    _require_oidc_lab()
    work = tmp_path_factory.mktemp("signin")
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    lab = Lab(work, n_devices=2, idp=True, idp_client=OidcClient(redirect_uris=(CALLBACK,)))
    with running_lab(lab, "test_signin_e2e", start=False):
        # The client id and secret are the IdP's, known once the lab (and its IdP) is built.
        lab.config_overrides = {
            "policy": {"path": str(policy)},
            "signin": {
                "issuer": "https://idp.test", "client_id": lab.idp.client.client_id,
                "client_secret": lab.idp.client.client_secret, "ca_file": str(lab.ca.cert_path),
                "portal_host": PORTAL, "session_lifetime": SESSION_SECONDS,
                "allow_before_signin": ["mdm.test"], "shared_groups": ["shared-pool"],
            },
        }
        lab.write_config()
        lab.start_gateway()
        _as_registered(lab, lab.devices[0], "alice-phone", "--owner", TEST_USERS["alice"].email)
        _as_registered(lab, lab.devices[1], "pool-tablet", "--owner", "pool", "--group", "shared-pool")
        yield lab


@pytest.fixture(autouse=True)
def _idp_mode(slab):
    slab.idp.set_mode("none")
    yield
    slab.idp.set_mode("none")


def _as_registered(lab: Lab, device, device_id: str, *options: str) -> None:
    key = WireguardKey.generate()
    out = lab.kanmon("device", "add", "--config", str(lab.config_path), "--id", device_id,
                     "--public-key", str(key.public_key()), *options, "--json")
    device.assume_identity(device_id, key, json.loads(out.stdout)["ipv4"], lab.workdir)
    lab.wait_for_peer(device)


def _curl(device, url: str, *extra: str):
    out = device.curl(url, "-s", "-o", "/dev/null", "-D", "-", "-w", "HTTP_CODE=%{http_code}", *extra)
    return out.stdout


def _code(out: str) -> str:
    return out.rsplit("HTTP_CODE=", 1)[-1].strip()


def _header(out: str, name: str) -> str | None:
    for line in out.splitlines():
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _signin_steps(user: str, start: str = "http://example.test/", expect: str = "http://example.test/**",
                  shot: str | None = None) -> list[dict]:
    u = TEST_USERS[user]
    steps = [{"action": "goto", "url": start},
             {"action": "wait_for_url", "pattern": f"https://{PORTAL}/**"},
             {"action": "text", "selector": "#ja"},
             {"action": "text", "selector": "#en"}]
    if shot:
        steps.append({"action": "screenshot", "path": shot})
    steps += [{"action": "click", "selector": "#signin-link"},
              {"action": "wait_for_url", "pattern": "https://idp.test/**"},
              {"action": "fill", "selector": "#username", "value": u.username},
              {"action": "fill", "selector": "#password", "value": u.password},
              {"action": "click", "selector": "#login-submit"}]
    if u.otp:
        steps += [{"action": "fill", "selector": "#otp", "value": u.otp},
                  {"action": "click", "selector": "#otp-submit"}]
    return steps + [{"action": "wait_for_url", "pattern": expect}, {"action": "url"}]


def _sign_in(lab: Lab, device, user: str, **kw) -> dict:
    result = run_browser(device, _signin_steps(user, **kw), timeout=120)
    assert result["ok"], result
    return result


def _auth(lab: Lab, action: str, device_id: str | None = None) -> list[dict]:
    return [r for r in lab.log_records("auth") if r.get("event.action") == action
            and (device_id is None or r.get("device.id") == device_id)]


def _sessions(lab: Lab, user: str, *, ended_too: bool = False) -> list[dict]:
    out = lab.kanmon("user", "sessions", "--config", str(lab.config_path), "--user", user, "--json",
                     *(("--all",) if ended_too else ()))
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _signout(lab: Lab, user: str) -> None:
    lab.kanmon("user", "signout", user, "--config", str(lab.config_path), check=False)


# -- before sign-in -------------------------------------------------------------------------------
def test_before_signin_pages_redirect_other_traffic_is_blocked_and_preauth_hosts_work(slab):
    dev = slab.devices[0]
    before = len(slab.nginx_requests())
    page = _curl(dev, "http://example.test/inbox?x=1", "-H", "Accept: text/html")
    assert _code(page) == "302"
    location = _header(page, "location")
    assert location is not None and location.startswith(f"https://{PORTAL}/?next=")
    assert parse_qs(urlparse(location).query)["next"] == ["http://example.test/inbox?x=1"]
    api = _curl(dev, "https://example.test/api/items", "-H", "Accept: application/json")
    assert _code(api) == "403" and _header(api, "x-kanmon-rule") == "kanmon:signin-required"
    # Raw TCP (not HTTP) to the internet: blocked, no connection reaches the server.
    listener = slab.inet.popen(sys.executable, "-c", TCP_LISTENER, SPARE4, "7070", stdout=subprocess.PIPE)
    time.sleep(0.5)
    dev.ns.python(f"import socket\ns = socket.create_connection(({SPARE4!r}, 7070), timeout=3)\n"
                  "s.sendall(b'HELLO raw protocol\\r\\n')\ntry:\n    s.recv(10)\nexcept OSError:\n    pass\n",
                  check=False)
    accepted = int(listener.communicate(timeout=15)[0].strip() or -1)
    assert accepted == 0, "a raw TCP connection of an unsigned device reached the internet"
    # Pre-sign-in destinations: the IdP itself and mdm.test (config).
    assert _code(_curl(dev, "https://idp.test/.well-known/openid-configuration")) == "200"
    assert _code(_curl(dev, "https://mdm.test/")) == "200"
    hosts = [r.get("host") for r in slab.nginx_requests()[before:]]
    assert "mdm.test" in hosts and "example.test" not in hosts, hosts
    proxy = [r for r in slab.log_records("proxy") if r.get("rule.id") == "kanmon:signin-required"
             and r.get("device.id") == "alice-phone"]
    assert proxy and all(r.get("user.name") is None for r in proxy)


# -- sign-in in Chromium ------------------------------------------------------------------------------
def test_mfa_user_signs_in_in_chromium_and_is_named_in_logs_and_policy_test(slab):
    dev = slab.devices[0]
    shot = str(ARTIFACTS / "signin-portal.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    result = _sign_in(slab, dev, "alice", shot=shot)
    texts = [s.get("value") for s in result["steps"] if s["action"] == "text"]
    assert any("サインインが必要です" in (t or "") for t in texts) and any("Sign-in required" in (t or "") for t in texts)
    assert result["steps"][-1]["value"].startswith("http://example.test/")
    ok = _auth(slab, "user-signin", "alice-phone")
    assert ok and ok[-1]["event.outcome"] == "success" and ok[-1]["user.name"] == "alice"
    assert ok[-1]["kanmon.auth.mfa"] is True and "otp" in ok[-1]["kanmon.auth.amr"]
    sessions = _sessions(slab, "alice")
    assert sessions and sessions[-1]["device_id"] == "alice-phone" and sessions[-1]["mfa"] is True
    assert slab.metric_value("kanmon_user_sessions") >= 1
    assert slab.metric_value("kanmon_user_signins_total", outcome="success", reason="signed-in") >= 1
    # Now browsing works, the log names the user, the MFA-only system is open to her.
    assert _code(_curl(dev, "https://example.test/after", "-H", "Accept: text/html")) == "200"
    assert _code(_curl(dev, "https://files.example.test/payroll")) == "200"
    wait_until(lambda: any(r.get("url.full", "").endswith("/after") and r.get("user.name") == "alice"
                           for r in slab.log_records("proxy")), 10, "proxy record naming alice")
    dev.ns.run("getent", "hosts", "www.example.test", check=False)
    wait_until(lambda: any(r.get("dns.question.name", "").rstrip(".") == "www.example.test"
                           and r.get("user.name") == "alice" for r in slab.log_records("dns")),
               10, "dns record naming alice")
    tested = slab.kanmon("policy", "test", "--policy", str(slab.workdir / "policy.yaml"), "--device", "alice-phone",
                         "--config", str(slab.config_path), "--json", "https://files.example.test/payroll")
    verdict = json.loads(tested.stdout)
    assert verdict["user"] == "alice" and verdict["verdict"] == "allow" and verdict["mfa"] is True


def test_mfa_rule_blocks_the_password_only_user(slab):
    dev = slab.devices[1]
    _sign_in(slab, dev, "bob")
    assert _sessions(slab, "bob")[-1]["mfa"] is False
    assert _code(_curl(dev, "https://example.test/ok")) == "200"
    blocked = _curl(dev, "https://files.example.test/payroll")
    assert _code(blocked) == "403" and _header(blocked, "x-kanmon-rule") == "class3-needs-mfa"
    tested = slab.kanmon("policy", "test", "--policy", str(slab.workdir / "policy.yaml"), "--device", "pool-tablet",
                         "--config", str(slab.config_path), "--json", "https://files.example.test/payroll")
    assert json.loads(tested.stdout)["user"] == "bob" and json.loads(tested.stdout)["rule"] == "class3-needs-mfa"


def test_owner_mismatch_is_refused_on_a_personal_device(slab):
    dev = slab.devices[0]
    _signout(slab, "alice")
    result = run_browser(dev, _signin_steps("bob", expect=f"{CALLBACK}**") + [{"action": "text", "selector": "#reason"}],
                         timeout=120)
    assert result["steps"][-1]["value"] == "owner-mismatch"
    refused = [r for r in _auth(slab, "user-signin", "alice-phone") if r["event.outcome"] == "failure"]
    assert refused and refused[-1]["kanmon.auth.reason"] == "owner-mismatch"
    assert not [s for s in _sessions(slab, "bob") if s["device_id"] == "alice-phone"]


# -- bad tokens and replays ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode,reason", [("tamper", "token-signature-invalid"), ("wrong-aud", "token-aud-invalid"),
                                         ("wrong-iss", "token-iss-invalid"), ("expired", "token-expired"),
                                         ("replay-nonce", "token-nonce-invalid")])
def test_defective_id_tokens_are_refused_and_logged(slab, mode, reason):
    dev = slab.devices[1]
    _signout(slab, "bob")
    slab.idp.set_mode(mode)
    result = run_browser(dev, _signin_steps("bob", expect=f"{CALLBACK}**") + [{"action": "text", "selector": "#reason"}],
                         timeout=120)
    assert result["steps"][-1]["value"] == reason, result
    failures = [r for r in _auth(slab, "user-signin", "pool-tablet") if r["event.outcome"] == "failure"]
    assert failures and failures[-1]["kanmon.auth.reason"] == reason
    # The alert's series and the sign-in panel count it.
    assert slab.metric_value("kanmon_auth_failures_total", reason=reason) >= 1
    assert slab.metric_value("kanmon_user_signins_total", outcome="failure", reason=reason) >= 1
    assert not [s for s in _sessions(slab, "bob") if s["ended_at"] is None]
    assert _code(_curl(dev, "https://example.test/")) == "403"  # still not signed in


def test_rotated_signing_key_is_fetched_and_accepted(slab):
    dev = slab.devices[1]
    _signout(slab, "bob")
    slab.idp.set_mode("rotate-keys")
    _sign_in(slab, dev, "bob")
    assert [s for s in _sessions(slab, "bob") if s["ended_at"] is None]


def test_replayed_callback_state_is_refused(slab):
    dev = slab.devices[1]
    _signout(slab, "bob")
    steps = _signin_steps("bob")
    # Stop at the callback: let the browser complete it, then send the very same callback again.
    first = run_browser(dev, steps[:-2] + [{"action": "wait_for_url", "pattern": "http://example.test/**"}],
                        timeout=120)
    callbacks = [r["url"] for r in first.get("responses", []) if r.get("url", "").startswith(CALLBACK)]
    assert callbacks, first.get("responses")
    replay = run_browser(dev, [{"action": "goto", "url": callbacks[0]}, {"action": "text", "selector": "#reason"}])
    assert replay["steps"][-1]["value"] == "state-replayed"
    failures = [r for r in _auth(slab, "user-signin", "pool-tablet") if r["event.outcome"] == "failure"]
    assert failures[-1]["kanmon.auth.reason"] == "state-replayed"


# -- sign-out and expiry ------------------------------------------------------------------------------
def test_signout_cuts_the_users_live_download(slab):
    dev = slab.devices[0]
    _signout(slab, "alice")
    _sign_in(slab, dev, "alice")
    proc = subprocess.Popen(dev.ns.cmd(sys.executable, "-c", DOWNLOAD, WEB4), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "flowing"
    started = time.time()
    slab.kanmon("user", "signout", "alice", "--config", str(slab.config_path), "--reason", "lost phone")
    result = json.loads(proc.stdout.readline())
    proc.wait(timeout=10)
    assert result["last_data"] - started < 2.0, "the download kept flowing after the sign-out"
    assert _code(_curl(dev, "http://example.test/", "-H", "Accept: text/html")) == "302"
    ended = _auth(slab, "user-session-ended", "alice-phone")
    assert ended and ended[-1]["user.name"] == "alice"
    audit = [r for r in slab.log_records("audit") if r.get("event.action") == "user.signout"]
    assert audit and audit[-1]["event.reason"] == "lost phone"


def test_expired_session_redirects_again(slab):
    dev = slab.devices[1]
    _signout(slab, "bob")
    _sign_in(slab, dev, "bob")
    assert _code(_curl(dev, "https://example.test/")) == "200"
    session = [s for s in _sessions(slab, "bob") if s["ended_at"] is None][-1]
    expires = session["expires_at"]
    wait_until(lambda: _code(_curl(dev, "http://example.test/", "-H", "Accept: text/html")) == "302",
               SESSION_SECONDS + 15, f"redirect after the session expired at {expires}")
    # The page is refused as soon as the session is past its end; the gateway's next session
    # tick (50 ms) writes the auth record.
    wait_until(lambda: _auth(slab, "user-session-expired", "pool-tablet"), 5, "the session-expired auth record")


def test_shared_device_hand_over_signs_out_and_the_idp_asks_the_next_user_to_log_in(slab):
    # One browser on the pool tablet, as at a counter: bob signs in, presses the portal's
    # sign-out button, carol signs in. The IdP still holds bob's session cookie in this
    # browser; the gateway asks for a new login (prompt=login, max_age=0), so the IdP shows
    # its login form again (the steps fill it: with single sign-on they would time out).
    dev = slab.devices[1]
    for user in ("bob", "carol"):
        _signout(slab, user)
    steps = _signin_steps("bob") + [
        {"action": "goto", "url": f"https://{PORTAL}/"},
        {"action": "text", "selector": "#user"},
        {"action": "click", "selector": "#signout"},
        {"action": "text", "selector": "#signin-link"},
    ] + _signin_steps("carol")
    result = run_browser(dev, steps, timeout=180)
    assert result["ok"], result
    texts = [s.get("value") for s in result["steps"] if s.get("action") == "text"]
    assert "bob" in texts
    active = [s for s in _sessions(slab, "carol") if s["ended_at"] is None and s["device_id"] == "pool-tablet"]
    assert active, _sessions(slab, "carol", ended_too=True)
    bob = [s for s in _sessions(slab, "bob", ended_too=True) if s["device_id"] == "pool-tablet"][-1]
    assert bob["ended_at"] is not None and bob["end_reason"] == "signed out by the user"
    assert _auth(slab, "user-signout", "pool-tablet")[-1]["user.name"] == "bob"
    carol_in = [r for r in _auth(slab, "user-signin", "pool-tablet") if r["event.outcome"] == "success"][-1]
    assert carol_in["user.name"] == "carol"
    assert _code(_curl(dev, "https://example.test/")) == "200"
    _signout(slab, "carol")     # the next tests start with the tablet signed out


def test_revoking_the_device_ends_its_session(slab):
    dev = slab.devices[1]
    _signout(slab, "bob")
    _sign_in(slab, dev, "bob")
    slab.kanmon("device", "revoke", "pool-tablet", "--config", str(slab.config_path), "--reason", "lost")
    wait_until(lambda: not [s for s in _sessions(slab, "bob") if s["ended_at"] is None], 10, "bob's session to end")
    ended = [s for s in _sessions(slab, "bob", ended_too=True) if s["device_id"] == "pool-tablet"]
    assert ended[-1]["end_reason"] == "device no longer admitted"
    assert _auth(slab, "user-session-ended", "pool-tablet")[-1]["user.name"] == "bob"
