"""User sign-in without the IdP: pending sign-ins (one-time state), sessions from ID-token
claims, owner matching, the in-memory session directory, the session table in the registry's
SQLite file (with the audit outbox), the `signin:` config section, and ``SignInService`` with a
stub relying party and a list-backed auth log, driven the way the captive portal drives it."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config_text
from gateway.registry.model import DeviceRecord
from gateway.registry.sqlite import SqliteRegistry
from gateway.signin.oidc import AuthorizationRequest, SignInRefused
from gateway.signin.pending import PendingRefused, PendingSignIn, PendingSignIns
from gateway.signin.service import SignInService
from gateway.signin.sessions import (SessionDirectory, UserSession, canonical_ip, owner_matches,
                                     session_from_claims)
from gateway.signin.settings import DEFAULT_MFA_AMR, SignInSettings
from gateway.signin.store import SessionStore
from gateway.yamlsource import SourceErrors
from tests.unit.test_config import VALID

T0 = datetime(2025, 4, 1, 9, 0, tzinfo=UTC)
SETTINGS = SignInSettings(issuer="https://login.example.lg.jp/realms/staff", client_id="kanmon", client_secret="s")


def device(device_id="dev-1", owner="tanaka", groups=(), n=2) -> DeviceRecord:
    return DeviceRecord(device_id=device_id, wg_public_key=f"key-{device_id}",
                        ipv4=ipaddress.IPv4Address(f"10.77.0.{n}"), ipv6=ipaddress.IPv6Address(f"fd77:77::{n}"),
                        owner=owner, groups=frozenset(groups))


def session(device_id="dev-1", user="tanaka", tunnel_ip="10.77.0.2", created=T0, lifetime=timedelta(hours=8),
            **kw) -> UserSession:
    return UserSession(session_id=f"s-{device_id}-{user}-{created.timestamp()}-{kw.pop('tag', '')}",
                       device_id=device_id, tunnel_ip=tunnel_ip, user=user, subject=f"sub-{user}",
                       issuer=SETTINGS.issuer, created_at=created, expires_at=created + lifetime, **kw)


# -- PendingSignIns ---------------------------------------------------------------------------

def pending(state="st-1", device_id="dev-1", tunnel_ip="10.77.0.2", started=100.0) -> PendingSignIn:
    return PendingSignIn(state=state, nonce="n-" + state, code_verifier="v" * 43, device_id=device_id,
                         tunnel_ip=tunnel_ip, next_url="https://intranet.example.jp/", started=started)


def refused_reason(table: PendingSignIns, state, device_id="dev-1", tunnel_ip="10.77.0.2", now=110.0) -> str:
    with pytest.raises(PendingRefused) as exc:
        table.redeem(state, device_id=device_id, tunnel_ip=tunnel_ip, now=now)
    return exc.value.reason


def test_pending_redeems_once_then_names_the_replay():
    table = PendingSignIns(lifetime=600)
    table.add(pending())
    entry = table.redeem("st-1", device_id="dev-1", tunnel_ip="10.77.0.2", now=110.0)
    assert entry.nonce == "n-st-1" and entry.next_url == "https://intranet.example.jp/"
    assert len(table) == 0
    assert refused_reason(table, "st-1") == "state-replayed"
    assert refused_reason(table, "st-1") == "state-replayed"


def test_pending_unknown_and_missing_state():
    table = PendingSignIns(lifetime=600)
    table.add(pending())
    assert refused_reason(table, "st-never") == "state-unknown"
    assert refused_reason(table, None) == "state-missing"
    assert refused_reason(table, "") == "state-missing"
    assert len(table) == 1  # the real one is untouched


@pytest.mark.parametrize("device_id, tunnel_ip", [("dev-2", "10.77.0.2"), ("dev-1", "10.77.0.9")])
def test_pending_from_another_device_or_address_is_refused_and_burnt(device_id, tunnel_ip):
    table = PendingSignIns(lifetime=600)
    table.add(pending())
    assert refused_reason(table, "st-1", device_id=device_id, tunnel_ip=tunnel_ip) == "state-other-device"
    # a state shown to a third party is spent: the owner cannot finish with it either
    assert refused_reason(table, "st-1") == "state-replayed"


def test_pending_expires_after_its_lifetime():
    table = PendingSignIns(lifetime=600)
    table.add(pending("in-time", started=100.0))
    table.add(pending("late", started=100.0))
    assert table.redeem("in-time", device_id="dev-1", tunnel_ip="10.77.0.2", now=700.0).state == "in-time"
    assert refused_reason(table, "late", now=700.5) == "state-expired"


def test_pending_table_is_bounded_and_forgets_the_oldest():
    table = PendingSignIns(lifetime=600, max_entries=3, remember_used=2)
    for i in range(5):
        table.add(pending(f"st-{i}"))
    assert len(table) == 3
    assert refused_reason(table, "st-0") == "state-unknown"
    for i in (2, 3, 4):
        table.redeem(f"st-{i}", device_id="dev-1", tunnel_ip="10.77.0.2", now=110.0)
    # only the last two redeemed are remembered as such; an older one is still refused
    assert refused_reason(table, "st-4") == "state-replayed"
    assert refused_reason(table, "st-2") == "state-unknown"


# -- session_from_claims / owner_matches ---------------------------------------------------------

def claims(**changes) -> dict[str, Any]:
    c = {"iss": SETTINGS.issuer, "sub": "u-0001", "preferred_username": "tanaka", "email": "Tanaka@Example.lg.jp",
         "groups": ["staff", "kikaku"], "amr": ["pwd", "otp"], "acr": "urn:example:loa2"}
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def from_claims(c, settings=SETTINGS, auth_time=None) -> UserSession:
    return session_from_claims(c, device_id="dev-1", tunnel_ip="10.77.0.2", settings=settings, now=T0,
                               auth_time=auth_time)


def test_session_from_claims_takes_user_groups_methods_and_lifetime():
    auth = T0 - timedelta(minutes=3)
    s = from_claims(claims(), auth_time=auth)
    assert (s.user, s.subject, s.email) == ("tanaka", "u-0001", "Tanaka@Example.lg.jp")
    assert s.groups == {"staff", "kikaku"} and s.amr == {"pwd", "otp"} and s.acr == "urn:example:loa2"
    assert s.mfa is True
    assert (s.device_id, s.tunnel_ip, s.issuer) == ("dev-1", "10.77.0.2", SETTINGS.issuer)
    assert s.auth_time == auth and s.created_at == T0
    assert s.expires_at == T0 + timedelta(seconds=SETTINGS.session_lifetime_seconds)
    assert s.valid(T0) and not s.valid(s.expires_at)
    assert from_claims(claims()).session_id != s.session_id
    assert from_claims(claims()).auth_time == T0  # no auth_time claim: the sign-in time


def test_user_claim_falls_back_to_email_then_subject():
    assert from_claims(claims(preferred_username=None)).user == "Tanaka@Example.lg.jp"
    assert from_claims(claims(preferred_username="", email=None)).user == "u-0001"
    upn = dataclasses.replace(SETTINGS, user_claim="upn")
    assert from_claims(claims(upn="tanaka@corp.example"), settings=upn).user == "tanaka@corp.example"
    assert from_claims(claims(), settings=upn).user == "Tanaka@Example.lg.jp"


def test_groups_claim_shapes():
    assert from_claims(claims(groups="staff")).groups == {"staff"}
    assert from_claims(claims(groups=["a", 7, {"x": 1}, None])).groups == {"a", "7"}
    assert from_claims(claims(groups={"odd": "shape"})).groups == frozenset()
    assert from_claims(claims(groups=None)).groups == frozenset()
    roles = dataclasses.replace(SETTINGS, groups_claim="roles")
    assert from_claims(claims(roles=["kanri"]), settings=roles).groups == {"kanri"}


def test_mfa_from_amr_and_acr_follows_the_settings():
    assert "otp" in DEFAULT_MFA_AMR and "pwd" not in DEFAULT_MFA_AMR
    assert from_claims(claims(amr=["pwd"])).mfa is False
    assert from_claims(claims(amr="hwk")).mfa is True
    assert from_claims(claims(amr=None)).mfa is False
    hwk_only = dataclasses.replace(SETTINGS, mfa_amr=("hwk",))
    assert from_claims(claims(amr=["pwd", "otp"]), settings=hwk_only).mfa is False
    by_acr = dataclasses.replace(SETTINGS, mfa_amr=(), mfa_acr=("urn:example:loa3",))
    assert from_claims(claims(amr=["otp"], acr="urn:example:loa3"), settings=by_acr).mfa is True
    assert from_claims(claims(amr=["otp"], acr="urn:example:loa2"), settings=by_acr).mfa is False
    # a non-string acr is ignored, not trusted
    odd = from_claims(claims(acr=["urn:example:loa3"]), settings=by_acr)
    assert odd.acr is None and odd.mfa is False


def test_owner_matches_name_address_or_local_part():
    assert owner_matches("tanaka", "tanaka", None)
    assert owner_matches(" Tanaka ", "TANAKA", None)
    assert owner_matches("tanaka@example.lg.jp", "u-0001", "Tanaka@Example.lg.jp")
    assert owner_matches("tanaka", "u-0001", "tanaka@example.lg.jp")
    assert not owner_matches("suzuki", "tanaka", "tanaka@example.lg.jp")
    assert not owner_matches("example.lg.jp", "tanaka", "tanaka@example.lg.jp")
    assert not owner_matches("", "tanaka", None)
    assert not owner_matches("  ", "", None)


# -- SessionDirectory -------------------------------------------------------------------------

def test_directory_binds_a_session_to_its_device_and_tunnel_address():
    d = SessionDirectory()
    s = session()
    d.put(s)
    mine = {"10.77.0.2", "fd77:77::2"}
    assert d.for_device("dev-1", mine, T0 + timedelta(hours=1)) == s
    assert d.for_device("dev-1", {"10.77.0.3"}, T0) is None        # another tunnel address
    assert d.for_device("dev-2", mine, T0) is None
    assert d.for_device("dev-1", mine, T0 + timedelta(hours=8)) is None   # expired at the instant
    d.put(dataclasses.replace(s, ended_at=T0 + timedelta(minutes=1)))
    assert d.for_device("dev-1", mine, T0 + timedelta(minutes=2)) is None  # ended
    v6 = session(tunnel_ip="fd77:77::2", tag="v6")
    d.put(v6)
    assert d.for_device("dev-1", mine, T0) == v6
    assert d.remove("dev-1") == v6 and d.remove("dev-1") is None and len(d) == 0


def test_canonical_ip_matches_the_identity_addons_view():
    assert canonical_ip("::ffff:10.77.0.2") == "10.77.0.2"
    assert canonical_ip("fd77:0077:0000::0002") == "fd77:77::2"
    assert canonical_ip("fe80::1%kmwg0") == "fe80::1"
    assert canonical_ip("10.77.0.2") == "10.77.0.2"
    assert canonical_ip("not-an-ip") == "not-an-ip"


def test_directory_compares_addresses_in_canonical_form():
    d = SessionDirectory()
    d.put(session(tunnel_ip="::ffff:10.77.0.2"))
    assert d.for_device("dev-1", {"10.77.0.2"}, T0) is not None
    d.put(session(tunnel_ip="fd77:77::2", tag="v6"))
    assert d.for_device("dev-1", {"fd77:0077::0002"}, T0) is not None
    assert d.for_device("dev-1", {"::ffff:10.77.0.2"}, T0) is None


def test_directory_replace_keeps_the_newest_session_per_device():
    d = SessionDirectory()
    old, new = session(created=T0), session(created=T0 + timedelta(minutes=5), user="suzuki")
    other = session(device_id="dev-2", tunnel_ip="10.77.0.3")
    d.replace([new, other, old])
    assert {s.session_id for s in d.all()} == {new.session_id, other.session_id}
    d.replace([])
    assert len(d) == 0


# -- SessionStore ------------------------------------------------------------------------------------

class Clock:
    def __init__(self, at=T0):
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **kw) -> None:
        self.at += timedelta(**kw)


@pytest.fixture
def registry_file(tmp_path) -> Path:
    path = tmp_path / "registry.sqlite3"
    SqliteRegistry(path)  # a real registry: the sessions share its file and audit outbox
    return path


def test_store_start_replaces_the_devices_earlier_session(registry_file):
    clock = Clock()
    store = SessionStore(registry_file, clock=clock)
    first = store.start(session(user="田中"))
    elsewhere = store.start(session(device_id="dev-2", tunnel_ip="10.77.0.3", user="田中"))
    clock.advance(minutes=10)
    second = store.start(session(user="suzuki", created=clock()))
    assert {s.session_id for s in store.active()} == {elsewhere.session_id, second.session_id}
    old = store.get(first.session_id)
    assert old.ended_at == clock() and old.end_reason == "replaced by a new sign-in"
    assert store.get(elsewhere.session_id).ended_at is None


def test_store_round_trips_every_field(registry_file):
    store = SessionStore(registry_file, clock=Clock())
    s = session(user="田中", email="tanaka@example.lg.jp", groups=frozenset({"職員", "staff"}),
                amr=frozenset({"pwd", "otp"}), acr="loa2", mfa=True, auth_time=T0 - timedelta(seconds=30))
    store.start(s)
    assert store.get(s.session_id) == s
    assert store.of_user("田中") == [s]
    assert store.get("nope") is None


def test_store_active_excludes_expired_and_ended(registry_file):
    clock = Clock()
    store = SessionStore(registry_file, clock=clock)
    short = store.start(session(lifetime=timedelta(minutes=30)))
    long = store.start(session(device_id="dev-2", tunnel_ip="10.77.0.3", lifetime=timedelta(hours=8)))
    assert len(store.active()) == 2
    assert [s.session_id for s in store.active(T0 + timedelta(minutes=30))] == [long.session_id]
    clock.advance(hours=1)
    assert [s.session_id for s in store.active()] == [long.session_id]
    assert store.get(short.session_id).ended_at is None   # expired is not ended: nothing rewrote it


def test_store_end_by_user_and_device_writes_the_audit_outbox(registry_file):
    clock = Clock()
    store = SessionStore(registry_file, clock=clock)
    a = store.start(session("dev-1", "tanaka"))
    b = store.start(session("dev-2", "tanaka", tunnel_ip="10.77.0.3"))
    c = store.start(session("dev-3", "suzuki", tunnel_ip="10.77.0.4"))
    clock.advance(minutes=1)
    ended = store.end(user="tanaka", reason="lost phone", actor="ops-sato")
    assert {s.session_id for s in ended} == {a.session_id, b.session_id}
    assert store.end(user="tanaka", reason="again", actor="ops-sato") == []
    assert [s.session_id for s in store.active()] == [c.session_id]
    assert store.get(a.session_id).end_reason == "lost phone" and store.get(a.session_id).ended_at == clock()

    gone = store.end(device_id="dev-3", reason="device revoked")   # no actor: the gateway itself
    assert [s.session_id for s in gone] == [c.session_id]

    audit = SqliteRegistry(registry_file).unshipped_audit()
    assert sorted((e.action, e.actor, e.device_id, e.reason) for e in audit) == [
        ("user.signout", "ops-sato", "dev-1", "lost phone"), ("user.signout", "ops-sato", "dev-2", "lost phone")]


def test_store_end_needs_a_selector(registry_file):
    store = SessionStore(registry_file)
    with pytest.raises(ValueError):
        store.end(reason="x")


def test_store_without_a_registry_still_ends_sessions(tmp_path):
    store = SessionStore(tmp_path / "sessions.sqlite", clock=Clock())
    s = store.start(session())
    assert [x.session_id for x in store.end(user="tanaka", reason="r", actor="ops")] == [s.session_id]


def test_store_revision_moves_on_every_write_only(registry_file):
    store = SessionStore(registry_file, clock=Clock())
    seen = [store.revision()]
    store.start(session())
    seen.append(store.revision())
    store.active(); store.get("x"); store.of_user("tanaka")
    assert store.revision() == seen[-1]
    store.start(session(user="suzuki", created=T0 + timedelta(minutes=1)))  # replaces: one write
    seen.append(store.revision())
    store.end(user="suzuki", reason="r")
    seen.append(store.revision())
    assert store.end(user="suzuki", reason="r") == []
    assert store.revision() == seen[-1]            # nothing ended, nothing moved
    assert seen == sorted(set(seen)) and len(seen) == 4


def test_store_sees_another_connections_writes(registry_file):
    gateway, cli = SessionStore(registry_file, clock=Clock()), SessionStore(registry_file, clock=Clock())
    s = gateway.start(session())
    rev = gateway.revision()
    cli.end(user="tanaka", reason="operator", actor="ops")
    assert gateway.revision() > rev and gateway.active() == []
    assert gateway.get(s.session_id).end_reason == "operator"


# -- the `signin:` config section -----------------------------------------------------------------

def config(section: str) -> str:
    return VALID + section


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def errors_of(text: str) -> list[str]:
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text, "k.yaml")
    return [str(e) for e in exc.value.errors]


def test_signin_section_loads(tmp_path):
    secret = tmp_path / "oidc-secret"
    secret.write_text("  from-a-file\n")
    text = config(f"""\
