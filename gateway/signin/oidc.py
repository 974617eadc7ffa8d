"""The gateway as an OpenID Connect relying party (authorization code flow with PKCE).

Everything that is OIDC is Authlib's (https://docs.authlib.org): issuer discovery, the
authorization URL with state, nonce and an S256 code challenge, the code exchange, and the
ID-token checks (signature against the IdP's JWKS, refetched once when a token names a key
it has not seen -- key rotation --, issuer, audience, expiry and issued-at with a clock-skew
leeway, nonce, at_hash). This module only wires Authlib's framework-neutral client to our
settings and turns its exceptions into short, stable refusal reasons for the auth log.

Blocking I/O (requests): the addon calls ``complete`` in a worker thread.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus

import requests
from authlib.integrations.base_client import BaseApp, OAuth2Mixin, OAuthError, OpenIDMixin
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc6749.errors import OAuth2Error
from joserfc import errors as jose_errors

from gateway.signin.settings import SignInSettings

log = logging.getLogger("kanmon.signin.oidc")

# Signature algorithms an ID token may use: public-key ones only. Authlib takes the list from
# the IdP's discovery document, and OIDC Discovery lets an IdP list "none" for the code flow
# (and HS* keyed with the client secret); the gateway accepts neither, so whatever the IdP
# lists is narrowed to these (RS256 when nothing is left: the algorithm OIDC makes mandatory).
SIGNATURE_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                  "ES256", "ES384", "ES512", "ES256K", "EdDSA", "Ed25519", "Ed448"})


class SignInRefused(Exception):
    """A sign-in the gateway will not accept. ``reason`` is a stable code for logs, alerts
    and tests (e.g. ``token-aud-invalid``); ``detail`` is for the operator."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AuthorizationRequest:
    url: str               # where to send the browser (the IdP's authorization endpoint)
    state: str
    nonce: str
    code_verifier: str


class _NoFramework:
    """Authlib's app classes report refreshed tokens to a web framework; the gateway keeps
    no OAuth tokens after sign-in, so there is nothing to store."""

    def update_token(self, *args, **kwargs) -> None:
        return None


def _client_secret_basic(client, method, uri, headers, body):
    """HTTP Basic client authentication as RFC 6749 section 2.3.1 has it: client id and
    secret form-urlencoded first, then base64. Authlib (1.9) sends them raw, so a secret with
    "+", "%" or ":" (base64-made secrets often have "+") is read as another secret by an IdP
    that decodes (oidc-provider, Keycloak), and one outside Latin-1 cannot be sent at all."""
    text = f"{quote_plus(client.client_id, safe='')}:{quote_plus(client.client_secret, safe='')}"
    headers["Authorization"] = "Basic " + base64.b64encode(text.encode("ascii")).decode("ascii")
    return uri, headers, body


class _Session(OAuth2Session):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_client_auth_method(("client_secret_basic", _client_secret_basic))


class _OidcApp(OAuth2Mixin, OpenIDMixin, BaseApp):
    client_cls = _Session


