"""The OIDC test infrastructure of issue #9, end to end, without the gateway's sign-in feature:
a real OpenID Connect provider (oidc-provider) at https://idp.test in the fake internet, and a
scripted headless Chromium in a device namespace whose traffic goes through the running gateway
(which intercepts TLS). The authorization-code + PKCE flow is driven in the browser; the code is
exchanged from the internet namespace and the ID token verified the way Authlib's OpenID client
does it (joserfc JWS + authlib.oidc.core.CodeIDToken). Each token-mangling mode must produce
exactly the defect it names, so the gateway's refusal tests can trust them."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
from urllib.parse import parse_qs, urlencode, urlparse

import pytest

from gateway.lab.oidcprovider import (ACR_MFA, ACR_PASSWORD, ISSUER, MODES, TEST_USERS, OidcClient, OidcProviderError,
                                      ensure_installed, oidc_prerequisites)
from gateway.lab.topology import Lab
from tests.e2e.conftest import require_lab, running_lab
from tests.availability import unavailable

REDIRECT_URI = "https://example.test/cb"


def _require_oidc_lab() -> None:
    missing = list(oidc_prerequisites())
    if not os.path.exists("/usr/bin/chromium"):
        missing.append("chromium (apt-get install chromium)")
    if shutil.which("certutil") is None:
        missing.append("certutil (apt-get install libnss3-tools)")
    for module, pin in (("playwright", "playwright==1.65.2"), ("authlib", "Authlib==1.9.9")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"python package {pin}")
    if not missing:
        return
    reason = "OIDC lab cannot run here: missing " + ", ".join(missing)
    unavailable(reason)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_lab()
    _require_oidc_lab()
    lab = Lab(tmp_path_factory.mktemp("oidclab"), n_devices=1, idp=True)
    with running_lab(lab, "test_oidc_lab"):
        yield lab


@pytest.fixture(autouse=True)
def _clean_mode(request):
    """Every lab test starts and ends with unspoiled tokens."""
    if "lab" not in request.fixturenames:
        yield
        return
    lab = request.getfixturevalue("lab")
    lab.idp.set_mode("none")
    yield
    lab.idp.set_mode("none")


# -- helpers --------------------------------------------------------------------------------------
class AuthRequest:
    """One authorization request of a relying party: state, nonce and PKCE pair."""

    def __init__(self, client: OidcClient):
        self.state = secrets.token_urlsafe(16)
        self.nonce = secrets.token_urlsafe(16)
        self.verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(self.verifier.encode()).digest()).rstrip(b"=").decode()
        self.url = f"{ISSUER}/auth?" + urlencode({
            "client_id": client.client_id, "response_type": "code", "scope": "openid profile email groups",
            "redirect_uri": REDIRECT_URI, "state": self.state, "nonce": self.nonce,
            "code_challenge": challenge, "code_challenge_method": "S256"})


def sign_in_steps(request: AuthRequest, username: str, password: str, otp: str | None = None) -> list[dict]:
    steps = [{"action": "goto", "url": request.url},
             {"action": "fill", "selector": "#username", "value": username},
             {"action": "fill", "selector": "#password", "value": password},
             {"action": "click", "selector": "#login-submit"}]
    if otp is not None:
        steps += [{"action": "text", "selector": "#otp-user"},
                  {"action": "fill", "selector": "#otp", "value": otp},
                  {"action": "click", "selector": "#otp-submit"}]
    return steps + [{"action": "wait_for_url", "pattern": REDIRECT_URI + "?**"}, {"action": "url"}]


def browse(lab: Lab, steps: list[dict], **kwargs) -> dict:
    from gateway.lab.browser import run_browser
    return run_browser(lab.devices[0], steps, timeout=120, **kwargs)


def code_from(url: str, request: AuthRequest) -> str:
    query = parse_qs(urlparse(url).query)
    assert url.startswith(REDIRECT_URI + "?"), url
    assert query["state"] == [request.state]
    assert query["iss"] == [ISSUER]          # RFC 9207 issuer identification
    return query["code"][0]


def sign_in(lab: Lab, user: str) -> tuple[AuthRequest, dict]:
    """Full browser sign-in of a test user; returns the request and the browser result."""
    u = TEST_USERS[user]
    request = AuthRequest(lab.idp.client)
    result = browse(lab, sign_in_steps(request, u.username, u.password, u.otp))
    assert result["ok"], result
    return request, result


def verify(token_response: dict, jwks: dict, request: AuthRequest, client: OidcClient):
    """Verify an ID token as Authlib's OpenID client does (OpenIDMixin.parse_id_token), plus
    an explicit audience option: parse_id_token's defaults check only iss, and catch a foreign
    aud merely through the azp rule (which a token carrying azp=<our client> would pass)."""
    from authlib.oidc.core import CodeIDToken
    from joserfc import jwt
    from joserfc.jwk import KeySet
    from joserfc.jws import JWSRegistry

    token = jwt.decode(token_response["id_token"], KeySet.import_key_set(jwks),
                       registry=JWSRegistry(algorithms=["RS256"], strict_check_header=False))
    options = {"iss": {"essential": True, "values": [ISSUER]},
               "aud": {"essential": True, "values": [client.client_id]}}
    params = {"nonce": request.nonce, "client_id": client.client_id, "access_token": token_response["access_token"]}
    claims = CodeIDToken(token.claims, token.header, options, params)
    claims.validate(leeway=0)
    return claims


# -- tests ----------------------------------------------------------------------------------------
def test_discovery_through_the_gateway(lab):
    device = lab.devices[0]
    out = device.curl(f"{ISSUER}/.well-known/openid-configuration")
    body, _, code = out.stdout.rpartition("\nHTTP_CODE=")
    assert code == "200", out.stderr
    import json
    doc = json.loads(body)
    assert doc["issuer"] == ISSUER
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert {"openid", "profile", "email", "groups"} <= set(doc["scopes_supported"])
    assert {"amr", "acr", "groups", "preferred_username", "email"} <= set(doc["claims_supported"])
    assert doc["acr_values_supported"] == [ACR_PASSWORD, ACR_MFA]
    assert doc["response_types_supported"] == ["code"]
    # It went through the gateway (its proxy logged it), to the IdP's lab address.
    assert any((r.get("url.full") or "").startswith(f"{ISSUER}/.well-known/") and r.get("source.ip") == device.ipv4
               for r in lab.log_records("proxy")), "the gateway's proxy log has no record of the discovery request"
    assert [q for q in lab.dns_queries() if q["name"] == "idp.test" and q["type"] == "A"]
    # The test-control endpoint is not reachable from the device.
    control = device.curl("http://idp.test:9999/mode", timeout=5)
    assert '"mode"' not in control.stdout


def test_the_browser_trusts_only_the_ca_it_is_given(lab):
    """Without the interception CA in its NSS database Chromium refuses the gateway's
    certificates, so the trust set-up is what makes the other tests work (no ignored errors)."""
    result = browse(lab, [{"action": "goto", "url": "https://example.test/"}], trust_ca=False)
    assert not result["ok"]
    assert "ERR_CERT_AUTHORITY_INVALID" in result["steps"][0]["error"]
    shot = lab.workdir / "example.png"
    trusted = browse(lab, [{"action": "goto", "url": "https://example.test/"}, {"action": "text", "selector": "body"},
                           {"action": "screenshot", "path": str(shot)}, {"action": "url"}])
    assert trusted["ok"], trusted
    assert trusted["steps"][0]["value"] == 200
    assert "hello from example.test via https" in trusted["steps"][1]["value"]
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert trusted["steps"][3]["value"] == trusted["final_url"] == "https://example.test/"
    assert [(r["url"], r["status"]) for r in trusted["responses"]] == [("https://example.test/", 200)]


def test_alice_signs_in_with_otp_and_bob_with_password_only(lab):
    client = lab.idp.client
    jwks = lab.idp.jwks()
    issued = {}
    for user in ("alice", "bob"):
        request, result = sign_in(lab, user)
        code = code_from(result["final_url"], request)
        visited = [r["url"] for r in result["responses"]]
        asked_otp = any(urlparse(u).path.endswith("/otp") for u in visited)
        assert asked_otp == TEST_USERS[user].mfa, visited
        # The IdP's redirect to the relying party carried the code (what a gateway observes).
        redirects = [r for r in result["responses"] if r["status"] in (302, 303) and
                     (r["location"] or "").startswith(REDIRECT_URI + "?")]
        assert redirects and code in redirects[-1]["location"]
        status, tokens = lab.idp.exchange_code(code, request.verifier)
        assert status == 200, tokens
        issued[user] = verify(tokens, jwks, request, client)
        # A code is good once.
        again, error = lab.idp.exchange_code(code, request.verifier)
        assert (again, error["error"]) == (400, "invalid_grant")

    alice, bob = issued["alice"], issued["bob"]
    assert alice["preferred_username"] == "alice" and bob["preferred_username"] == "bob"
    assert alice["sub"] == TEST_USERS["alice"].sub and alice["email"] == TEST_USERS["alice"].email
    assert set(alice["amr"]) >= {"pwd", "otp"} and alice["acr"] == ACR_MFA
    assert bob["amr"] == ["pwd"] and bob["acr"] == ACR_PASSWORD
    assert alice["groups"] == list(TEST_USERS["alice"].groups) and bob["groups"] == ["staff"]
    assert alice["aud"] == client.client_id and alice["iss"] == ISSUER
    assert isinstance(alice["auth_time"], int)


def test_carol_is_in_another_group(lab):
    request, result = sign_in(lab, "carol")
    status, tokens = lab.idp.exchange_code(code_from(result["final_url"], request), request.verifier)
    assert status == 200, tokens
    claims = verify(tokens, lab.idp.jwks(), request, lab.idp.client)
    assert claims["groups"] == ["contractors"] and claims["amr"] == ["pwd"]


def test_wrong_password_and_wrong_otp_do_not_sign_in(lab):
    request = AuthRequest(lab.idp.client)
    result = browse(lab, [
        {"action": "goto", "url": request.url},
        {"action": "fill", "selector": "#username", "value": "bob"},
        {"action": "fill", "selector": "#password", "value": "not-bobs-password"},
        {"action": "click", "selector": "#login-submit"},
        {"action": "text", "selector": "#error"},
        {"action": "fill", "selector": "#username", "value": "alice"},
        {"action": "fill", "selector": "#password", "value": TEST_USERS["alice"].password},
        {"action": "click", "selector": "#login-submit"},
        {"action": "fill", "selector": "#otp", "value": "000000"},
        {"action": "click", "selector": "#otp-submit"},
        {"action": "text", "selector": "#error"},
        {"action": "click", "selector": "#cancel"},
        {"action": "wait_for_url", "pattern": REDIRECT_URI + "?**"},
    ])
    assert result["ok"], result
    assert "Wrong username or password" in result["steps"][4]["value"]
    assert "Wrong code" in result["steps"][10]["value"]
    query = parse_qs(urlparse(result["final_url"]).query)
    assert query["error"] == ["access_denied"] and query["state"] == [request.state]
    assert "code" not in query


def test_pkce_and_client_authentication_are_enforced(lab):
    device = lab.devices[0]
    # No code_challenge: refused with a redirect carrying invalid_request.
    url = f"{ISSUER}/auth?" + urlencode({"client_id": lab.idp.client.client_id, "response_type": "code",
                                         "scope": "openid", "redirect_uri": REDIRECT_URI, "state": "s1", "nonce": "n1"})
    out = device.curl(url, "-o", "/dev/null", "-w", "%{redirect_url}\n")
    location = out.stdout.splitlines()[0]
    assert location.startswith(REDIRECT_URI) and "error=invalid_request" in location and "code=" not in location

    request, result = sign_in(lab, "bob")
    code = code_from(result["final_url"], request)
    status, error = lab.idp.exchange_code(code, "a-wrong-verifier-" + "x" * 40)
    assert (status, error["error"]) == (400, "invalid_grant")
    for method in ("client_secret_basic", "client_secret_post"):
        wrong_secret = OidcClient(lab.idp.client.client_id, "not-the-secret", token_endpoint_auth_method=method)
        status, error = lab.idp.exchange_code(code, request.verifier, client=wrong_secret)
        assert (status, error["error"]) == (401, "invalid_client")
    # oidc-provider treats the two client-secret methods as one: a client registered for
    # client_secret_basic may also send the secret in the body (the gateway may use either).
    post = OidcClient(lab.idp.client.client_id, lab.idp.client.client_secret,
                      token_endpoint_auth_method="client_secret_post")
    status, tokens = lab.idp.exchange_code(code, request.verifier, client=post)
    assert status == 200 and tokens["id_token"], tokens


def test_unknown_mode_is_refused(lab):
    with pytest.raises(OidcProviderError, match="unknown token-mangling mode"):
        lab.idp.set_mode("sideways")
    # The control endpoint itself refuses it too (not only the Python check).
    out = lab.inet.run("curl", "-sS", "-X", "PUT", "--data-binary", '{"mode": "sideways"}',
                       "-w", "\n%{http_code}", "http://127.0.0.1:9999/mode")
    assert out.stdout.rstrip().endswith("400") and "unknown mode" in out.stdout
    assert lab.idp.mode() == "none"


def test_each_mangling_mode_produces_its_defect(lab):
    """One browser session signs alice in once, then asks for six more codes (the IdP session
    makes those immediate); each code is exchanged under one mode and checked."""
    from joserfc.errors import BadSignatureError, ExpiredTokenError, InvalidClaimError, InvalidKeyIdError

    client = lab.idp.client
    alice = TEST_USERS["alice"]
    requests = [AuthRequest(client) for _ in MODES]
    steps = sign_in_steps(requests[0], alice.username, alice.password, alice.otp)
    for request in requests[1:]:
        steps += [{"action": "goto", "url": request.url},
                  {"action": "wait_for_url", "pattern": REDIRECT_URI + "?**"}, {"action": "url"}]
    result = browse(lab, steps)
    assert result["ok"], result
    urls = [s["value"] for s in result["steps"] if s["action"] == "url"]
    codes = [code_from(url, request) for url, request in zip(urls, requests, strict=True)]

    jwks_before = lab.idp.jwks()
    keys = lab.idp.keys()
    assert [k["kid"] for k in jwks_before["keys"]] == [keys["primary_kid"]]
    lab.idp.clear_token_log()
    outcome = {}
    for mode, code, request in zip(MODES, codes, requests, strict=True):
        lab.idp.set_mode(mode)
        assert lab.idp.mode() == mode
        status, tokens = lab.idp.exchange_code(code, request.verifier)
        assert status == 200, (mode, tokens)
        outcome[mode] = (tokens, request)

    def check(mode, jwks=jwks_before):
        tokens, request = outcome[mode]
        return verify(tokens, jwks, request, client)

    assert check("none")["acr"] == ACR_MFA
    with pytest.raises(BadSignatureError):
        check("tamper")
    with pytest.raises(InvalidClaimError, match="aud"):
        check("wrong-aud")
    with pytest.raises(InvalidClaimError, match="iss"):
        check("wrong-iss")
    with pytest.raises(ExpiredTokenError):
        check("expired")
    # rotate-keys: a kid the relying party has not seen; after refreshing the JWKS it is valid.
    with pytest.raises(InvalidKeyIdError):
        check("rotate-keys")
    jwks_after = lab.idp.jwks()
    assert {k["kid"] for k in jwks_after["keys"]} == {keys["primary_kid"], keys["rotated_kid"]}
    rotated = check("rotate-keys", jwks_after)
    assert rotated["preferred_username"] == "alice" and rotated["amr"] == check("none")["amr"]
    # replay-nonce: the token carries the nonce of the token issued before it (a replayed sign-in).
    with pytest.raises(InvalidClaimError, match="nonce"):
        check("replay-nonce", jwks_after)
    from joserfc import jwt as _jwt
    from joserfc.jwk import KeySet as _KeySet
    replayed = _jwt.decode(outcome["replay-nonce"][0]["id_token"], _KeySet.import_key_set(jwks_after))
    assert replayed.claims["nonce"] == outcome["rotate-keys"][1].nonce

    # Only the named defect: signatures made with the real key verify for wrong-aud/iss/expired.
    from joserfc import jwt
    from joserfc.jwk import KeySet
    for mode, claim in (("wrong-aud", "aud"), ("wrong-iss", "iss"), ("expired", "exp")):
        token = jwt.decode(outcome[mode][0]["id_token"], KeySet.import_key_set(jwks_before))
        clean = jwt.decode(outcome["none"][0]["id_token"], KeySet.import_key_set(jwks_before))
        assert token.claims[claim] != clean.claims[claim]
        assert token.claims["nonce"] == outcome[mode][1].nonce and token.claims["sub"] == clean.claims["sub"]

    log = lab.idp.token_log()
    assert [e["mode"] for e in log] == list(MODES)
    assert all(e["status"] == 200 and e["grant_type"] == "authorization_code" and e["client_id"] == client.client_id
               for e in log)
    assert [e["id_token_kid"] for e in log] == [keys["primary_kid"]] * 5 + [keys["rotated_kid"], keys["primary_kid"]]
    assert log[2]["id_token_claims"]["aud"] == "some-other-client"


def test_run_browser_rejects_a_bad_script(lab):
    from gateway.lab.browser import BrowserScriptError
    with pytest.raises(BrowserScriptError, match="step 1"):
        browse(lab, [{"action": "goto", "url": "https://example.test/"}, {"action": "hover", "selector": "#x"}])
    with pytest.raises(BrowserScriptError, match="pattern"):
        browse(lab, [{"action": "wait_for_url"}])


def test_bad_client_config_and_missing_node_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(OidcProviderError, match="client_secret_basic or client_secret_post"):
        OidcClient(token_endpoint_auth_method="private_key_jwt")
    with pytest.raises(OidcProviderError, match="at least one redirect URI"):
        OidcClient(redirect_uris=())
    monkeypatch.setenv("PATH", str(tmp_path))          # no node, no npm
    assert oidc_prerequisites() == ["node (>= 18)", "npm"]
    with pytest.raises(OidcProviderError, match="needs node"):
        ensure_installed(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()           # nothing half-made