signin:
  issuer: https://login.example.lg.jp/realms/staff/
  client_id: kanmon-gateway
  client_secret_file: {secret}
  portal_host: SignIn.Kanmon.Internal
  session_lifetime: 4h
  pending_lifetime: 5 m
  clock_skew: 30
  allow_before_signin: [Login.Example.lg.jp., .apple.com]
  mfa_amr: [otp]
  mfa_acr: [urn:loa3]
  exempt_groups: [kiosk]
  shared_groups: [shared-pool]
  require_owner_match: false
  reauthenticate_shared: false
""")
    s = load_config_text(text, "k.yaml").signin
    assert not s.reauthenticate_shared
    default = config("signin:\n  issuer: https://idp.example\n  client_id: c\n  client_secret: x\n")
    assert load_config_text(default, "k.yaml").signin.reauthenticate_shared
    assert s.issuer == "https://login.example.lg.jp/realms/staff"
    assert s.discovery_url == "https://login.example.lg.jp/realms/staff/.well-known/openid-configuration"
    assert s.client_secret == "from-a-file"
    assert s.redirect_uri == "https://signin.kanmon.internal/callback"
    assert (s.session_lifetime_seconds, s.pending_lifetime_seconds, s.clock_skew_seconds) == (14400, 300, 30)
    assert s.mfa_amr == ("otp",) and s.mfa_acr == ("urn:loa3",)
    assert s.exempt_groups == ("kiosk",) and s.shared_groups == ("shared-pool",) and not s.require_owner_match
    assert s.allowed_before_signin("login.example.lg.jp") and s.allowed_before_signin("swcdn.apple.com")
    assert s.allowed_before_signin("apple.com") and not s.allowed_before_signin("notapple.com")
    assert not s.allowed_before_signin("evil.test") and not s.allowed_before_signin(None)
    assert load_config_text(VALID, "k.yaml").signin is None


def test_signin_defaults():
    s = load_config_text(config("signin: {issuer: 'https://idp.example', client_id: c, client_secret: x}\n"),
                         "k.yaml").signin
    assert s.scopes == ("openid", "profile", "email") and s.session_lifetime_seconds == 8 * 3600
    assert s.mfa_amr == DEFAULT_MFA_AMR and s.require_owner_match and s.portal_host == "signin.kanmon.internal"
    assert s.allowed_before_signin("idp.example")  # the IdP itself is always reachable


def test_signin_missing_client_id():
    text = config("signin:\n  issuer: https://idp.example\n  client_secret: x\n")
    errs = errors_of(text)
    assert any(e.startswith(f"k.yaml:{line_of(text, 'signin:')}: signin:") and "client_id" in e for e in errs)


@pytest.mark.parametrize("secrets", ["  client_secret: x\n  client_secret_file: /etc/x\n", ""])
def test_signin_needs_exactly_one_secret(secrets):
    text = config("signin:\n  issuer: https://idp.example\n  client_id: c\n" + secrets)
    assert errors_of(text) == [
        f"k.yaml:{line_of(text, 'signin:')}: signin: client_secret か client_secret_file のどちらか一方を書いてください"
        " / give exactly one of client_secret or client_secret_file"]


def test_signin_unreadable_or_empty_secret_file(tmp_path):
    missing = tmp_path / "nope"
    text = config(f"signin:\n  issuer: https://idp.example\n  client_id: c\n  client_secret_file: {missing}\n")
    (err,) = errors_of(text)
    assert err.startswith(f"k.yaml:{line_of(text, 'client_secret_file')}: signin.client_secret_file: {missing} を読めません")
    assert f"/ cannot read {missing}: file not found" in err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    (err,) = errors_of(text.replace(str(missing), str(empty)))
    assert err == f"k.yaml:{line_of(text, 'client_secret_file')}: signin.client_secret_file: {empty} が空です / {empty} is empty"


def test_signin_relative_secret_file_is_read_next_to_the_config(tmp_path):
    (tmp_path / "secret.txt").write_text("rel\n")
    text = config("signin: {issuer: 'https://idp.example', client_id: c, client_secret_file: secret.txt}\n")
    assert load_config_text(text, str(tmp_path / "kanmon.yaml")).signin.client_secret == "rel"


def test_signin_non_ascii_secret_is_refused():
    text = config("signin:\n  issuer: https://idp.example\n  client_id: c\n  client_secret: 秘密\n")
    assert errors_of(text) == [
        f"k.yaml:{line_of(text, 'client_secret:')}: signin.client_secret: クライアントシークレットは印字可能な ASCII 文字で"
        "書いてください / the client secret must be printable ASCII"]


def test_signin_scopes_must_include_openid():
    text = config("signin:\n  issuer: https://idp.example\n  client_id: c\n  client_secret: x\n"
                  "  scopes: [profile, email]\n")
    assert errors_of(text) == [
        f"k.yaml:{line_of(text, 'scopes')}: signin.scopes: openid を含めてください(OpenID Connect のサインインです)"
        " / must include openid (this is OpenID Connect sign-in)"]


@pytest.mark.parametrize("key, value, expect", [
    ("session_lifetime", "8 hours", "is not valid"),
    ("session_lifetime", "-1h", "is not valid"),
    ("pending_lifetime", "0", "is not valid"),
    ("session_lifetime", "0h", "must be longer than 0"),
    ("clock_skew", "1w", "is not valid"),
])
def test_signin_bad_durations(key, value, expect):
    text = config(f"signin:\n  issuer: https://idp.example\n  client_id: c\n  client_secret: x\n  {key}: '{value}'\n")
    (err,) = errors_of(text)
    assert err.startswith(f"k.yaml:{line_of(text, key)}: signin.{key}:") and expect in err


def test_signin_issuer_must_be_https_and_keys_known():
    text = config("signin:\n  issuer: http://idp.example\n  client_id: c\n  client_secret: x\n  colour: blue\n")
    errs = errors_of(text)
    assert any(e.startswith(f"k.yaml:{line_of(text, 'issuer')}: signin.issuer:") for e in errs)
    assert any(e.startswith(f"k.yaml:{line_of(text, 'colour')}: signin.colour:") for e in errs)


# -- SignInService -----------------------------------------------------------------------------------

class ListSink:
    def __init__(self):
        self.records: list[tuple[str, dict]] = []

    def append(self, stream: str, record: dict) -> None:
        self.records.append((stream, record))

    def actions(self, action: str, outcome: str | None = None) -> list[dict]:
        return [r for s, r in self.records if s == "auth" and r["event.action"] == action
                and (outcome is None or r["event.outcome"] == outcome)]


class StubRP:
    """What the service needs of ``OidcRelyingParty``: begin() and complete()."""

    def __init__(self):
        self.counter = itertools.count(1)
        self.claims: dict[str, Any] = claims()
        self.auth_time: datetime | None = T0 - timedelta(seconds=20)
        self.error: Exception | None = None
        self.completed: list[tuple[str, str, str]] = []
        self.forced: list[bool] = []

    def begin(self, *, force_login: bool = False) -> AuthorizationRequest:
        self.forced.append(force_login)
        i = next(self.counter)
        return AuthorizationRequest(url=f"https://idp.example/authorize?state=st-{i}", state=f"st-{i}",
                                    nonce=f"nonce-{i}", code_verifier=f"verifier-{i}".ljust(43, "x"))

    def complete(self, code: str, *, nonce: str, code_verifier: str):
        self.completed.append((code, nonce, code_verifier))
        if self.error is not None:
            raise self.error
        return dict(self.claims), self.auth_time


class Harness:
    def __init__(self, path: Path, **settings_changes):
        self.settings = dataclasses.replace(SETTINGS, **settings_changes)
        self.clock = Clock()
        self.mono = [1000.0]
        self.rp = StubRP()
        self.sink = ListSink()
        self.changed: list[set[str]] = []
        self.store = SessionStore(path, clock=self.clock)
        self.service = SignInService(self.settings, self.store, self.sink, rp=self.rp,
                                     on_sessions_changed=self.changed.append, clock=self.clock,
                                     monotonic=lambda: self.mono[0])

    def begin(self, dev: DeviceRecord, next_url: str | None = "https://intranet.example.jp/") -> str:
        url = asyncio.run(self.service.begin(dev, str(dev.ipv4), next_url))
        return url.rsplit("state=", 1)[1]

    def finish(self, dev: DeviceRecord, params: dict[str, str], tunnel_ip: str | None = None):
        return asyncio.run(self.service.finish(dev, tunnel_ip or str(dev.ipv4), params))

    def sign_in(self, dev: DeviceRecord):
        return self.finish(dev, {"state": self.begin(dev), "code": "c-1"})


@pytest.fixture
def h(registry_file) -> Harness:
    return Harness(registry_file)


def test_finish_starts_a_session_and_writes_one_auth_record(h):
    dev = device()
    state = h.begin(dev)
    assert h.sink.actions("user-signin-start")[0]["device.id"] == "dev-1"
    outcome = h.finish(dev, {"state": state, "code": "the-code"})
    s = outcome.session
    assert s is not None and outcome.next_url == "https://intranet.example.jp/" and outcome.reason == ""
    assert (s.user, s.mfa, s.amr) == ("tanaka", True, {"pwd", "otp"})
    assert h.rp.completed == [("the-code", "nonce-1", "verifier-1".ljust(43, "x"))]
    (rec,) = h.sink.actions("user-signin")
    assert rec["event.outcome"] == "success" and rec["user.name"] == "tanaka" and rec["source.ip"] == "10.77.0.2"
    assert rec["kanmon.auth.amr"] == ["otp", "pwd"] and rec["kanmon.auth.mfa"] is True
    assert rec["kanmon.auth.session"] == s.session_id and rec["event.dataset"] == "kanmon.auth"
    assert h.service.session_for(dev) == s
    assert [x.session_id for x in h.store.active()] == [s.session_id]
    assert h.changed == [{"dev-1"}]
    # bound to the tunnel address: the same device id from elsewhere has no session
    assert h.service.session_for(dataclasses.replace(dev, ipv4=ipaddress.IPv4Address("10.77.0.99"), ipv6=None)) is None


def test_signin_through_a_dual_stack_listener_binds_the_plain_ipv4_address(h):
    # mitmproxy on a dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d; the identity
    # addon maps it back to find the device, so the session must match it too
    dev = device()
    state = asyncio.run(h.service.begin(dev, "::ffff:10.77.0.2", None)).rsplit("state=", 1)[1]
    s = h.finish(dev, {"state": state, "code": "c"}, tunnel_ip="::ffff:10.77.0.2").session
    assert s is not None and s.tunnel_ip == "10.77.0.2"
    assert h.service.session_for(dev) == s
    assert h.store.get(s.session_id).tunnel_ip == "10.77.0.2"
    # started through one view of the address, finished through the other: the same device
    state = asyncio.run(h.service.begin(dev, "::ffff:10.77.0.2", None)).rsplit("state=", 1)[1]
    assert h.finish(dev, {"state": state, "code": "c"}, tunnel_ip="10.77.0.2").session is not None


def test_replayed_callback_is_refused_and_logged(h):
    dev = device()
    params = {"state": h.begin(dev), "code": "c"}
    first = h.finish(dev, params).session
    again = h.finish(dev, params)
    assert again.session is None and again.reason == "state-replayed"
    assert h.sink.actions("user-signin", "failure")[0]["kanmon.auth.reason"] == "state-replayed"
    assert len(h.rp.completed) == 1                 # the code was not exchanged twice
    assert [s.session_id for s in h.store.active()] == [first.session_id]


def assert_one_refusal(h: Harness, outcome, reason: str) -> dict:
    assert outcome.session is None and outcome.reason == reason
    (rec,) = h.sink.actions("user-signin", "failure")
    assert rec["kanmon.auth.reason"] == reason and rec["event.reason"].startswith(reason)
    assert rec["device.id"] == "dev-1"
    assert h.sink.actions("user-signin", "success") == [] and h.store.active() == []
    assert h.changed == []
    return rec


@pytest.mark.parametrize("reason", ["token-aud-invalid", "token-iss-invalid", "token-expired",
                                    "token-signature-invalid", "token-nonce-invalid", "idp-unreachable"])
def test_rp_refusals_are_logged_with_their_reason(h, reason):
    dev = device()
    h.rp.error = SignInRefused(reason, "details for the operator")
    rec = assert_one_refusal(h, h.sign_in(dev), reason)
    assert "details for the operator" in rec["event.reason"]


def test_unexpected_rp_failure_is_a_logged_refusal(h):
    dev = device()
    h.rp.error = RuntimeError("library surprise")
    outcome = h.sign_in(dev)
    rec = assert_one_refusal(h, outcome, "signin-error")
    assert "library surprise" in rec["event.reason"]


def test_callback_refusals_are_logged(h):
    dev = device()
    cases = [
        ({"code": "c"}, "state-missing"),
        ({"state": "forged", "code": "c"}, "state-unknown"),
        ({"state": h.begin(dev), "error": "access_denied", "error_description": "user cancelled"}, "idp-error"),
        ({"state": h.begin(dev)}, "code-missing"),
    ]
    for params, reason in cases:
        h.sink.records.clear()
        outcome = h.finish(dev, params)
        assert_one_refusal(h, outcome, reason)
    assert h.rp.completed == []


def test_callback_from_another_device_is_refused(h):
    dev, other = device(), device("dev-2", n=3)
    state = h.begin(dev)
    h.sink.records.clear()
    outcome = h.finish(other, {"state": state, "code": "c"})
    assert outcome.reason == "state-other-device"
    (rec,) = h.sink.actions("user-signin", "failure")
    assert rec["device.id"] == "dev-2" and h.rp.completed == []


def test_callback_after_the_pending_lifetime_is_refused(h):
    dev = device()
    state = h.begin(dev)
    h.mono[0] += h.settings.pending_lifetime_seconds + 1
    h.sink.records.clear()
    assert_one_refusal(h, h.finish(dev, {"state": state, "code": "c"}), "state-expired")


def test_owner_mismatch_is_refused_unless_the_device_is_shared(registry_file):
    h = Harness(registry_file, shared_groups=("shared-pool",))
    suzukis = device(owner="suzuki")
    rec = assert_one_refusal(h, h.sign_in(suzukis), "owner-mismatch")
    assert rec["user.name"] == "tanaka"
    pool = device("dev-9", owner="suzuki", groups=("shared-pool",), n=9)
    assert h.sign_in(pool).session.user == "tanaka"
    by_mail = device("dev-5", owner="tanaka@example.lg.jp", n=5)
    assert h.sign_in(by_mail).session is not None


def test_shared_devices_make_the_idp_authenticate_again_and_prove_it(registry_file):
    # On a pool device the previous user's IdP session must not sign the next user in: the
    # IdP is asked for a new login and the token's auth_time must be from this sign-in.
    h = Harness(registry_file, shared_groups=("shared-pool",))
    pool = device("dev-9", owner="pool", groups=("shared-pool",), n=9)
    h.rp.auth_time = T0 - timedelta(seconds=h.settings.clock_skew_seconds - 1)    # within the skew: fresh
    assert h.sign_in(pool).session.user == "tanaka" and h.rp.forced == [True]
    h.service.sign_out_device(pool, "10.77.0.9")
    h.clock.advance(minutes=5)
    h.rp.auth_time = T0                                   # the IdP reused its 5-minute-old session
    h.sink.records.clear()
    outcome = h.sign_in(pool)
    assert outcome.session is None and outcome.reason == "reauthentication-missing"
    (rec,) = h.sink.actions("user-signin", "failure")
    assert rec["kanmon.auth.reason"] == "reauthentication-missing" and rec["user.name"] == "tanaka"
    assert h.service.session_for(pool) is None and h.store.active() == []
    h.rp.auth_time = None                                 # no auth_time at all: cannot be proven
    assert h.sign_in(pool).reason == "reauthentication-missing" and h.store.active() == []
    h.rp.auth_time = h.clock() + timedelta(seconds=2)
    assert h.sign_in(pool).session is not None
    # a personal device keeps the IdP's single sign-on
    h.rp.auth_time = T0 - timedelta(days=1)
    assert h.sign_in(device()).session is not None and h.rp.forced[-1] is False


def test_forced_login_on_shared_devices_can_be_switched_off(registry_file):
    h = Harness(registry_file, shared_groups=("shared-pool",), reauthenticate_shared=False)
    h.rp.auth_time = T0 - timedelta(days=1)
    assert h.sign_in(device("dev-9", owner="pool", groups=("shared-pool",), n=9)).session is not None
    assert h.rp.forced == [False]


def test_owner_match_can_be_switched_off(registry_file):
    h = Harness(registry_file, require_owner_match=False)
    assert h.sign_in(device(owner="suzuki")).session.user == "tanaka"


def test_exempt_groups_need_no_signin(registry_file):
    h = Harness(registry_file, exempt_groups=("kiosk",))
    assert h.service.required_for(device()) and not h.service.required_for(device(groups=("kiosk",)))


def test_refresh_reports_sessions_ended_by_another_process(h):
    dev, dev2 = device(), device("dev-2", owner="tanaka", n=3)
    h.sign_in(dev)
    h.sign_in(dev2)
    assert h.service.refresh() == set()
    h.changed.clear()
    h.sink.records.clear()
    cli = SessionStore(h.store.path, clock=h.clock)          # `kanmon user signout` in its own process
    cli.end(user="tanaka", reason="signed out by an operator", actor="ops")
    assert h.service.refresh() == {"dev-1", "dev-2"}
    assert h.service.session_for(dev) is None and h.service.session_for(dev2) is None
    recs = h.sink.actions("user-session-ended")
    assert sorted(r["device.id"] for r in recs) == ["dev-1", "dev-2"]
    assert {r["event.reason"] for r in recs} == {"signed out by an operator"} and recs[0]["user.name"] == "tanaka"
    assert h.changed == [{"dev-1", "dev-2"}]
    assert h.service.refresh() == set() and len(h.sink.records) == 2


def test_refresh_picks_up_a_signin_made_elsewhere(h):
    dev = device()
    assert h.service.refresh() == set()
    other_node = SessionStore(h.store.path, clock=h.clock)
    s = other_node.start(session(tunnel_ip="10.77.0.2"))
    assert h.service.refresh() == set()
    assert h.service.session_for(dev) == s and h.changed == [{"dev-1"}]


def test_refresh_detects_expiry_with_the_injected_clock(h):
    dev = device()
    s = h.sign_in(dev).session
    h.service.refresh()
    h.clock.advance(seconds=h.settings.session_lifetime_seconds - 1)
    assert h.service.refresh() == set() and h.service.session_for(dev) == s
    h.changed.clear()
    h.clock.advance(seconds=1)
    assert h.service.session_for(dev) is None            # the lookup itself never serves it
    assert h.service.refresh() == {"dev-1"}
    (rec,) = h.sink.actions("user-session-expired")
    assert rec["user.name"] == "tanaka" and rec["device.id"] == "dev-1"
    assert h.changed == [{"dev-1"}]
    assert h.service.refresh() == set()


def test_user_signout_and_device_revocation_end_sessions(h):
    dev, dev2 = device(), device("dev-2", n=3)
    h.sign_in(dev)
    h.sign_in(dev2)
    h.changed.clear()
    ended = h.service.sign_out_device(dev, "10.77.0.2")
    assert ended.device_id == "dev-1" and h.service.session_for(dev) is None and h.changed == [{"dev-1"}]
    assert h.sink.actions("user-signout")[0]["user.name"] == "tanaka"
    assert h.service.sign_out_device(dev, "10.77.0.2") is None
    assert [s.device_id for s in h.service.end_for_devices(["dev-2", "dev-404"], "device revoked")] == ["dev-2"]
    assert h.service.session_for(dev2) is None and h.store.active() == []
    assert h.sink.actions("user-session-ended")[0]["event.reason"] == "device revoked"
    assert h.service.refresh() == set()   # already out of the directory: not reported twice


def test_revocation_while_the_session_store_is_down_ends_the_session_once_it_is_back(h, monkeypatch):
    # PostgreSQL down (or SQLite locked) when a signed-in device is revoked: the device is
    # signed out at once in memory, end_for_devices does not raise (the reconcile pass goes on
    # to cut its connections), refresh keeps it out although the store still lists its
    # session, and the end is written when the store answers again.
    dev = device()
    s = h.sign_in(dev).session
    h.service.refresh()
    real_end = h.store.end

    def store_down(**kwargs):
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(h.store, "end", store_down)
    assert h.service.end_for_devices(["dev-1"], "device revoked") == []
    assert h.service.session_for(dev) is None
    assert [x.session_id for x in h.store.active()] == [s.session_id]        # not written yet
    h.service._revision = -1                                                  # force a reload from the store
    h.service.refresh()
    assert h.service.session_for(dev) is None                                 # the stored session is not served
    assert h.sink.actions("user-session-ended") == []
    monkeypatch.setattr(h.store, "end", real_end)
    h.service.refresh()                                                       # the store is back: retried
    assert h.store.active() == [] and h.store.get(s.session_id).end_reason == "device revoked"
    (rec,) = h.sink.actions("user-session-ended")
    assert rec["device.id"] == "dev-1" and rec["event.reason"] == "device revoked"
    h.service.refresh()
    assert len(h.sink.actions("user-session-ended")) == 1                     # written and logged once
