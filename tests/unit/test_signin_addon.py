"""The captive sign-in gate (addons/signin.py) in the addon chain, unit level with mitmproxy's
tflow: redirects and blocks before sign-in, the portal's pages and callback, the portal's DNS
answer, TLS and raw TCP of unsigned devices, exempt devices."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from urllib.parse import parse_qs, urlparse

import pytest
from mitmproxy import dns, options
from mitmproxy.proxy import context as proxy_context
from mitmproxy.test import tflow
from mitmproxy.tls import ClientHelloData
from wireguard_tools import WireguardKey

from addons.blockpage import Helpdesk
from addons.enforce import Enforcer
from addons.hostrules import HostRuleDecider
from gateway.proxy.flowstate import METADATA_SESSION, METADATA_VERDICT
from addons.identity import DeviceDirectory, DeviceIdentity
from addons.signin import SignInGate, safe_next, wants_html
from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.registry.model import DeviceRecord
from gateway.signin.oidc import AuthorizationRequest, SignInRefused
from gateway.signin.service import SignInService
from gateway.signin.settings import SignInSettings
from gateway.signin.store import SessionStore
from gateway.verdict import RULE_SIGNIN_PORTAL, RULE_SIGNIN_REQUIRED, Action

PORTAL = "signin.kanmon.internal"
ALICE_PHONE = DeviceRecord("alice-phone", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.2"),
                           ipaddress.ip_address("fd77:77::2"), owner="alice@example.jp")
KIOSK = DeviceRecord("kiosk", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.3"),
                     owner="", groups=frozenset({"kiosk"}))
SETTINGS = SignInSettings(issuer="https://idp.example.jp", client_id="kanmon", client_secret="s3cret",
                          portal_host=PORTAL, allow_before_signin=("mdm.example.jp", ".apple.com"),
                          exempt_groups=("kiosk",))
INTERNAL = [ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("fd77:77::/64")]


class StubRP:
    """Stands in for the IdP conversation (tested against a real HTTP IdP in test_signin_oidc.py)."""

    def __init__(self):
        self.down = False
        self.claims = {"sub": "u-1", "iss": SETTINGS.issuer, "preferred_username": "alice",
                       "email": "alice@example.jp", "amr": ["pwd", "otp"], "groups": ["staff"]}
        self.count = 0

    def begin(self, *, force_login: bool = False) -> AuthorizationRequest:
        if self.down:
            raise SignInRefused("idp-unreachable", "connection refused")
        self.count += 1
        state = f"state-{self.count}"
        return AuthorizationRequest(f"https://idp.example.jp/auth?state={state}", state, f"nonce-{self.count}", "v" * 43)

    def complete(self, code, *, nonce, code_verifier):
        return dict(self.claims, nonce=nonce), None


class Sink:
    def __init__(self):
        self.records: list[tuple[str, dict]] = []

    def append(self, stream, record):
        self.records.append((stream, record))

    def auth(self):
        return [r for s, r in self.records if s == "auth"]


class Chain:
    def __init__(self, tmp_path):
        self.metrics = GatewayMetrics()
        self.connections = LiveConnections()
        self.directory = DeviceDirectory()
        self.directory.replace([ALICE_PHONE, KIOSK])
        self.sink = Sink()
        self.rp = StubRP()
        self.service = SignInService(SETTINGS, SessionStore(tmp_path / "registry.sqlite"), self.sink, rp=self.rp,
                                     metrics=self.metrics)
        self.identity = DeviceIdentity(self.directory, self.connections, self.metrics)
        self.decider = HostRuleDecider((), Action.ALLOW, self.connections)
        self.gate = SignInGate(self.service, self.connections, "内線 1234")
        self.enforcer = Enforcer(self.connections, self.metrics, Helpdesk("情報システム課", "the IT desk", "内線 1234"),
                                 INTERNAL, lambda cid: None)

    def client(self, ip="10.77.0.2"):
        client = tflow.tclient_conn()
        client.peername = (ip, 40000)
        self.identity.client_connected(client)
        return client

    def request(self, url: str, accept: str = "text/html", client=None, method="GET"):
        flow = tflow.tflow(client_conn=client or self.client())
        parsed = urlparse(url)
        flow.request.method = method
        flow.request.scheme = parsed.scheme
        flow.request.host = parsed.hostname
        flow.request.port = 443 if parsed.scheme == "https" else 80
        flow.request.path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        flow.request.headers["Host"] = parsed.hostname
        flow.request.headers["Accept"] = accept
        flow.server_conn.address = ("198.51.100.80", flow.request.port)
        for addon in (self.identity, self.decider):
            addon.requestheaders(flow)
        asyncio.run(self.gate.requestheaders(flow))
        self.enforcer.requestheaders(flow)
        return flow


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path)


def test_an_unsigned_browser_page_load_is_redirected_to_the_portal(chain):
    flow = chain.request("http://example.jp/news?id=7")
    assert flow.response.status_code == 302
    location = flow.response.headers["Location"]
    assert location.startswith(f"https://{PORTAL}/?next=")
    assert parse_qs(urlparse(location).query)["next"] == ["http://example.jp/news?id=7"]
    assert flow.metadata[METADATA_VERDICT].rule_id == RULE_SIGNIN_REQUIRED


def test_an_unsigned_api_call_gets_the_block_answer_not_a_redirect(chain):
    flow = chain.request("https://api.example.jp/v1/items", accept="application/json")
    assert flow.response.status_code == 403
    assert flow.response.headers["X-Kanmon-Rule"] == RULE_SIGNIN_REQUIRED
    post = chain.request("https://example.jp/form", method="POST")
    assert post.response.status_code == 403


@pytest.mark.parametrize("url", ["https://idp.example.jp/auth", "https://mdm.example.jp/checkin",
                                 "https://swscan.apple.com/update", "https://apple.com/"])
def test_destinations_needed_before_sign_in_pass(chain, url):
    flow = chain.request(url)
    assert flow.response is None and flow.metadata[METADATA_VERDICT].passes


def test_exempt_device_groups_need_no_sign_in(chain):
    flow = chain.request("https://example.jp/", client=chain.client("10.77.0.3"))
    assert flow.response is None


def test_portal_start_callback_then_browsing_works_and_names_the_user(chain):
    client = chain.client()
    page = chain.request(f"https://{PORTAL}/?next=http%3A%2F%2Fexample.jp%2Fnews", client=client)
    body = page.response.get_text()
    assert page.response.status_code == 200 and "サインインが必要です" in body and "Sign-in required" in body
    assert 'id="signin-link"' in body and page.metadata[METADATA_VERDICT].rule_id == RULE_SIGNIN_PORTAL
    start = chain.request(f"https://{PORTAL}/start?next=http%3A%2F%2Fexample.jp%2Fnews", client=client)
    assert start.response.status_code == 302 and start.response.headers["Location"].startswith("https://idp.example.jp/auth")
    done = chain.request(f"https://{PORTAL}/callback?code=abc&state=state-1", client=client)
    assert done.response.status_code == 302 and done.response.headers["Location"] == "http://example.jp/news"
    after = chain.request("http://example.jp/news", client=client)
    assert after.response is None and after.metadata[METADATA_SESSION].user == "alice"
    success = [r for r in chain.sink.auth() if r["event.action"] == "user-signin"]
    assert success[-1]["event.outcome"] == "success" and success[-1]["user.name"] == "alice"
    assert success[-1]["kanmon.auth.mfa"] is True
    status = chain.request(f"https://{PORTAL}/", client=client)
    assert "alice" in status.response.get_text() and "サインインしました" in status.response.get_text()


def test_a_replayed_or_foreign_callback_is_refused_with_a_bilingual_page(chain):
    client = chain.client()
    chain.request(f"https://{PORTAL}/start", client=client)
    chain.request(f"https://{PORTAL}/callback?code=abc&state=state-1", client=client)
    replay = chain.request(f"https://{PORTAL}/callback?code=abc&state=state-1", client=client)
    assert replay.response.status_code == 403
    assert replay.response.headers["X-Kanmon-Signin-Refused"] == "state-replayed"
    assert "サインインできませんでした" in replay.response.get_text() and "Sign-in refused" in replay.response.get_text()
    refused = [r for r in chain.sink.auth() if r["event.outcome"] == "failure"]
    assert refused[-1]["kanmon.auth.reason"] == "state-replayed"


def test_idp_down_at_start_shows_the_refusal_and_logs_it(chain):
    chain.rp.down = True
    flow = chain.request(f"https://{PORTAL}/start")
    assert flow.response.status_code == 502 and "idp-unreachable" in flow.response.get_text()
    assert chain.sink.auth()[-1]["kanmon.auth.reason"] == "idp-unreachable"


def test_portal_name_resolves_to_the_gateway_sinkhole(chain):
    client = chain.client()
    for qtype, expected in ((dns.types.A, "198.18.0.1"), (dns.types.AAAA, "100::1")):
        flow = tflow.tdnsflow(client_conn=client)
        flow.request.questions = [dns.Question(PORTAL, qtype, dns.classes.IN)]
        flow.response = None
        chain.gate.dns_request(flow)
        assert str(ipaddress.ip_address(flow.response.answers[0].data)) == expected
    other = tflow.tdnsflow(client_conn=client)
    other.request.questions = [dns.Question("example.jp", dns.types.A, dns.classes.IN)]
    other.response = None
    chain.gate.dns_request(other)
    assert other.response is None  # ordinary names resolve as the policy says


def _clienthello(chain, client, sni):
    ctx = proxy_context.Context(client, options.Options())
    hello = type("Hello", (), {"sni": sni})()
    return ClientHelloData(ctx, hello)


def test_unsigned_devices_tls_is_intercepted_even_under_no_inspect(chain):
    client = chain.client()
    data = _clienthello(chain, client, "bank.example.jp")
    data.ignore_connection = True   # what a no-inspect rule would have said
    chain.gate.tls_clienthello(data)
    assert data.ignore_connection is False
    idp = _clienthello(chain, client, "idp.example.jp")
    idp.ignore_connection = True
    chain.gate.tls_clienthello(idp)
    assert idp.ignore_connection is True   # allowed before sign-in: policy decides as usual


def test_unsigned_raw_tcp_is_blocked_by_the_enforcer(chain):
    client = chain.client()
    flow = tflow.ttcpflow(client_conn=client)
    flow.server_conn.address = ("198.51.100.90", 7070)
    chain.identity.tcp_start(flow)
    chain.decider.tcp_start(flow)
    chain.gate.tcp_start(flow)
    chain.enforcer.tcp_start(flow)
    assert flow.metadata[METADATA_VERDICT].rule_id == RULE_SIGNIN_REQUIRED
    assert chain.connections.get(client.id).blocked is not None


@pytest.mark.parametrize("url,ok", [("https://example.jp/a?b=1", True), ("http://x.jp/", True),
                                    ("javascript:alert(1)", False), (f"https://{PORTAL}/start", False),
                                    ("//evil.example/", False), ("", False)])
def test_next_urls_are_only_web_addresses_off_the_portal(url, ok):
    assert (safe_next(url, PORTAL) == url) is ok
    assert safe_next(None, PORTAL) is None


def test_wants_html():
    from mitmproxy.test import tutils as tu
    req = tu.treq()
    req.headers["Accept"] = "text/html,application/xhtml+xml"
    assert wants_html(req)
    req.headers["Accept"] = "application/json"
    assert not wants_html(req)


def test_a_burst_of_refused_sign_ins_is_what_review_and_alerts_look_for(chain):
    """Refusals go to the auth stream with a reason: the review report's burst finder and the
    kanmon_auth_failures_total series (alert KanmonAuthFailureBurst) pick them up."""
    import json
    from datetime import UTC, datetime, timedelta

    from gateway.logstore.fields import format_timestamp
    from gateway.reports.review import find_auth_bursts

    client = chain.client()
    for _ in range(12):
        chain.request(f"https://{PORTAL}/callback?code=x&state=forged", client=client)
    failures = [r for r in chain.sink.auth() if r["event.outcome"] == "failure"]
    assert len(failures) == 12 and {r["kanmon.auth.reason"] for r in failures} == {"state-unknown"}
    start = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)
    stamped = [dict(r, **{"@timestamp": format_timestamp(start + timedelta(seconds=10 * i))}) for i, r in enumerate(failures)]
    bursts = find_auth_bursts(stamped, threshold=10, window=timedelta(minutes=5))
    assert len(bursts) == 1 and bursts[0].device_id == "alice-phone" and bursts[0].failures == 12
    metrics = GatewayMetrics()
    for r in failures:
        metrics.observe_log_record("auth", json.dumps(r))
    assert metrics.registry.get_sample_value("kanmon_auth_failures_total", {"reason": "state-unknown"}) == 12


@pytest.mark.parametrize("reason", ["state-replayed", "owner-mismatch", "token-aud-invalid", "idp-unreachable",
                                    "<script>x</script>"])
def test_refusal_pages_are_bilingual_self_contained_and_escaped(reason):
    import re
    from datetime import UTC, datetime

    from gateway.signin import pages

    page = pages.refused_page(reason=reason, device_id="alice-phone", portal_host=PORTAL, contact="内線 1234",
                              now=datetime(2026, 11, 2, 1, 0, tzinfo=UTC))
    assert "サインインできませんでした" in page and "Sign-in refused" in page and "2026-11-02 10:00:00 JST" in page
    assert "<script>" not in page
    # No external resources: the only link is the portal's own retry.
    assert re.findall(r'(?:src|href)="([^"]+)"', page) == [f"https://{PORTAL}/start"]
    ja_text = page.split('id="ja"')[1].split("</section>")[0]
    assert "サインインを受け付けられませんでした" not in ja_text or reason.startswith("<")


def test_a_session_store_failure_refuses_the_sign_in_with_a_reason(chain, monkeypatch):
    def broken(session):
        raise RuntimeError("registry unreachable")

    monkeypatch.setattr(chain.service.store, "start", broken)
    client = chain.client()
    chain.request(f"https://{PORTAL}/start", client=client)
    done = chain.request(f"https://{PORTAL}/callback?code=abc&state=state-1", client=client)
    assert done.response.status_code == 403
    assert done.response.headers["X-Kanmon-Signin-Refused"] == "session-store-unavailable"
    assert chain.sink.auth()[-1]["kanmon.auth.reason"] == "session-store-unavailable"
    after = chain.request("http://example.jp/", client=client)
    assert after.response.status_code == 302   # still not signed in


def _signed_in(chain, client):
    chain.request(f"https://{PORTAL}/start", client=client)
    done = chain.request(f"https://{PORTAL}/callback?code=abc&state=state-{chain.rp.count}", client=client)
    assert done.response.status_code == 200 and "サインインしました" in done.response.get_text()
    return done.response.get_text()


def test_the_sign_out_button_signs_out_only_with_its_own_session_token(chain):
    client = chain.client()
    page = _signed_in(chain, client)
    action = re.search(r'<form method="post" action="(/signout\?session=[0-9a-f]{32})">', page).group(1)
    assert 'id="signout"' in page and "サインアウト" in page and "Sign out" in page
    # a link (GET) or another site's form (no token, a wrong one) changes nothing
    for method, path in (("GET", action), ("POST", "/signout"), ("POST", "/signout?session=" + "0" * 32)):
        r = chain.request(f"https://{PORTAL}{path}", client=client, method=method)
        assert r.response.status_code == 302 and r.response.headers["Location"] == f"https://{PORTAL}/"
        assert chain.service.session_for(ALICE_PHONE) is not None, (method, path)
    out = chain.request(f"https://{PORTAL}{action}", client=client, method="POST")
    assert out.response.status_code == 200 and "サインインが必要です" in out.response.get_text()
    assert chain.service.session_for(ALICE_PHONE) is None
    assert [r["user.name"] for r in chain.sink.auth() if r["event.action"] == "user-signout"] == ["alice"]
    blocked = chain.request("http://example.jp/news", client=client)
    assert blocked.response.status_code == 302      # back to the portal
    # the old form cannot end the next session
    _signed_in(chain, client)
    again = chain.request(f"https://{PORTAL}{action}", client=client, method="POST")
    assert again.response.status_code == 302 and chain.service.session_for(ALICE_PHONE) is not None
