"""Fixtures of the console's unit tests: a config with a console, a fake IdP (the OIDC client's
two calls), a SQLite registry with devices, and ``signed_in(client, user)``.

The fake IdP stands for gateway/signin/oidc.py's ``OidcRelyingParty`` (its own tests cover
discovery, PKCE and the ID-token checks); the console's tests are about what the console
does with the validated claims. The e2e tests use the real lab IdP."""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import load_config_text
from gateway.registry.model import AuditEntry, DeviceRecord, Ownership
from gateway.registry.sqlite import SqliteRegistry
from gateway.runtime.lifecycle import Applied
from gateway.signin.oidc import AuthorizationRequest, SignInRefused
from tests.unit.test_config import VALID

ORIGIN = "https://console.test:9443"

CLAIMS = {   # the people of the fake IdP
    "admin": {"sub": "sub-admin", "preferred_username": "ada", "email": "ada@city.example.jp",
              "groups": ["kanmon-admins"], "amr": ["pwd", "otp"]},
    "helpdesk": {"sub": "sub-help", "preferred_username": "hiro", "email": "hiro@city.example.jp",
                 "groups": ["it-helpdesk"], "amr": ["pwd", "otp"]},
    "auditor": {"sub": "sub-audit", "preferred_username": "aki", "email": "aki@city.example.jp",
                "groups": ["audit"], "amr": ["pwd", "hwk"]},
    "alice": {"sub": "sub-alice", "preferred_username": "alice", "email": "alice@city.example.jp",
              "groups": ["staff"], "amr": ["pwd", "otp"]},
    "bob": {"sub": "sub-bob", "preferred_username": "bob", "email": "bob@city.example.jp",
            "groups": ["staff"], "amr": ["pwd", "otp"]},
    "nomfa": {"sub": "sub-nomfa", "preferred_username": "nomura", "email": "nomura@city.example.jp",
              "groups": ["it-helpdesk"], "amr": ["pwd"]},
    "acr": {"sub": "sub-acr", "preferred_username": "acr", "email": "acr@city.example.jp",
            "groups": ["it-helpdesk"], "amr": ["pwd"], "acr": "urn:loa:mfa"},
}


def console_config(tmp_path: Path, extra: str = ""):
    return load_config_text(console_config_text(tmp_path, extra), "k.yaml")


def console_config_text(tmp_path: Path, extra: str = "") -> str:
    return VALID.replace("/var/lib/kanmon", str(tmp_path / "state")).replace(
        "  listen_port: 51820\n", "  listen_port: 51820\n  endpoint: gw.city.example.jp:51820\n") + f"""\
signin:
  issuer: https://idp.example
  client_id: kanmon-gateway
  client_secret: s3cret
  mfa_acr: [urn:loa:mfa]
console:
  listen: 127.0.0.1:9443
  public_url: {ORIGIN}
  roles:
    admin: [kanmon-admins]
    helpdesk: [it-helpdesk]
    auditor: [audit]
  idle_timeout: 10m
  absolute_timeout: 1h
""" + extra


@dataclass
class FakeIdp:
    """``begin`` hands out a state; ``complete`` returns the claims of the person whose
    code it is (the code is ``code-<person>``) if the nonce and verifier match."""

    issued: dict = field(default_factory=dict)
    counter: itertools.count = field(default_factory=itertools.count)
    refuse: str | None = None

    def begin(self, *, force_login: bool = False) -> AuthorizationRequest:
        n = next(self.counter)
        req = AuthorizationRequest(url=f"https://idp.example/auth?state=st{n}", state=f"st{n}", nonce=f"no{n}",
                                   code_verifier=f"cv{n}")
        self.issued[req.state] = req
        return req

    def complete(self, code: str, *, nonce: str, code_verifier: str):
        if self.refuse:
            raise SignInRefused(self.refuse, "refused by the fake IdP")
        person = code.removeprefix("code-")
        req = next((r for r in self.issued.values() if r.nonce == nonce), None)
        if req is None or req.code_verifier != code_verifier or person not in CLAIMS:
            raise SignInRefused("token-request-refused", "bad code")
        claims = dict(CLAIMS[person], iss="https://idp.example", aud="kanmon-gateway", nonce=nonce)
        return claims, None


@dataclass
class FakeApply:
    calls: list = field(default_factory=list)

    def __call__(self, cfg, registry=None, **kw) -> Applied:
        self.calls.append(registry.revision() if registry is not None else None)
        return Applied(True, 0.001)


def registry_with_devices(cfg) -> SqliteRegistry:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    reg = SqliteRegistry(cfg.registry_path)
    import ipaddress
    for i, (device, owner, groups) in enumerate([("alice-phone", "alice", {"staff"}),
                                                  ("alice-laptop", "alice@city.example.jp", {"staff", "finance"}),
                                                  ("bob-phone", "bob", {"staff"}),
                                                  ("kiosk-1", "", {"kiosk"})], start=2):
        reg.add(DeviceRecord(device_id=device, wg_public_key=None, ipv4=ipaddress.IPv4Address(f"10.77.0.{i}"),
                             owner=owner, groups=frozenset(groups), ownership=Ownership.ORG, platform="ios",
                             os_version="17.4"), audit=AuditEntry("test", "device-added", "fixture"))
    return reg


def make_app(tmp_path: Path, *, clock=time.monotonic):
    from wireguard_tools import WireguardKey

    from gateway.console.app import create_app

    cfg = console_config(tmp_path)
    registry = registry_with_devices(cfg)
    cfg.wg_private_key_file.write_text(str(WireguardKey.generate()) + "\n")
    idp, apply = FakeIdp(), FakeApply()
    app = create_app(cfg, oidc=idp, registry=registry, clock=clock, apply_now=apply)
    app.testing = True
    return app, idp, apply, registry


def client_of(app):
    client = app.test_client()
    client.environ_base.update({"wsgi.url_scheme": "https", "HTTP_HOST": "console.test:9443"})
    return client


def start_signin(client):
    r = client.get("/signin/start")
    assert r.status_code == 302, r.status_code
    return re.search(r"state=(st\d+)", r.headers["Location"]).group(1)


def signed_in(client, person: str):
    """Sign ``person`` in through the fake IdP; returns the callback response."""
    state = start_signin(client)
    return client.get(f"/callback?code=code-{person}&state={state}")


def csrf_of(client, path: str = "/me/devices") -> str:
    page = client.get(path).get_data(as_text=True)
    m = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert m, page[:500]
    return m.group(1)


def post(client, path: str, data: dict, *, origin: str | None = ORIGIN, token: str | None = None, site="same-origin"):
    headers = {}
    if origin is not None:
        headers["Origin"] = origin
    if site is not None:
        headers["Sec-Fetch-Site"] = site
    form = dict(data)
    if token is not None:
        form["csrf_token"] = token
    return client.post(path, data=form, headers=headers)
