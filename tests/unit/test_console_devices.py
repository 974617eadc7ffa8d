"""Issue #21: the console's device pages, registration with QR code, the self-service loss
report, the `console:` config section, and the lifecycle module the CLI and the console share."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from gateway.console import catalog
from gateway.console.live import parse_proc_tcp
from gateway.posture import PosturePolicy
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus
from gateway.runtime import lifecycle
from gateway.signin.operators import roles_for
from gateway.yamlsource import SourceErrors
from tests.unit.console_fixtures import client_of, console_config, csrf_of, make_app, post, signed_in
from tests.unit.test_console_auth import audit_actions


@pytest.fixture
def console(tmp_path):
    return make_app(tmp_path)


def test_devices_list_filters(console):
    app, _idp, _apply, registry = console
    c = client_of(app)
    signed_in(c, "auditor")

    def listed(**query) -> list[str]:
        page = c.get("/devices", query_string=query).get_data(as_text=True)
        return re.findall(r'<tr data-device="([^"]+)"', page)

    assert listed() == ["alice-laptop", "alice-phone", "bob-phone", "kiosk-1"]
    assert listed(q="alice") == ["alice-laptop", "alice-phone"]
    assert listed(q="10.77.0.4") == ["bob-phone"]
    assert listed(owner="bob") == ["bob-phone"]
    assert listed(group="finance") == ["alice-laptop"]
    assert listed(group="kiosk") == ["kiosk-1"]
    registry.update(replace(registry.get("bob-phone"), status=DeviceStatus.QUARANTINED))
    assert listed(status="quarantined") == ["bob-phone"]
    assert listed(ownership="byod") == []
    assert listed(posture="compliant") == ["alice-laptop", "alice-phone", "bob-phone", "kiosk-1"]
    assert listed(handshake="never") == ["alice-laptop", "alice-phone", "bob-phone", "kiosk-1"]
    assert listed(handshake="15m") == []
    assert listed(network="203.0.113.0/24") == []


def test_device_page_shows_history_from_the_audit_trail(console):
    app, _idp, apply, registry = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    token = csrf_of(c, "/devices/bob-phone")
    post(c, "/devices/bob-phone/action", {"action": "quarantine", "reason": "phishing click"}, token=token)
    page = c.get("/devices/bob-phone").get_data(as_text=True)
    assert 'data-status="quarantined"' in page
    assert re.search(r'data-action="device-quarantined".*console:hiro@city.example.jp \(sub=sub-help\).*phishing click',
                     page, re.S)
    assert 'data-action="device-added"' in page
    assert 'id="form-release"' in page and 'id="form-quarantine"' not in page
    token = csrf_of(c, "/devices/bob-phone")
    r = post(c, "/devices/bob-phone/action", {"action": "release", "reason": "cleaned"}, token=token)
    assert r.status_code == 303 and registry.get("bob-phone").status is DeviceStatus.ACTIVE
    assert len(apply.calls) == 2


def test_revoke_needs_one_of_the_cli_reasons_and_a_revoked_device_stays_revoked(console):
    app, _idp, apply, registry = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    token = csrf_of(c, "/devices/bob-phone")
    r = post(c, "/devices/bob-phone/action", {"action": "revoke", "reason": "felt like it"}, token=token)
    assert r.status_code == 303 and registry.get("bob-phone").status is DeviceStatus.ACTIVE
    assert "失効の理由を選んでください" in c.get("/devices/bob-phone").get_data(as_text=True)
    token = csrf_of(c, "/devices/bob-phone")
    post(c, "/devices/bob-phone/action", {"action": "revoke", "reason": "stolen"}, token=token)
    assert registry.get("bob-phone").status is DeviceStatus.REVOKED
    token = csrf_of(c, "/devices/bob-phone")
    r = post(c, "/devices/bob-phone/action", {"action": "resume"}, token=token)
    assert registry.get("bob-phone").status is DeviceStatus.REVOKED
    page = c.get("/devices/bob-phone").get_data(as_text=True)
    assert "失効した端末は復帰できません" in page or "A revoked device cannot be reinstated" in page
    assert len(apply.calls) == 1
    for bad in ({"action": "delete"}, {"action": "suspend", "reason": ""}, {"action": "quarantine", "reason": "[posture] x"}):
        token = csrf_of(c, "/devices/alice-phone")
        r = post(c, "/devices/alice-phone/action", bad, token=token)
        assert r.status_code in (303, 400)
        assert registry.get("alice-phone").status is DeviceStatus.ACTIVE


def test_unknown_device_is_404(console):
    app, *_ = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    assert c.get("/devices/nope").status_code == 404
    token = csrf_of(c, "/devices")
    assert post(c, "/devices/nope/action", {"action": "suspend", "reason": "x"}, token=token).status_code == 404


def test_register_a_device_shows_its_qr_code_once(console):
    app, _idp, apply, registry = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    token = csrf_of(c, "/devices/new")
    r = post(c, "/devices/new", {"device_id": "hanako-phone", "owner": "hanako", "groups": "staff, field",
                                 "ownership": "byod", "platform": "ios", "os_version": "17.5", "reason": "new hire"},
             token=token)
    page = r.get_data(as_text=True)
    assert r.status_code == 200, page
    rec = registry.get("hanako-phone")
    assert rec.owner == "hanako" and rec.groups == {"staff", "field"} and rec.wg_public_key
    assert re.search(r'<img class="qr" id="qr" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)
    config = re.search(r'<pre id="config-text">(.*?)</pre>', page, re.S).group(1)
    assert f"Address = {rec.ipv4}" in config and "Endpoint = gw.city.example.jp:51820" in config
    assert "PrivateKey = " in config and "PrivateKey = (" not in config
    assert ("console:hiro@city.example.jp (sub=sub-help)", "device-added", "new hire") in audit_actions(registry)
    assert len(apply.calls) == 1
    # the same id again, a bad id, a reserved reason: a bilingual error, nothing added
    for form in ({"device_id": "hanako-phone", "owner": "x", "ownership": "org"},
                 {"device_id": "bad id!", "owner": "x", "ownership": "org"},
                 {"device_id": "ok-1", "owner": "", "ownership": "org"},
                 {"device_id": "ok-2", "owner": "x", "ownership": "org", "reason": "[posture] fake"}):
        token = csrf_of(c, "/devices/new")
        r = post(c, "/devices/new", form, token=token)
        assert r.status_code == 400 and 'class="flash flash-error"' in r.get_data(as_text=True)
    assert len(registry.all()) == 5


# -- self-service ---------------------------------------------------------------------------------

def test_a_user_sees_only_their_own_devices(console):
    app, *_ = console
    c = client_of(app)
    signed_in(c, "alice")
    page = c.get("/me/devices").get_data(as_text=True)
    assert re.findall(r'<tr data-device="([^"]+)"', page) == ["alice-laptop", "alice-phone"]


def test_loss_report_suspends_at_once_and_only_an_operator_releases(console):
    app, _idp, apply, registry = console
    c = client_of(app)
    signed_in(c, "alice")
    token = csrf_of(c)
    r = post(c, "/me/devices/lost", {"device_id": "alice-phone", "note": "left on the train 22:00"}, token=token)
    assert r.status_code == 303
    rec = registry.get("alice-phone")
    assert rec.status is DeviceStatus.SUSPENDED and rec.suspended_until is None
    assert rec.status_reason == "lost (reported by the owner): left on the train 22:00"
    assert ("console:alice@city.example.jp (sub=sub-alice)", "device-reported-lost",
            "lost (reported by the owner): left on the train 22:00") in audit_actions(registry)
    assert len(apply.calls) == 1                      # the gateway was asked to cut it now
    page = c.get("/me/devices").get_data(as_text=True)
    assert "ロックしました" in page and 'id="report-alice-phone"' not in page
    # the owner cannot undo it: the lifecycle routes need the helpdesk
    token = csrf_of(c)
    assert post(c, "/devices/alice-phone/action", {"action": "resume"}, token=token).status_code == 403
    assert registry.get("alice-phone").status is DeviceStatus.SUSPENDED
    helpdesk = client_of(app)
    signed_in(helpdesk, "helpdesk")
    token = csrf_of(helpdesk, "/devices/alice-phone")
    assert post(helpdesk, "/devices/alice-phone/action", {"action": "resume"}, token=token).status_code == 303
    assert registry.get("alice-phone").status is DeviceStatus.ACTIVE


@pytest.mark.parametrize("target", ["bob-phone", "kiosk-1", "no-such-device", ""])
def test_a_tampered_device_id_is_refused_and_changes_nothing(console, target):
    app, _idp, apply, registry = console
    c = client_of(app)
    signed_in(c, "alice")
    token = csrf_of(c)
    before = [(r.device_id, r.status) for r in registry.all()]
    r = post(c, "/me/devices/lost", {"device_id": target}, token=token)
    assert r.status_code == 403
    assert [(r.device_id, r.status) for r in registry.all()] == before and apply.calls == []
    assert any(a == "console-refused" and "not-owner" in reason for _, a, reason in audit_actions(registry))


def test_the_loss_report_alerts_the_helpdesk():
    from datetime import UTC, datetime

    from gateway.reports.alerting import KIND_LOSS_REPORT, event_from_audit

    event = event_from_audit({"event.action": "device-reported-lost", "event.outcome": "success",
                              "device.id": "alice-phone", "user.name": "console:alice@city.example.jp (sub=s)",
                              "event.reason": "lost (reported by the owner)"}, at=datetime.now(UTC))
    assert event is not None and event.kind == KIND_LOSS_REPORT and event.severity == "critical"
    assert "alice-phone" in event.summary.ja and "alice-phone" in event.summary.en


# -- config ----------------------------------------------------------------------------------------

def test_console_config_section(tmp_path):
    cfg = console_config(tmp_path)
    s = cfg.console
    assert (s.host, s.port, s.public_url, s.redirect_uri) == ("127.0.0.1", 9443, "https://console.test:9443",
                                                             "https://console.test:9443/callback")
    assert (s.idle_timeout_seconds, s.absolute_timeout_seconds) == (600, 3600)
    assert roles_for(["it-helpdesk", "x"], s) == {"helpdesk", "user"}
    assert roles_for([], s) == {"user"}
    assert roles_for(["kanmon-admins", "audit"], s) == {"admin", "auditor", "user"}


@pytest.mark.parametrize("change,needle_en,needle_ja", [
    (("listen: 127.0.0.1:9443", "listen: console:9443"), "must be ADDRESS:PORT", "アドレス:ポート"),
    (("listen: 127.0.0.1:9443", "listen: 127.0.0.1:9180"), "port already used", "ほかの待ち受け"),
    (("listen: 127.0.0.1:9443", "listen: 0.0.0.0:9443"), "give the management address", "管理用アドレスを書いてください"),
    (("    admin: [kanmon-admins]\n    helpdesk: [it-helpdesk]\n    auditor: [audit]\n", "    admin: []\n"),
     "no role has a group", "どの役割にもグループがありません"),
    (("idle_timeout: 10m", "idle_timeout: 2h"), "may not be longer than absolute_timeout", "absolute_timeout より長く"),
    (("idle_timeout: 10m", "idle_timeout: 10m\n  client_id: only-id"), "give client_secret_file too",
     "client_secret_file も書いてください"),
])
def test_console_config_errors_are_bilingual_and_name_the_line(tmp_path, change, needle_en, needle_ja):
    from gateway.config import load_config_text

    text = _config_text(tmp_path).replace(*change)
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text, "k.yaml")
    message = "\n".join(str(e) for e in exc.value.errors)
    assert needle_en in message and needle_ja in message and "k.yaml:" in message


def test_console_without_signin_or_console_oidc_is_refused(tmp_path):
    from gateway.config import load_config_text

    text = re.sub(r"signin:\n(  .*\n)+", "", _config_text(tmp_path))
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text, "k.yaml")
    assert "the console signs operators in through the IdP: give console.oidc:" in \
        "\n".join(str(e) for e in exc.value.errors)


def _config_text(tmp_path) -> str:
    from tests.unit.console_fixtures import console_config_text
    return console_config_text(tmp_path)


# -- the shared lifecycle module --------------------------------------------------------------------

def test_lifecycle_returns_results_instead_of_printing(tmp_path, capsys):
    from gateway.registry.sqlite import SqliteRegistry

    reg = SqliteRegistry(tmp_path / "r.sqlite3")
    reg.add(DeviceRecord("d1", None, ipaddress.IPv4Address("10.0.0.2")), audit=AuditEntry("t", "device-added"))
    change = lifecycle.change_status(reg, "d1", DeviceStatus.QUARANTINED, actor="op", reason="malware")
    assert change.ok and change.record.status is DeviceStatus.QUARANTINED
    missing = lifecycle.change_status(reg, "d2", DeviceStatus.REVOKED, actor="op", reason="lost")
    assert missing.missing and not missing.ok and "d2" in missing.refused.en
    released = lifecycle.release(reg, "d1", PosturePolicy.from_pairs([("ios", "17.0")]), actor="op")
    assert released.ok and released.note is None
    again = lifecycle.release(reg, "d1", PosturePolicy.from_pairs([]), actor="op")
    assert not again.ok and "not quarantined" in again.refused.en
    lifecycle.change_status(reg, "d1", DeviceStatus.REVOKED, actor="op", reason="lost")
    back = lifecycle.change_status(reg, "d1", DeviceStatus.ACTIVE, actor="op")
    assert not back.ok and reg.get("d1").status is DeviceStatus.REVOKED
    assert [e.action for e in reg.audit_of("d1")] == ["device-revoked", "device-released", "device-quarantined",
                                                       "device-added"]
    assert capsys.readouterr() == ("", "")


def test_apply_now_without_a_gateway_says_so(tmp_path):
    class Cfg:
        pid_path = tmp_path / "none.pid"
        applied_status_path = tmp_path / "applied.json"

    assert lifecycle.apply_now(Cfg()) == lifecycle.Applied(False)


def test_proc_net_tcp_parsing():
    text = ("  sl  local_address rem_address   st tx_queue rx_queue\n"
            "   0: 0100000A:1F90 0200000A:C350 01 00000000:00000000 00:00000000 00000000     0\n"
            "   1: 0100000A:1F90 0300000A:C351 0A 00000000:00000000 00:00000000 00000000     0\n"
            "   2: garbage\n")
    assert parse_proc_tcp(text) == [("10.0.0.2", 50000, 8080)]
    v6 = ("  sl  local rem st\n"
          "   0: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000200000A:C350 01 0\n")
    assert parse_proc_tcp(v6) == [("10.0.0.2", 50000, 8080)]


# -- catalog ---------------------------------------------------------------------------------------

def test_every_console_message_has_japanese():
    from pathlib import Path

    root = Path(catalog.__file__).resolve().parents[2]
    method_map = [("gateway/console/templates/**.html", "jinja2.ext:babel_extract"), ("gateway/console/**.py", "python")]
    found = {m for _f, _l, m, _c, _x in extract_from_dir(str(root), method_map, keywords={"_": None, "M_": None},
                                                        options_map={}) if isinstance(m, str) and m}
    with catalog.po_path("ja").open("rb") as f:
        ja = {m.id: m for m in read_po(f, locale="ja") if m.id}
    assert len(found) > 80
    assert sorted(found - set(ja)) == []
    for msgid in found:
        assert ja[msgid].string and ja[msgid].string != msgid and not ja[msgid].fuzzy, msgid
        assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", ja[msgid].string), msgid
        assert sorted(re.findall(r"%\((\w+)\)s", ja[msgid].string)) == sorted(re.findall(r"%\((\w+)\)s", msgid))
    catalog.load_all()


def test_renew_issues_a_certificate_shown_once(console):
    from cryptography.hazmat.primitives.serialization import pkcs12

    from gateway.devices.ca import init_ca, pki_dir

    app, _idp, apply, registry = console
    c = client_of(app)
    signed_in(c, "helpdesk")
    token = csrf_of(c, "/devices/new")
    post(c, "/devices/new", {"device_id": "renew-me", "owner": "hanako", "ownership": "org"}, token=token)
    # no organization CA yet: a bilingual error, nothing recorded
    token = csrf_of(c, "/devices/renew-me")
    r = post(c, "/devices/renew-me/renew", {"reason": "expiring"}, token=token)
    assert r.status_code == 303 and registry.get("renew-me").cert_serial is None
    assert "flash-error" in c.get("/devices/renew-me").get_data(as_text=True)
    init_ca(pki_dir(app.extensions["kanmon_console"].cfg.state_dir), "Test City")
    token = csrf_of(c, "/devices/renew-me")
    r = post(c, "/devices/renew-me/renew", {"reason": "expiring"}, token=token)
    page = r.get_data(as_text=True)
    assert r.status_code == 200, page
    password = re.search(r'<code id="p12-password">([^<]+)</code>', page).group(1)
    link = re.search(r'id="download" href="([^"]+)"', page).group(1)
    first = c.get(link)
    assert first.status_code == 200 and first.headers["Content-Type"] == "application/x-pkcs12"
    key, cert, _chain = pkcs12.load_key_and_certificates(first.get_data(), password.encode())
    assert key is not None and format(cert.serial_number, "x") == registry.get("renew-me").cert_serial
    assert c.get(link).status_code == 404          # once
    assert ("console:hiro@city.example.jp (sub=sub-help)", "device-renewed", "expiring") in audit_actions(registry)
    assert len(apply.calls) == 2                   # registration, renewal
    # not enrolled yet (no key): refused
    token = csrf_of(c, "/devices/alice-phone")
    post(c, "/devices/alice-phone/renew", {}, token=token)
    assert registry.get("alice-phone").cert_serial is None
    # an auditor cannot
    auditor = client_of(app)
    signed_in(auditor, "auditor")
    assert post(auditor, "/devices/renew-me/renew", {}, token=csrf_of(auditor, "/devices")).status_code == 403


def test_the_proxy_treats_the_consoles_address_as_inside_the_gateway(tmp_path):
    """Defence in depth behind the steering table (which drops tunnel traffic to any local
    address): the enforcer refuses a proxied connection to the console's address."""
    from gateway.config import load_config_text
    from gateway.runtime.app import GatewayApp
    from tests.unit.console_fixtures import console_config_text

    text = console_config_text(tmp_path).replace("listen: 127.0.0.1:9443", "listen: 192.0.2.10:9443")
    nets = GatewayApp(load_config_text(text, "k.yaml")).internal_networks()
    assert any(ipaddress.ip_address("192.0.2.10") in n for n in nets)
    assert not any(ipaddress.ip_address("192.0.2.11") in n for n in nets)
