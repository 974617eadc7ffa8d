"""Issue #21 "Must show": the operator console in Debian's Chromium (Playwright, as
gateway/lab/browser.py drives it) against the lab's real OIDC provider (https://idp.test).

The console runs as its own process (`kanmon console serve`) in the gateway's namespace,
on the gateway's management address (192.0.2.10:9443) with a certificate of the organization
CA; the operators' browser runs on the management side (the gateway namespace), the devices
behind their WireGuard tunnels.

- a helpdesk operator signs in (MFA), finds a device, registers another (QR code), revokes the
  first, and the device's running download through the tunnel dies within 100 ms of the
  registry write the click made;
- an auditor sees the pages, and a change posted by hand from their session (valid token) is
  refused server-side;
- a user without MFA is refused (bilingual page);
- a staff member reports their phone lost from a "laptop" browser: the phone's traffic stops;
  the same form posted with another user's device id is refused;
- CSRF: a cross-site post and posts without token / with another Origin are refused; a fresh
  session id at every sign-in, and a signed-out cookie replayed is refused;
- the console cannot be reached from a device tunnel through any gateway address;
- screenshots of every page at 390 px (phone, no horizontal overflow) and 1280 px, with DOM
  assertions, in artifacts/e2e/console/.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from wireguard_tools import WireguardKey

from gateway.lab.oidcprovider import TEST_USERS, OidcClient, TestUser, oidc_prerequisites
from gateway.lab.topology import (GATEWAY_TUNNEL4, GATEWAY_TUNNEL6, UNDERLAY_GW, UPLINK_GW4, Lab, LabError,
                                  _project_root, run, wait_until)
from tests.availability import unavailable
from tests.e2e.conftest import ARTIFACTS, require_lab, running_lab
from tests.e2e.test_device_lifecycle import DOWNLOAD

pytestmark = pytest.mark.e2e

SHOTS = ARTIFACTS / "e2e" / "console"
PORT = 9443
MANAGEMENT_ADDRESS = "192.0.2.10"      # the gateway host's management address (on its loopback here)
CONSOLE = f"https://{MANAGEMENT_ADDRESS}:{PORT}"
VIEWPORTS = {"phone": (390, 844), "desktop": (1280, 900)}
USERS = dict(TEST_USERS)
USERS["hana"] = TestUser("hana", "hana-pass", "0b9f1c3e-4a4a-4e00-9000-0000000044aa", "hana@city.kanmon.example.jp",
                         "Hana Ito", ("staff", "it-helpdesk"), otp="135790")
USERS["aki"] = TestUser("aki", "aki-pass", "0b9f1c3e-a4a4-4e00-9000-00000000a4a4", "aki@city.kanmon.example.jp",
                        "Aki Mori", ("audit",), otp="975310")


def _require_browser() -> None:
    missing = list(oidc_prerequisites())
    if not os.path.exists("/usr/bin/chromium"):
        missing.append("chromium (apt-get install chromium)")
    if shutil.which("certutil") is None:
        missing.append("certutil (apt-get install libnss3-tools)")
    try:
        __import__("playwright")
    except ImportError:
        missing.append("python package playwright==1.65.2")
    if missing:
        unavailable("console browser tests cannot run here: missing " + ", ".join(missing))


@pytest.fixture(scope="module")
def clab(tmp_path_factory):
    require_lab()
    _require_browser()
    work = tmp_path_factory.mktemp("console")
    lab = Lab(work, n_devices=2, idp=True, idp_client=OidcClient(redirect_uris=(f"{CONSOLE}/callback",)),
              idp_users=USERS)
    with running_lab(lab, "test_console_browser", start=False):
        lab.config_overrides = {   # no signin: section: the devices need no user sign-in here
            "console": {"listen": f"{MANAGEMENT_ADDRESS}:{PORT}", "public_url": CONSOLE,
                        "roles": {"helpdesk": ["it-helpdesk"], "auditor": ["audit"]},
                        "oidc": {"issuer": "https://idp.test", "client_id": lab.idp.client.client_id,
                                 "client_secret": lab.idp.client.client_secret, "ca_file": str(lab.ca.cert_path)}},
        }
        lab.write_config()
        lab.gw.run("ip", "addr", "add", f"{MANAGEMENT_ADDRESS}/32", "dev", "lo")
        lab.kanmon("ca", "init", "--org", "Kanmon Lab City", "--config", str(lab.config_path))
        lab.start_gateway()
        _as(lab, lab.devices[0], "alice-phone", USERS["alice"].email)
        _as(lab, lab.devices[1], "field-tablet-7", "kenji@city.kanmon.example.jp")
        lab.kanmon("device", "add", "--config", str(lab.config_path), "--id", "spare-laptop", "--public-key",
                   str(WireguardKey.generate().public_key()), "--owner", "kenji@city.kanmon.example.jp")
        log = open(work / "console.log", "w")
        env = dict(os.environ, PYTHONPATH=_project_root())
        proc = lab.gw.popen(sys.executable, "-m", "gateway.cli", "console", "serve", "--config", str(lab.config_path),
                            stdout=log, env=env)
        lab.console_log = work / "console.log"
        lab.org_ca = lab.state_dir / "pki" / "ca" / "ca.cert.pem"
        try:
            wait_until(lambda: lab.gw.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                                          str(lab.org_ca), f"{CONSOLE}/signin", check=False).stdout == "200",
                       30, "the console to answer")
            SHOTS.mkdir(parents=True, exist_ok=True)
            yield lab
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=10)
            shutil.copy(work / "console.log", ARTIFACTS / "e2e" / "test_console_browser" / "console.log") \
                if (ARTIFACTS / "e2e" / "test_console_browser").exists() else None


def _as(lab: Lab, device, device_id: str, owner: str) -> None:
    key = WireguardKey.generate()
    out = lab.kanmon("device", "add", "--config", str(lab.config_path), "--id", device_id, "--public-key",
                     str(key.public_key()), "--owner", owner, "--group", "staff", "--json")
    device.assume_identity(device_id, key, json.loads(out.stdout)["ipv4"], lab.workdir)
    lab.wait_for_peer(device)


def browse(lab: Lab, steps: list[dict], timeout: float = 180) -> dict:
    """The scripted Chromium (gateway/lab/browser.py) in the gateway namespace: the operators'
    side. It trusts the organization CA (the console) and the lab CA (the IdP)."""
    script = Path(tempfile.mkstemp(prefix="console-steps-", suffix=".json", dir=lab.workdir)[1])
    script.write_text(json.dumps(steps))
    cmd = lab.gw.cmd(sys.executable, "-m", "gateway.lab.browser", "--script", str(script), "--step-timeout", "30",
                     "--ca", str(lab.org_ca), "--ca", str(lab.ca.cert_path))
    proc = run(cmd, check=False, timeout=timeout, env=dict(os.environ, PYTHONPATH=_project_root()))
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise LabError(f"the browser failed ({proc.returncode}): {proc.stderr[-3000:]}") from None


def signin_steps(user: str, expect: str) -> list[dict]:
    u = USERS[user]
    steps = [{"action": "goto", "url": f"{CONSOLE}/"},
             {"action": "wait_for_url", "pattern": f"{CONSOLE}/signin**"},
             {"action": "click", "selector": "#signin-start"},
             {"action": "wait_for_url", "pattern": "https://idp.test/**"},
             {"action": "fill", "selector": "#username", "value": u.username},
             {"action": "fill", "selector": "#password", "value": u.password},
             {"action": "click", "selector": "#login-submit"}]
    if u.otp:
        steps += [{"action": "fill", "selector": "#otp", "value": u.otp}, {"action": "click", "selector": "#otp-submit"}]
    # waiting for an element of the landing page, not for its URL: the callback page moves on by
    # itself (meta refresh) and may have done so before a URL wait would start
    return steps + [{"action": "text", "selector": expect}]


def shots(name: str, expression: str | None = None) -> list[dict]:
    """Phone and desktop screenshots of the current page, each with the overflow check and an
    optional DOM expression evaluated at that size."""
    steps = []
    for size, (width, height) in VIEWPORTS.items():
        steps += [{"action": "viewport", "width": width, "height": height},
                  {"action": "overflow", "name": f"{name}-{size}"},
                  {"action": "screenshot", "path": str(SHOTS / f"{name}-{size}.png")}]
        if expression:
            steps.append({"action": "eval", "expression": expression, "name": f"{name}-{size}-dom"})
    return steps


def failed(result: dict) -> list:
    """What went wrong in a browser run: the failed step (with the one before it), failed requests."""
    steps = result["steps"]
    bad = [i for i, s in enumerate(steps) if not s["ok"] and not s.get("skipped")]
    return [steps[max(0, i - 1):i + 1] + [f"step {i}"] for i in bad] + result["failures"]


def value(result: dict, steps: list[dict], name: str):
    """The value of the step named ``name`` (a key the test adds; the runner ignores it)."""
    for step, record in zip(steps, result["steps"]):
        if step.get("name") == name:
            assert record["ok"], record
            return record.get("value")
    raise AssertionError(f"no step {name}: {result}")


def assert_layout(result: dict, steps: list[dict], name: str) -> None:
    for size in VIEWPORTS:
        scroll, client = value(result, steps, f"{name}-{size}")
        assert scroll <= client, f"{name} overflows horizontally at {size}: {scroll} > {client}"
        assert (SHOTS / f"{name}-{size}.png").stat().st_size > 5000


def registry_rows(lab: Lab, sql: str, *params) -> list[sqlite3.Row]:
    db = sqlite3.connect(lab.state_dir / "registry.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def status_of(lab: Lab, device_id: str) -> str:
    return registry_rows(lab, "SELECT status FROM devices WHERE device_id=?", device_id)[0]["status"]


def post_by_hand(name: str, fields: dict[str, str], action: str, *, token: bool = True) -> list[dict]:
    """Steps that post a form made up in the page (as a user editing the page's form by hand
    would), with the page's CSRF token unless ``token`` is False; the answer's status code
    (the console's error page, or 0 when the post passed) is the value of step ``name``."""
    body = json.dumps(fields)
    return [{"action": "eval", "expression": f"""() => {{
        const f = document.createElement('form'); f.method = 'post'; f.action = '{action}';
        const fields = {body};
        {"fields.csrf_token = document.querySelector('input[name=csrf_token]').value;" if token else ""}
        for (const [k, v] of Object.entries(fields)) {{
          const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }}
        document.body.appendChild(f); f.submit(); }}"""},
            {"action": "wait_for_url", "regex": ".*", "timeout": 10},
            {"action": "text", "selector": "#error-code", "name": name}]


# -- the helpdesk --------------------------------------------------------------------------------

def test_helpdesk_finds_registers_and_revokes_and_the_download_dies_within_100ms(clab):
    lab = clab
    phone = lab.devices[1]          # field-tablet-7
    ready, go = lab.workdir / "revoke-ready", lab.workdir / "revoke-go"
    list_dom = ("() => ({rows: [...document.querySelectorAll('#device-table tbody tr')].map(r => r.dataset.device),"
                " roles: document.querySelector('#operator').dataset.roles, lang: document.documentElement.lang})")
    device_dom = ("() => ({status: document.querySelector('#device-status').dataset.status,"
                  " revoke: !!document.querySelector('#do-revoke'), history: document.querySelectorAll('#history tbody tr').length})")
    steps = signin_steps("hana", "#device-table")
    steps += shots("devices", list_dom)
    steps += [{"action": "goto", "url": f"{CONSOLE}/devices?q=tablet"},
              {"action": "eval", "expression": list_dom, "name": "search"},
              {"action": "goto", "url": f"{CONSOLE}/devices?status=revoked"},
              {"action": "eval", "expression": list_dom, "name": "filter-revoked"},
              {"action": "goto", "url": f"{CONSOLE}/devices/new"}]
    steps += shots("register")
    steps += [{"action": "fill", "selector": "#device_id", "value": "hana-new-phone"},
              {"action": "fill", "selector": "#owner", "value": "hana@city.kanmon.example.jp"},
              {"action": "click", "selector": "#register-submit"},
              {"action": "eval", "expression": "() => [document.querySelector('#registered').dataset.device,"
                                               " document.querySelector('#qr').naturalWidth]", "name": "qr"}]
    steps += shots("registered")
    steps += [{"action": "goto", "url": f"{CONSOLE}/devices/hana-new-phone"},
              {"action": "fill", "selector": "#renew-reason", "value": "first certificate"},
              {"action": "click", "selector": "#do-renew"},
              {"action": "text", "selector": "#p12-password", "name": "p12-password"}]
    steps += shots("renewed")
    steps += [{"action": "goto", "url": f"{CONSOLE}/devices/field-tablet-7"}]
    steps += shots("device", device_dom)
    steps += [{"action": "viewport", "width": 390, "height": 844},
              {"action": "select", "selector": "#revoke-reason", "value": "lost"},
              {"action": "signal", "path": str(ready)},
              {"action": "wait_file", "path": str(go), "timeout": 60},
              {"action": "click", "selector": "#do-revoke"},
              {"action": "text", "selector": "#device-status[data-status=revoked]"},
              {"action": "eval", "expression": device_dom, "name": "after"},
              {"action": "screenshot", "path": str(SHOTS / "device-revoked-phone.png")}]
    results: list[dict] = []
    browser = threading.Thread(target=lambda: results.append(browse(lab, steps)), daemon=True)
    browser.start()
    wait_until(lambda: ready.exists() or not browser.is_alive(), 150, "the browser at the device page")
    assert ready.exists(), results
    download = subprocess.Popen(phone.ns.cmd(sys.executable, "-c", DOWNLOAD, "198.51.100.80"), stdout=subprocess.PIPE,
                                text=True)
    assert download.stdout.readline().strip() == "flowing", "the download runs before the click"
    go.touch()
    browser.join(timeout=120)
    result = results[0]
    outcome = json.loads(download.communicate(timeout=30)[0].strip().splitlines()[-1])
    assert result["ok"], failed(result)

    # the click's registry write, and the end of the download
    row = registry_rows(lab, "SELECT at, actor, reason FROM audit WHERE device_id=? AND action='device-revoked'",
                        "field-tablet-7")[0]
    written = datetime.fromisoformat(row["at"]).timestamp()
    cut_ms = (outcome["last_data"] - written) * 1000
    (SHOTS / "revocation-from-console.json").write_text(json.dumps(
        {"registry_write": row["at"], "last_data": outcome["last_data"], "cut_after_write_ms": round(cut_ms, 1),
         "bytes": outcome["bytes"]}, indent=2))
    assert cut_ms <= 100, f"the download died {cut_ms:.1f} ms after the registry write"
    assert row["actor"] == f"console:{USERS['hana'].email} (sub={USERS['hana'].sub})" and row["reason"] == "lost"
    assert status_of(lab, "field-tablet-7") == "revoked"
    assert phone.public_key not in lab.gw.run("wg", "show", lab.wg_interface, "peers").stdout

    # DOM assertions of the pages on the way
    for size in VIEWPORTS:
        dom = value(result, steps, f"devices-{size}-dom")
        assert {"alice-phone", "field-tablet-7"} <= set(dom["rows"]) and dom["roles"] == "helpdesk user"
    assert value(result, steps, "search")["rows"] == ["field-tablet-7"]
    assert value(result, steps, "filter-revoked")["rows"] == []
    assert value(result, steps, "qr")[0] == "hana-new-phone" and value(result, steps, "qr")[1] > 100
    before = value(result, steps, "device-phone-dom")
    assert before["status"] == "active" and before["revoke"] and before["history"] >= 1
    after = value(result, steps, "after")
    assert after["status"] == "revoked" and not after["revoke"] and after["history"] >= 2
    assert len(value(result, steps, "p12-password")) >= 12
    assert registry_rows(lab, "SELECT cert_serial FROM devices WHERE device_id='hana-new-phone'")[0]["cert_serial"]
    for name in ("devices", "register", "registered", "renewed", "device"):
        assert_layout(result, steps, name)
    assert registry_rows(lab, "SELECT owner FROM devices WHERE device_id='hana-new-phone'")[0]["owner"] == \
        "hana@city.kanmon.example.jp"
    # the gateway shipped the console's entries into the tamper-evident audit stream
    wait_until(lambda: any(r.get("event.action") == "device-revoked" and r.get("device.id") == "field-tablet-7"
                           and "sub=" in r.get("user.name", "") for r in lab.log_records("audit")), 15,
               "the revocation in the audit stream")


# -- the auditor, the user without MFA -----------------------------------------------------------

def test_an_auditor_sees_the_pages_but_every_change_is_refused_server_side(clab):
    lab = clab
    before = {r["device_id"]: r["status"] for r in registry_rows(lab, "SELECT device_id, status FROM devices")}
    steps = signin_steps("aki", "#device-table")
    steps += [{"action": "eval", "expression": "() => [document.querySelectorAll('#device-table tbody tr').length,"
                                               " !!document.querySelector('#register-link')]", "name": "list"},
              {"action": "goto", "url": f"{CONSOLE}/devices/alice-phone"},
              {"action": "eval", "expression": "() => [!!document.querySelector('form.actions-form'),"
                                               " document.querySelectorAll('#history tbody tr').length]", "name": "page"},
              # changes posted by hand from the auditor's own page: a valid token, the right Origin
              *post_by_hand("revoke", {"action": "revoke", "reason": "lost"}, "/devices/alice-phone/action"),
              {"action": "goto", "url": f"{CONSOLE}/devices/alice-phone"},
              *post_by_hand("register", {"device_id": "aki-x", "owner": "aki", "ownership": "org"}, "/devices/new"),
              {"action": "goto", "url": f"{CONSOLE}/devices/alice-phone"},
              *post_by_hand("lost", {"device_id": "alice-phone"}, "/me/devices/lost"),
              {"action": "goto", "url": f"{CONSOLE}/devices/new"},
              {"action": "eval", "expression": "() => document.querySelector('#error-code').dataset.code", "name": "new"}]
    steps += shots("auditor-device-403")
    # the same pages in Japanese (the language switch in the header)
    steps += [{"action": "goto", "url": f"{CONSOLE}/lang/ja"}, {"action": "text", "selector": "#device-table"}]
    steps += shots("devices-ja", "() => [document.documentElement.lang, document.querySelector('h1').textContent]")
    result = browse(lab, steps)
    assert result["ok"], failed(result)
    rows, register_link = value(result, steps, "list")
    assert rows >= 3 and not register_link
    has_forms, history = value(result, steps, "page")
    assert not has_forms and history >= 1
    assert [value(result, steps, n).strip() for n in ("revoke", "register", "lost")] == ["403", "403", "403"]
    assert value(result, steps, "new") == "403"
    assert value(result, steps, "devices-ja-phone-dom") == ["ja", "端末"]
    assert_layout(result, steps, "devices-ja")
    after = {r["device_id"]: r["status"] for r in registry_rows(lab, "SELECT device_id, status FROM devices")}
    assert after == before
    refused = registry_rows(lab, "SELECT actor, reason FROM audit WHERE action='console-refused' AND actor LIKE ?",
                            f"%{USERS['aki'].email}%")
    assert len(refused) >= 3 and all("read-only" in r["reason"] for r in refused)


def test_a_user_without_mfa_is_refused(clab):
    steps = signin_steps("bob", "#reason")
    steps += [{"action": "eval", "name": "page", "expression":
               "() => [document.querySelector('#reason').dataset.reason, document.querySelector('#reason-ja').textContent,"
               " document.querySelector('#reason-en').textContent, document.cookie]"}]
    steps += shots("refused-no-mfa")
    steps += [{"action": "cookies", "name": "cookies"}, {"action": "goto", "url": f"{CONSOLE}/devices"},
              {"action": "url", "name": "after"}]
    result = browse(clab, steps)
    assert result["ok"], failed(result)
    reason, ja, en, _ = value(result, steps, "page")
    assert reason == "mfa-missing" and "多要素認証" in ja and "multi-factor" in en
    callback = [r for r in result["responses"] if "/callback" in r["url"]]
    assert callback and callback[-1]["status"] == 403
    assert not any(c["name"] == "__Host-kanmon-console" for c in value(result, steps, "cookies"))
    assert value(result, steps, "after").startswith(f"{CONSOLE}/signin")
    assert_layout(result, steps, "refused-no-mfa")


# -- self-service ---------------------------------------------------------------------------------

def test_a_staff_member_reports_their_phone_lost_from_a_laptop(clab):
    lab = clab
    phone = lab.devices[0]          # alice-phone
    assert phone.curl("http://www.example.test/", timeout=5).stdout.rsplit("HTTP_CODE=", 1)[-1].strip() == "200"
    dom = "() => [...document.querySelectorAll('#my-devices tbody tr')].map(r => [r.dataset.device, r.dataset.status])"
    steps = signin_steps("alice", "main[data-page=my-devices]")
    steps += shots("my-devices", dom)
    steps += [{"action": "viewport", "width": 1280, "height": 900},
              # the form's device id edited to another user's device: refused
              {"action": "eval", "name": "edited", "expression":
               "() => { document.querySelector('#lost-alice-phone input[name=device_id]').value = 'field-tablet-7';"
               " document.querySelector('#report-alice-phone').click(); }"},
              {"action": "wait_for_url", "regex": ".*", "timeout": 10},
              {"action": "text", "selector": "#error-code", "name": "tampered"},
              {"action": "goto", "url": f"{CONSOLE}/me/devices"},
              *post_by_hand("tampered-unknown", {"device_id": "no-such-device"}, "/me/devices/lost"),
              {"action": "goto", "url": f"{CONSOLE}/devices"},
              {"action": "eval", "name": "operator-page",
               "expression": "() => document.querySelector('#error-code').dataset.code"},
              {"action": "goto", "url": f"{CONSOLE}/me/devices"},
              {"action": "fill", "selector": "#lost-alice-phone input[name=note]", "value": "left on the train, 22:00"},
              {"action": "click", "selector": "#report-alice-phone"},
              {"action": "text", "selector": "tr[data-device=alice-phone][data-status=suspended]"},
              {"action": "eval", "name": "after", "expression": dom}]
    steps += shots("my-devices-locked", "() => document.querySelector('.flash').textContent")
    tablet_before = status_of(lab, "field-tablet-7")
    result = browse(lab, steps)
    assert result["ok"], failed(result)
    assert value(result, steps, "my-devices-phone-dom") == [["alice-phone", "active"]]
    assert value(result, steps, "tampered").strip() == "403" and value(result, steps, "tampered-unknown").strip() == "403"
    assert status_of(lab, "field-tablet-7") == tablet_before
    assert value(result, steps, "operator-page") == "403"
    assert value(result, steps, "after") == [["alice-phone", "suspended"]]
    assert "alice-phone" in value(result, steps, "my-devices-locked-phone-dom")
    # the phone's traffic stops: no new connection, no peer
    out = phone.curl("http://www.example.test/after-loss", timeout=3)
    assert out.stdout.rsplit("HTTP_CODE=", 1)[-1].strip() == "000"
    assert phone.public_key not in lab.gw.run("wg", "show", lab.wg_interface, "peers").stdout
    row = registry_rows(lab, "SELECT actor, reason FROM audit WHERE device_id='alice-phone' AND action='device-reported-lost'")
    assert row and USERS["alice"].sub in row[0]["actor"] and "left on the train" in row[0]["reason"]
    # the helpdesk is alerted: the metric the KanmonDeviceReportedLost rule reads
    wait_until(lambda: lab.metric_value("kanmon_device_loss_reports_total") >= 1, 15, "the loss-report metric")
    for name in ("my-devices", "my-devices-locked"):
        assert_layout(result, steps, name)


# -- CSRF, fixation, replay -----------------------------------------------------------------------

def _curl_console(lab: Lab, *args: str) -> tuple[str, str]:
    out = lab.gw.run("curl", "-sS", "-o", "/dev/null", "-D", "-", "-w", "CODE=%{http_code}", "--cacert",
                     str(lab.org_ca), *args, check=False)
    return out.stdout.rsplit("CODE=", 1)[-1].strip(), out.stdout


def test_csrf_fixation_and_replay(clab):
    lab = clab
    cross_site = f"https://idp.test/.well-known/openid-configuration"
    steps = signin_steps("hana", "#device-table")
    steps += [{"action": "cookies", "name": "first"},
              {"action": "goto", "url": f"{CONSOLE}/devices/spare-laptop"},
              {"action": "eval", "name": "token", "expression":
               "() => document.querySelector('input[name=csrf_token]').value"},
              # a page of another site posts to the console (the browser sends its own headers)
              {"action": "goto", "url": cross_site},
              *post_by_hand("cross", {"action": "quarantine", "reason": "csrf"},
                            f"{CONSOLE}/devices/spare-laptop/action", token=False),
              {"action": "goto", "url": f"{CONSOLE}/devices"},
              {"action": "click", "selector": "#signout"},
              {"action": "wait_for_url", "regex": "/signin"},
              {"action": "text", "selector": "#signin-start"}]
    steps += shots("signin")
    # signed in again: the IdP's own session answers at once (single sign-on), the console
    # still makes a new session with a new id
    steps += [{"action": "click", "selector": "#signin-start"}, {"action": "text", "selector": "#device-table"}]
    steps += [{"action": "cookies", "name": "second"}]
    result = browse(lab, steps)
    assert result["ok"], failed(result)

    def session(name: str) -> str:
        return next(c["value"] for c in value(result, steps, name) if c["name"] == "__Host-kanmon-console")

    first, second, token = session("first"), session("second"), value(result, steps, "token")
    cookie = next(c for c in value(result, steps, "first") if c["name"] == "__Host-kanmon-console")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert first != second                         # a fresh id at every sign-in
    assert value(result, steps, "cross").strip() == "403"
    assert status_of(lab, "spare-laptop") == "active"      # the cross-site post changed nothing
    assert registry_rows(lab, "SELECT 1 FROM audit WHERE action='console-refused' AND reason LIKE 'csrf: Sec-Fetch-Site%'")
    form = ["--data-urlencode", "action=quarantine", "--data-urlencode", "reason=csrf test"]
    url = f"{CONSOLE}/devices/spare-laptop/action"
    live = f"Cookie: __Host-kanmon-console={second}"
    # no token / another Origin / no Origin: 403 from a live session
    assert _curl_console(lab, "-H", live, "-H", f"Origin: {CONSOLE}", *form, url)[0] == "403"
    assert _curl_console(lab, "-H", live, "-H", "Origin: https://evil.test", *form, "--data-urlencode",
                         f"csrf_token={token}", url)[0] == "403"
    assert _curl_console(lab, "-H", live, *form, "--data-urlencode", f"csrf_token={token}", url)[0] == "403"
    # the first session was signed out: its cookie, replayed, opens nothing and changes nothing
    old = f"Cookie: __Host-kanmon-console={first}"
    code, head = _curl_console(lab, "-H", old, f"{CONSOLE}/devices")
    assert code == "302" and "/signin" in head
    assert _curl_console(lab, "-H", old, "-H", f"Origin: {CONSOLE}", *form, "--data-urlencode",
                         f"csrf_token={token}", url)[0] == "403"
    # a cookie the browser never got from a sign-in (fixation): nothing
    assert _curl_console(lab, "-H", "Cookie: __Host-kanmon-console=chosen-by-an-attacker", f"{CONSOLE}/devices")[0] == "302"
    assert status_of(lab, "spare-laptop") == "active"
    assert_layout(result, steps, "signin")


# -- unreachable from the tunnels -----------------------------------------------------------------

def test_the_console_is_unreachable_from_a_device_tunnel(clab):
    lab = clab
    device_id = "probe-phone"
    key = WireguardKey.generate()
    out = lab.kanmon("device", "add", "--config", str(lab.config_path), "--id", device_id, "--public-key",
                     str(key.public_key()), "--owner", "probe", "--group", "staff", "--json")
    dev = lab.devices[1]
    dev.assume_identity(device_id, key, json.loads(out.stdout)["ipv4"], lab.workdir)
    lab.wait_for_peer(dev)
    assert dev.curl("http://www.example.test/", timeout=5).stdout.rsplit("HTTP_CODE=", 1)[-1].strip() == "200"
    seen_before = lab.console_log.read_text(errors="replace")
    answers = {}
    # every address of the gateway, sent into the tunnel (--interface: the underlay route to the
    # outer address would otherwise bypass it)
    for address in (MANAGEMENT_ADDRESS, GATEWAY_TUNNEL4, f"[{GATEWAY_TUNNEL6}]", UNDERLAY_GW, UPLINK_GW4):
        direct = dev.ns.run("curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "4",
                            "--interface", dev.wg_interface, f"https://{address}:{PORT}/signin",
                            check=False, timeout=15).stdout
        # through the proxy: an absolute-form request target naming the console: refused by the
        # proxy (authority-mismatch; behind it, the console's address is also an internal destination)
        head = dev.ns.run("curl", "-s", "-o", "/dev/null", "-D", "-", "--max-time", "4", "--interface", dev.wg_interface,
                          "--request-target", f"http://{address}:{PORT}/signin", "http://www.example.test/",
                          check=False, timeout=15).stdout.lower()
        proxied = head.split(" ", 2)[1] if head.startswith("http/") else "000"
        if proxied == "403":
            proxied += " " + next((line.split(":", 1)[1].strip() for line in head.splitlines()
                                   if line.startswith("x-kanmon-rule:")), "-")
        answers[address] = (direct, proxied)
    assert all(direct == "000" for direct, _ in answers.values()), answers
    # and the management side does reach it (the probe above is not simply wrong)
    assert _curl_console(lab, f"{CONSOLE}/signin")[0] == "200"
    assert all(proxied.startswith("403 kanmon:") for _, proxied in answers.values()), answers
    time.sleep(0.5)
    new_lines = lab.console_log.read_text(errors="replace")[len(seen_before):]
    assert "10.77.0." not in new_lines and "fd77:77" not in new_lines, new_lines
    (SHOTS / "unreachable-from-tunnel.json").write_text(json.dumps(answers, indent=2))


# -- figures: the cut-off from a click, over several trials ---------------------------------------

TRIALS = 10


def test_revocations_from_the_console_over_trials(clab):
    """One browser session revokes TRIALS devices in turn, each while it downloads; the time
    from the click's registry write to the download's last byte is recorded for every trial
    (artifacts/e2e/console/revocation-trials.json). The same rule as the CLI's trials in
    tests/e2e/test_device_lifecycle.py (a percentile, not the maximum): 9 of 10 within 100 ms, and
    none beyond a second (that is no longer a loaded machine but a cut that did not happen).
    A fresh-clone CI run with other work on the 2 cores saw one trial of 10 at 127 ms."""
    lab = clab
    dev = lab.devices[1]
    flag = lambda name: lab.workdir / f"trial-{name}"   # noqa: E731
    steps = signin_steps("hana", "#device-table")
    for i in range(TRIALS):
        steps += [{"action": "wait_file", "path": str(flag(f"prepared-{i}")), "timeout": 60},
                  {"action": "goto", "url": f"{CONSOLE}/devices/trial-{i:02d}"},
                  {"action": "text", "selector": "#do-revoke"},
                  {"action": "signal", "path": str(flag(f"ready-{i}"))},
                  {"action": "wait_file", "path": str(flag(f"go-{i}")), "timeout": 60},
                  {"action": "click", "selector": "#do-revoke"},
                  {"action": "text", "selector": "#device-status[data-status=revoked]"}]
    results: list[dict] = []
    browser = threading.Thread(target=lambda: results.append(browse(lab, steps, timeout=600)), daemon=True)
    browser.start()
    cuts = []
    for i in range(TRIALS):
        device_id = f"trial-{i:02d}"
        key = WireguardKey.generate()
        out = lab.kanmon("device", "add", "--config", str(lab.config_path), "--id", device_id, "--public-key",
                         str(key.public_key()), "--owner", "trial", "--group", "staff", "--json")
        dev.assume_identity(device_id, key, json.loads(out.stdout)["ipv4"], lab.workdir)
        lab.wait_for_peer(dev)
        flag(f"prepared-{i}").touch()
        wait_until(lambda: flag(f"ready-{i}").exists() or not browser.is_alive(), 90, f"the browser at {device_id}")
        assert browser.is_alive(), results
        download = subprocess.Popen(dev.ns.cmd(sys.executable, "-c", DOWNLOAD, "198.51.100.80"),
                                    stdout=subprocess.PIPE, text=True)
        assert download.stdout.readline().strip() == "flowing"
        flag(f"go-{i}").touch()
        outcome = json.loads(download.communicate(timeout=30)[0].strip().splitlines()[-1])
        wait_until(lambda: bool(registry_rows(lab, "SELECT at FROM audit WHERE device_id=? AND action='device-revoked'",
                                              device_id)), 30, f"the revocation of {device_id}")
        row = registry_rows(lab, "SELECT at FROM audit WHERE device_id=? AND action='device-revoked'", device_id)
        cuts.append(round((outcome["last_data"] - datetime.fromisoformat(row[0]["at"]).timestamp()) * 1000, 1))
    browser.join(timeout=120)
    assert results and results[0]["ok"], failed(results[0]) if results else "the browser did not finish"
    ordered = sorted(cuts)
    report = {"trials": TRIALS, "cut_after_registry_write_ms": cuts,
              "p50_ms": ordered[len(ordered) // 2], "p90_ms": ordered[int(0.9 * len(ordered)) - 1], "max_ms": ordered[-1]}
    (SHOTS / "revocation-trials.json").write_text(json.dumps(report, indent=2))
    print(f"\nconsole revocation, download dead after the registry write: {report}")
    assert report["p90_ms"] <= 100 and report["max_ms"] <= 1000, report
