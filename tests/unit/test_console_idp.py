"""Issue #21: the console's own IdP settings (``console.oidc:``). A `signin:` section makes every
device sign in (kanmon:signin-required); an office that wants only the console gives the IdP
under ``console.oidc:`` (the same keys and the same code as ``signin:``'s IdP part). Without it
the console falls back to ``signin:`` as before (tests/unit/test_console_auth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.chain import chain_names
from gateway.cli import main
from gateway.config import load_config_text
from gateway.logstore import LogStore
from gateway.yamlsource import SourceErrors
from tests.unit.console_fixtures import (FakeApply, FakeIdp, client_of, console_config_text, registry_with_devices,
                                         signed_in)
from tests.unit.test_chain import PRODUCTION_ORDER

SIGNIN_BLOCK = """\
signin:
  issuer: https://idp.example
  client_id: kanmon-gateway
  client_secret: s3cret
  mfa_acr: [urn:loa:mfa]
"""

# the last key of the console: section in console_config_text, so what follows is inside it
OIDC_BLOCK = """\
  oidc:
    issuer: https://idp.example/realms/staff/
    client_id: kanmon-console
    client_secret_file: console-secret
    mfa_amr: [hwk]
    groups_claim: groups
"""


def oidc_config_text(tmp_path: Path, *, keep_signin: bool = False, oidc: str = OIDC_BLOCK) -> str:
    (tmp_path / "console-secret").write_text("c0nsole\n")
    text = console_config_text(tmp_path)
    assert SIGNIN_BLOCK in text and text.endswith("absolute_timeout: 1h\n")
    if not keep_signin:
        text = text.replace(SIGNIN_BLOCK, "")
    return text + oidc


def load(tmp_path: Path, text: str):
    path = tmp_path / "k.yaml"       # the secret file is relative to the config's directory
    path.write_text(text, encoding="utf-8")
    from gateway.config import load_config
    return load_config(path)


def refused(tmp_path: Path, text: str) -> str:
    path = tmp_path / "k.yaml"
    path.write_text(text, encoding="utf-8")
    from gateway.config import load_config
    with pytest.raises(SourceErrors) as exc:
        load_config(path)
    return "\n".join(str(e) for e in exc.value.errors)


def test_console_oidc_without_signin_is_a_valid_config_with_no_device_signin(tmp_path, capsys):
    cfg = load(tmp_path, oidc_config_text(tmp_path))
    assert cfg.signin is None                               # devices need no user sign-in
    idp = cfg.console.idp
    assert (idp.issuer, idp.client_id, idp.client_secret) == ("https://idp.example/realms/staff", "kanmon-console",
                                                              "c0nsole")
    assert idp.mfa_amr == ("hwk",)
    assert main(["config", "check", str(tmp_path / "k.yaml")]) == 0, capsys.readouterr()


def test_the_gateway_chain_has_no_device_signin_with_console_oidc_but_has_it_with_signin(tmp_path):
    from gateway.runtime.app import GatewayApp

    def names(cfg, sub: str) -> list[str]:
        app = GatewayApp(cfg)
        app.logstore = LogStore(tmp_path / sub / "logs")
        app.open_signin()
        return chain_names(app.build_chain())

    assert names(load(tmp_path, oidc_config_text(tmp_path)), "a") == PRODUCTION_ORDER
    with_signin = names(load_config_text(console_config_text(tmp_path), "k2.yaml"), "b")
    assert "SignInGate" in with_signin and "SignInGate" not in PRODUCTION_ORDER


def make_oidc_app(tmp_path: Path, **kw):
    from wireguard_tools import WireguardKey

    from gateway.console.app import create_app

    cfg = load(tmp_path, oidc_config_text(tmp_path, **kw))
    registry = registry_with_devices(cfg)
    cfg.wg_private_key_file.write_text(str(WireguardKey.generate()) + "\n")
    idp = FakeIdp()
    app = create_app(cfg, oidc=idp, registry=registry, apply_now=FakeApply())
    app.testing = True
    return app


def test_the_console_signs_in_through_console_oidc_with_its_mfa_rule(tmp_path):
    app = make_oidc_app(tmp_path)
    settings = app.extensions["kanmon_console"].signin
    assert (settings.issuer, settings.client_id) == ("https://idp.example/realms/staff", "kanmon-console")
    assert settings.redirect_uri == "https://console.test:9443/callback"
    c = client_of(app)
    assert signed_in(c, "auditor").status_code == 200       # amr hwk: a second factor under mfa_amr: [hwk]
    assert c.get("/devices").status_code == 200
    refused_client = client_of(app)
    r = signed_in(refused_client, "helpdesk")               # amr otp: not one console.oidc.mfa_amr names
    assert r.status_code == 403 and 'data-reason="mfa-missing"' in r.get_data(as_text=True)
    assert refused_client.get("/devices").status_code == 302


def test_console_oidc_wins_over_signin_for_the_console_only(tmp_path):
    app = make_oidc_app(tmp_path, keep_signin=True)
    cfg = app.extensions["kanmon_console"].cfg
    assert cfg.signin.client_id == "kanmon-gateway" and cfg.signin.mfa_acr == ("urn:loa:mfa",)
    settings = app.extensions["kanmon_console"].signin
    assert settings.client_id == "kanmon-console" and settings.mfa_acr == ()
    c = client_of(app)
    assert signed_in(c, "acr").status_code == 403            # signin:'s acr rule is not the console's


def test_the_real_oidc_client_is_built_from_console_oidc(tmp_path):
    from gateway.console.app import create_app

    cfg = load(tmp_path, oidc_config_text(tmp_path))
    app = create_app(cfg, registry=registry_with_devices(cfg))
    rp = app.extensions["kanmon_console"].oidc
    assert rp.settings.discovery_url == "https://idp.example/realms/staff/.well-known/openid-configuration"
    assert rp.settings.client_secret == "c0nsole"


@pytest.mark.parametrize("oidc,needle_ja,needle_en", [
    (OIDC_BLOCK.replace("    client_secret_file: console-secret\n", ""),
     "client_secret か client_secret_file のどちらか一方", "exactly one of client_secret or client_secret_file"),
    (OIDC_BLOCK.replace("console-secret", "missing-secret"), "missing-secret を読めません", "cannot read"),
    (OIDC_BLOCK.replace("https://idp.example/realms/staff/", "http://idp.example"), "は書式に合いません", "does not match"),
    (OIDC_BLOCK + "    scopes: [profile]\n", "openid を含めてください", "must include openid"),
    (OIDC_BLOCK + "    allow_before_signin: [mdm.example]\n", "不明なキーです", "unknown key"),
    (OIDC_BLOCK + "  client_id: other\n",
     "client_id などは console.oidc: の中に", "give client_id and its secret inside console.oidc:"),
])
def test_bad_console_oidc_values_are_refused_bilingually_with_their_line(tmp_path, oidc, needle_ja, needle_en):
    message = refused(tmp_path, oidc_config_text(tmp_path, oidc=oidc))
    assert needle_ja in message and needle_en in message, message
    assert "k.yaml:" in message


def test_no_idp_at_all_says_to_give_console_oidc(tmp_path):
    message = refused(tmp_path, oidc_config_text(tmp_path, oidc=""))
    assert "console.oidc: を書いてください" in message and "give console.oidc:" in message