class OidcRelyingParty:
    def __init__(self, settings: SignInSettings, *, timeout: float = 10.0):
        self.settings = settings
        verify: Any = str(settings.ca_file) if settings.ca_file else True
        self._app = _OidcApp(
            _NoFramework(), name="kanmon", client_id=settings.client_id, client_secret=settings.client_secret,
            server_metadata_url=settings.discovery_url,
            client_kwargs={"scope": " ".join(settings.scopes), "code_challenge_method": "S256",
                           "default_timeout": timeout, "verify": verify, "trust_env": False,
                           "token_endpoint_auth_method": "client_secret_basic"})

    # -- discovery ------------------------------------------------------------------------
    def metadata(self) -> Mapping[str, Any]:
        """The IdP's discovery document (fetched once, then cached). The issuer it names
        must be the configured one (OIDC Discovery 1.0, section 4.3)."""
        try:
            md = self._app.load_server_metadata()
        except (requests.RequestException, ValueError, ssl.SSLError) as exc:
            self._app.server_metadata.pop("_loaded_at", None)
            raise SignInRefused("idp-unreachable", f"discovery at {self.settings.discovery_url} failed: {exc}") from None
        named = md.get("issuer")
        if not isinstance(named, str) or named.rstrip("/") != self.settings.issuer:
            # forget the document: once the IdP is fixed, the next sign-in fetches it again
            self._app.server_metadata.clear()
            raise SignInRefused("idp-issuer-mismatch", f"discovery names issuer {named!r}")
        listed = md.get("id_token_signing_alg_values_supported")
        allowed = [a for a in listed if a in SIGNATURE_ALGORITHMS] if isinstance(listed, list) else []
        md["id_token_signing_alg_values_supported"] = allowed or ["RS256"]
        return md

    # -- step 1: send the browser to the IdP ------------------------------------------------
    def begin(self, *, force_login: bool = False) -> AuthorizationRequest:
        """``force_login``: the IdP must authenticate the user again even if its own session
        is still open (``prompt=login`` and ``max_age=0``, OIDC Core 3.1.2.1), as on a shared
        device, where the previous user's IdP session must not sign the next one in. The
        caller checks the returned ``auth_time`` (``prompt`` alone cannot be verified)."""
        self.metadata()
        extra = {"prompt": "login", "max_age": "0"} if force_login else {}
        rv = self._app.create_authorization_url(redirect_uri=self.settings.redirect_uri, **extra)
        return AuthorizationRequest(url=rv["url"], state=rv["state"], nonce=rv["nonce"],
                                    code_verifier=rv["code_verifier"])

    # -- step 2: the callback ----------------------------------------------------------------
    def complete(self, code: str, *, nonce: str, code_verifier: str) -> tuple[dict[str, Any], datetime | None]:
        """Exchange the code and validate the ID token; returns its claims and auth_time.
        Raises ``SignInRefused`` with the reason for any failure."""
        self.metadata()
        try:
            token = self._app.fetch_access_token(redirect_uri=self.settings.redirect_uri, code=code,
                                                 code_verifier=code_verifier)
        except (OAuthError, OAuth2Error) as exc:
            # the requests client raises OAuthError for an {"error": ...} answer, not OAuth2Error
            raise SignInRefused("token-request-refused", f"{exc.error}: {exc.description or ''}".strip()) from None
        except (requests.RequestException, ValueError, ssl.SSLError) as exc:
            raise SignInRefused("idp-unreachable", f"token request failed: {exc}") from None
        if "id_token" not in token:
            raise SignInRefused("token-id-token-missing", "the token response has no id_token")
        claims_options = {
            "iss": {"essential": True, "value": self.settings.issuer},
            "aud": {"essential": True, "value": self.settings.client_id},
            "sub": {"essential": True},
            "exp": {"essential": True},
            "iat": {"essential": True},
            "nonce": {"essential": True, "value": nonce},
        }
        try:
            claims = self._app.parse_id_token(token, nonce=nonce, claims_options=claims_options,
                                              leeway=self.settings.clock_skew_seconds)
        except jose_errors.ExpiredTokenError:
            raise SignInRefused("token-expired", "the ID token has expired") from None
        except jose_errors.ClaimError as exc:
            kind = "missing" if isinstance(exc, jose_errors.MissingClaimError) else "invalid"
            raise SignInRefused(f"token-{exc.claim}-{kind}", str(exc)) from None
        except jose_errors.InvalidKeyIdError:
            raise SignInRefused("token-key-unknown", "no key of the IdP's JWKS (even refetched) signed it") from None
        except (jose_errors.MissingAlgorithmError, jose_errors.UnsupportedAlgorithmError) as exc:
            # "none", HS256 and anything not a public-key signature (SIGNATURE_ALGORITHMS)
            raise SignInRefused("token-alg-refused", f"{type(exc).__name__}: {exc}") from None
        except (jose_errors.BadSignatureError, jose_errors.DecodeError, jose_errors.InvalidPayloadError) as exc:
            raise SignInRefused("token-signature-invalid", f"{type(exc).__name__}: {exc}") from None
        except jose_errors.JoseError as exc:
            raise SignInRefused("token-invalid", f"{type(exc).__name__}: {exc}") from None
        except (requests.RequestException, ssl.SSLError) as exc:
            raise SignInRefused("idp-unreachable", f"JWKS fetch failed: {exc}") from None
        except RuntimeError as exc:  # Authlib: the discovery document has no jwks_uri
            raise SignInRefused("idp-metadata-invalid", str(exc)) from None
        if claims is None:
            raise SignInRefused("token-id-token-missing", "no id_token")
        auth_time = claims.get("auth_time")
        when = datetime.fromtimestamp(auth_time, UTC) if isinstance(auth_time, (int, float)) else None
        return dict(claims), when
