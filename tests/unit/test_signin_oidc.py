"""The gateway as an OIDC relying party against a real local identity provider.

The fake IdP below is an HTTP server on 127.0.0.1 (plain HTTP; Authlib is told to allow it
with AUTHLIB_INSECURE_TRANSPORT) serving discovery, a JWKS and a token endpoint. It signs ID
tokens with RSA keys it generates (joserfc), and each test decides what the next token looks
like: right or wrong audience, issuer, nonce, expiry, key, algorithm. ``OidcRelyingParty``
talks to it over real sockets exactly as the gateway does (discovery, code exchange with PKCE
and client authentication, JWKS fetch and refetch), and every refusal must carry its stable
reason code.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.signin.oidc import OidcRelyingParty, SignInRefused
from gateway.signin.settings import SignInSettings

CLIENT_ID = "kanmon-gateway"
CLIENT_SECRET = "s3cret-kanmon-0123456789"
SKEW = 60


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.fixture(scope="module")
def keys() -> dict[str, RSAKey]:
    """Three RSA keys: 'a' published from the start, 'b' published only after a rotation,
    'rogue' never published."""
    return {kid: RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"}, private=True)
            for kid in ("a", "b", "rogue")}


class FakeIdP:
    """A minimal OpenID provider: discovery, JWKS, token endpoint. What it answers is set by
    the test through the attributes; what it was asked is recorded."""

    def __init__(self, keys: dict[str, RSAKey]):
        self.keys = keys
        self.published = ["a"]                       # kids in the JWKS
        self.discovery_issuer: str | None = None     # None: its own URL
        self.alg_values = ["RS256"]
        self.id_token: Callable[[], str | None] = lambda: None
        self.token_status = 200
        self.token_error: dict[str, str] | None = None
        self.token_requests: list[dict[str, Any]] = []
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.drop_from_discovery: set[str] = set()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                return

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    idp.discovery_fetches += 1
                    self._json(200, idp.discovery())
                elif self.path == "/jwks":
                    idp.jwks_fetches += 1
                    self._json(200, {"keys": [idp.keys[k].as_dict(private=False) for k in idp.published]})
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self):
                if self.path != "/token":
                    self._json(404, {"error": "not_found"})
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                idp.token_requests.append({"form": {k: v[0] for k, v in parse_qs(body).items()},
                                           "authorization": self.headers.get("Authorization")})
                if idp.token_error is not None:
                    self._json(idp.token_status, idp.token_error)
                    return
                answer = {"access_token": "at-" + b64url(b"x" * 12), "token_type": "Bearer", "expires_in": 300}
                token = idp.id_token()
                if token is not None:
                    answer["id_token"] = token
                self._json(200, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def discovery(self) -> dict:
        doc = {"issuer": self.discovery_issuer or self.url,
                "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token",
                "jwks_uri": self.url + "/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": self.alg_values,
                "code_challenge_methods_supported": ["S256"]}
        return {k: v for k, v in doc.items() if k not in self.drop_from_discovery}

    def claims(self, nonce: str, /, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.url, "sub": "u-0001", "aud": CLIENT_ID, "exp": now + 300, "iat": now,
                  "auth_time": now - 30, "nonce": nonce, "preferred_username": "tanaka",
                  "email": "tanaka@example.lg.jp", "amr": ["pwd", "otp"], "groups": ["staff"]}
        for k, v in changes.items():
            if v is None:
                claims.pop(k, None)
            else:
                claims[k] = v
        return claims

    def sign(self, claims: dict[str, Any], kid: str = "a", header_kid: str | None = None) -> str:
        return jwt.encode({"alg": "RS256", "kid": header_kid or kid}, claims, self.keys[kid])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp(keys, monkeypatch):
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    server = FakeIdP(keys)
    yield server
    server.stop()


def settings_for(issuer: str, **changes: Any) -> SignInSettings:
    return SignInSettings(issuer=issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                          portal_host="signin.kanmon.internal", clock_skew_seconds=SKEW, **changes)


@pytest.fixture
def rp(idp) -> OidcRelyingParty:
    return OidcRelyingParty(settings_for(idp.url), timeout=5)


def sign_in(idp: FakeIdP, rp: OidcRelyingParty, make_token: Callable[[str], str | None], code: str = "code-1"):
    """One whole sign-in: begin, the IdP issues the token ``make_token(nonce)``, complete."""
    request = rp.begin()
    idp.id_token = lambda: make_token(request.nonce)
    return rp.complete(code, nonce=request.nonce, code_verifier=request.code_verifier)


def refusal(idp, rp, make_token) -> SignInRefused:
    with pytest.raises(SignInRefused) as exc:
        sign_in(idp, rp, make_token)
    return exc.value


# -- step 1 --------------------------------------------------------------------------------------

def test_begin_sends_the_browser_with_pkce_state_nonce_and_redirect(idp, rp):
    request = rp.begin()
    url = urlsplit(request.url)
    assert f"{url.scheme}://{url.netloc}{url.path}" == idp.url + "/authorize"
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert q["response_type"] == "code"
    assert q["client_id"] == CLIENT_ID
    assert q["redirect_uri"] == "https://signin.kanmon.internal/callback"
    assert set(q["scope"].split()) == {"openid", "profile", "email"}
    assert q["state"] == request.state and len(request.state) >= 20
    assert q["nonce"] == request.nonce and len(request.nonce) >= 16
    assert q["code_challenge_method"] == "S256"
    assert q["code_challenge"] == b64url(hashlib.sha256(request.code_verifier.encode()).digest())
    assert 43 <= len(request.code_verifier) <= 128
    # every sign-in gets its own secrets; discovery is fetched once and cached
    again = rp.begin()
    assert len({request.state, again.state}) == 2 and again.nonce != request.nonce
    assert again.code_verifier != request.code_verifier
    assert idp.discovery_fetches == 1


def test_forced_login_asks_the_idp_for_a_new_authentication(idp, rp):
    plain = {k: v[0] for k, v in parse_qs(urlsplit(rp.begin().url).query).items()}
    assert "prompt" not in plain and "max_age" not in plain          # personal devices keep the IdP's SSO
    forced = {k: v[0] for k, v in parse_qs(urlsplit(rp.begin(force_login=True).url).query).items()}
    assert forced["prompt"] == "login" and forced["max_age"] == "0" and forced["code_challenge_method"] == "S256"


# -- step 2: a good token ------------------------------------------------------------------------

def test_complete_returns_claims_and_auth_time_and_sends_verifier_and_client_auth(idp, rp):
    request = rp.begin()
    auth_time = int(time.time()) - 45
    idp.id_token = lambda: idp.sign(idp.claims(request.nonce, auth_time=auth_time))
    claims, when = rp.complete("the-code", nonce=request.nonce, code_verifier=request.code_verifier)
    assert claims["sub"] == "u-0001" and claims["preferred_username"] == "tanaka"
    assert claims["amr"] == ["pwd", "otp"] and claims["groups"] == ["staff"]
    assert when == datetime.fromtimestamp(auth_time, UTC)

    (sent,) = idp.token_requests
    form = sent["form"]
    assert form["grant_type"] == "authorization_code"
    assert form["code"] == "the-code"
    assert form["redirect_uri"] == "https://signin.kanmon.internal/callback"
    assert form["code_verifier"] == request.code_verifier
    # the challenge sent in step 1 is the S256 of the verifier sent now
    challenge = parse_qs(urlsplit(request.url).query)["code_challenge"][0]
    assert b64url(hashlib.sha256(form["code_verifier"].encode()).digest()) == challenge
    # client_secret_basic: the secret goes in the Authorization header, not the form
    assert "client_secret" not in form
    scheme, _, blob = sent["authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(blob).decode().partition(":")
    assert (unquote_plus(user), unquote_plus(password)) == (CLIENT_ID, CLIENT_SECRET)


@pytest.mark.parametrize("client_id, secret", [
    ("kanmon-gw", "Zm9v+YmFy/YmF6=="),          # base64-made: "+" must not reach the IdP as a space
    ("kanmon:gw", "100% s:e:c:r:e:t"),           # ":" and "%" in either part, a space
    ("kanmon-gw", "秘密のパスワード"),              # outside Latin-1: Authlib alone cannot send it
])
def test_basic_client_credentials_are_form_encoded_before_base64(idp, client_id, secret):
    # RFC 6749 2.3.1: an IdP form-decodes both parts after base64; ours must survive it.
    rp = OidcRelyingParty(dataclasses.replace(settings_for(idp.url), client_id=client_id, client_secret=secret), timeout=5)
    request = rp.begin()
    idp.id_token = lambda: idp.sign(idp.claims(request.nonce, aud=client_id))
    rp.complete("the-code", nonce=request.nonce, code_verifier=request.code_verifier)
    scheme, _, blob = idp.token_requests[-1]["authorization"].partition(" ")
    raw = base64.b64decode(blob).decode("ascii")          # nothing but ASCII on the wire
    user, colon, password = raw.partition(":")
    assert scheme == "Basic" and colon and ":" not in password
    assert (unquote_plus(user), unquote_plus(password)) == (client_id, secret)


def test_token_without_auth_time_gives_none(idp, rp):
    claims, when = sign_in(idp, rp, lambda n: idp.sign(idp.claims(n, auth_time=None)))
    assert when is None and "auth_time" not in claims


# -- refusals --------------------------------------------------------------------------------------

def test_tampered_payload_fails_the_signature(idp, rp):
    def tampered(nonce: str) -> str:
        header, payload, signature = idp.sign(idp.claims(nonce)).split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["preferred_username"] = "admin"
        return ".".join([header, b64url(json.dumps(claims).encode()), signature])
    assert refusal(idp, rp, tampered).reason == "token-signature-invalid"


def test_token_signed_by_another_key_under_a_published_kid_fails_the_signature(idp, rp):
    exc = refusal(idp, rp, lambda n: idp.sign(idp.claims(n), kid="rogue", header_kid="a"))
    assert exc.reason == "token-signature-invalid"


def test_wrong_audience_is_refused(idp, rp):
    assert refusal(idp, rp, lambda n: idp.sign(idp.claims(n, aud="another-client"))).reason == "token-aud-invalid"


def test_audience_list_without_us_is_refused_and_with_us_accepted(idp, rp):
    exc = refusal(idp, rp, lambda n: idp.sign(idp.claims(n, aud=["x", "y"])))
    assert exc.reason == "token-aud-invalid"
    claims, _ = sign_in(idp, rp, lambda n: idp.sign(idp.claims(n, aud=[CLIENT_ID], azp=CLIENT_ID)))
    assert claims["aud"] == [CLIENT_ID]


def test_wrong_issuer_is_refused(idp, rp):
    exc = refusal(idp, rp, lambda n: idp.sign(idp.claims(n, iss="https://evil.example")))
    assert exc.reason == "token-iss-invalid"


def test_expired_beyond_the_leeway_is_refused_but_inside_it_accepted(idp, rp):
    exc = refusal(idp, rp, lambda n: idp.sign(idp.claims(n, exp=int(time.time()) - SKEW - 20)))
    assert exc.reason == "token-expired"
    claims, _ = sign_in(idp, rp, lambda n: idp.sign(idp.claims(n, exp=int(time.time()) - SKEW + 20)))
    assert claims["exp"] < time.time()  # expired by the clock, accepted within the skew


def test_issued_in_the_future_beyond_the_leeway_is_refused(idp, rp):
    exc = refusal(idp, rp, lambda n: idp.sign(idp.claims(n, iat=int(time.time()) + SKEW + 120)))
    assert exc.reason == "token-iat-invalid"


def test_wrong_or_missing_nonce_is_refused(idp, rp):
    assert refusal(idp, rp, lambda n: idp.sign(idp.claims("someone-elses-nonce"))).reason == "token-nonce-invalid"
    assert refusal(idp, rp, lambda n: idp.sign(idp.claims(n, nonce=None))).reason == "token-nonce-missing"


def test_missing_subject_is_refused(idp, rp):
    assert refusal(idp, rp, lambda n: idp.sign(idp.claims(n, sub=None))).reason == "token-sub-missing"


def test_key_rotation_refetches_the_jwks_once_and_accepts_the_new_key(idp, rp):
    sign_in(idp, rp, lambda n: idp.sign(idp.claims(n), kid="a"))
    assert idp.jwks_fetches == 1
    sign_in(idp, rp, lambda n: idp.sign(idp.claims(n), kid="a"))
    assert idp.jwks_fetches == 1          # cached while the kid is known
    idp.published = ["a", "b"]            # the IdP rotates
    claims, _ = sign_in(idp, rp, lambda n: idp.sign(idp.claims(n, sub="u-rotated"), kid="b"))
    assert claims["sub"] == "u-rotated"
    assert idp.jwks_fetches == 2          # one refetch, not one per token
    sign_in(idp, rp, lambda n: idp.sign(idp.claims(n), kid="b"))
    assert idp.jwks_fetches == 2


def test_key_never_published_is_refused_after_one_refetch(idp, rp):
    exc = refusal(idp, rp, lambda n: idp.sign(idp.claims(n), kid="rogue"))
    assert exc.reason == "token-key-unknown"
    assert idp.jwks_fetches == 2


def unsigned(claims: dict, alg: str = "none") -> str:
    return ".".join([b64url(json.dumps({"alg": alg, "kid": "a"}).encode()),
                     b64url(json.dumps(claims).encode()), ""])


def test_alg_none_is_refused(idp, rp):
    assert refusal(idp, rp, lambda n: unsigned(idp.claims(n))).reason == "token-alg-refused"


def test_alg_none_is_refused_even_when_the_idp_lists_it(idp, rp):
    # OIDC Discovery allows an IdP to list "none" for the code flow; the gateway never
    # accepts an unsigned ID token all the same.
    idp.alg_values = ["RS256", "none"]
    assert refusal(idp, rp, lambda n: unsigned(idp.claims(n))).reason == "token-alg-refused"
    claims, _ = sign_in(idp, rp, lambda n: idp.sign(idp.claims(n)))  # RS256 still works
    assert claims["sub"] == "u-0001"


def test_hmac_token_is_refused(idp, rp):
    # an HS256 token "signed" with a value an attacker knows must not pass as an IdP signature
    idp.alg_values = ["RS256", "HS256"]
    exc = refusal(idp, rp, lambda n: unsigned(idp.claims(n), alg="HS256")[:-1] + "." + b64url(b"forged"))
    assert exc.reason == "token-alg-refused"


def test_garbage_id_token_is_refused(idp, rp):
    assert refusal(idp, rp, lambda n: "not-a-jwt").reason == "token-signature-invalid"


def test_token_response_without_id_token_is_refused(idp, rp):
    assert refusal(idp, rp, lambda n: None).reason == "token-id-token-missing"


def test_token_endpoint_oauth_error_is_refused_with_its_code(idp, rp):
    idp.token_status = 400
    idp.token_error = {"error": "invalid_grant", "error_description": "code already used"}
    exc = refusal(idp, rp, lambda n: idp.sign(idp.claims(n)))
    assert exc.reason == "token-request-refused"
    assert "invalid_grant" in exc.detail and "code already used" in exc.detail


def test_token_endpoint_server_error_counts_as_unreachable(idp, rp):
    idp.token_status = 503
    idp.token_error = {"message": "maintenance"}
    assert refusal(idp, rp, lambda n: idp.sign(idp.claims(n))).reason == "idp-unreachable"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_idp_down_at_discovery(monkeypatch):
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    rp = OidcRelyingParty(settings_for(f"http://127.0.0.1:{free_port()}"), timeout=2)
    with pytest.raises(SignInRefused) as exc:
        rp.begin()
    assert exc.value.reason == "idp-unreachable"
    assert "discovery" in exc.value.detail


def test_idp_down_after_discovery(idp, rp):
    request = rp.begin()
    idp.stop()
    with pytest.raises(SignInRefused) as exc:
        rp.complete("c", nonce=request.nonce, code_verifier=request.code_verifier)
    assert exc.value.reason == "idp-unreachable"


def test_discovery_is_retried_after_the_idp_comes_back(keys, monkeypatch):
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    idp = FakeIdP(keys)
    try:
        idp.discovery_issuer = "http://elsewhere.example"
        rp = OidcRelyingParty(settings_for(idp.url), timeout=5)
        with pytest.raises(SignInRefused) as exc:
            rp.begin()
        assert exc.value.reason == "idp-issuer-mismatch"
        assert "elsewhere.example" in exc.value.detail
        # the IdP's operator fixes the discovery document: no gateway restart needed
        idp.discovery_issuer = None
        claims, _ = sign_in(idp, rp, lambda n: idp.sign(idp.claims(n)))
        assert claims["iss"] == idp.url
        assert idp.discovery_fetches == 2
    finally:
        idp.stop()


def test_discovery_naming_another_issuer_is_refused(idp):
    idp.discovery_issuer = "https://login.other.example/realms/x"
    rp = OidcRelyingParty(settings_for(idp.url), timeout=5)
    for call in (rp.begin, lambda: rp.complete("c", nonce="n", code_verifier="v" * 43)):
        with pytest.raises(SignInRefused) as exc:
            call()
        assert exc.value.reason == "idp-issuer-mismatch"
    assert idp.token_requests == []  # no code was sent to a token endpoint of the wrong issuer


def test_trailing_slash_in_issuer_is_tolerated(idp):
    # settings_from_config strips the trailing slash; discovery may or may not carry one
    idp.discovery_issuer = idp.url + "/"
    rp = OidcRelyingParty(settings_for(idp.url), timeout=5)
    assert rp.begin().url.startswith(idp.url + "/authorize?")


def test_discovery_without_jwks_uri_is_a_named_refusal(idp, rp):
    idp.drop_from_discovery = {"jwks_uri"}
    assert refusal(idp, rp, lambda n: idp.sign(idp.claims(n))).reason == "idp-metadata-invalid"
