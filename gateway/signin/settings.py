"""The `signin:` section of the gateway config (issue #9).

    signin:
      issuer: https://login.example.lg.jp/realms/staff   # OIDC discovery: ISSUER/.well-known/openid-configuration
      client_id: kanmon-gateway
      client_secret_file: /etc/kanmon/oidc-client-secret  # or client_secret: (discouraged)
      portal_host: signin.kanmon.internal                 # the captive sign-in page (answered by the gateway)
      session_lifetime: 8h
      allow_before_signin: [login.example.lg.jp, mdm.example.lg.jp, .apple.com]
      mfa_amr: [otp, mfa, hwk, swk]
      shared_groups: [shared-pool]
      reauthenticate_shared: true    # on shared devices the IdP asks for the password every time

Durations accept ``s``/``m``/``h``/``d`` suffixes or plain seconds.
"""

from __future__ import annotations

import re
from functools import cached_property
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.i18n import Text
from gateway.hostname import host_in, normalize_host, normalize_host_entry, split_host_entries
from gateway.yamlsource import SourceErrors, read_text_file

_STR = {"type": "string", "minLength": 1}
_DURATION = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^\s*[0-9]+\s*[smhd]\s*$"}]}
_HOSTS = {"type": "array", "items": _STR}

SIGNIN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["issuer", "client_id"],
    "properties": {
        "issuer": {"type": "string", "pattern": r"^https://[^\s/]+"},
        "client_id": _STR,
        "client_secret": _STR,
        "client_secret_file": _STR,
        "ca_file": _STR,                     # CA bundle for the IdP's certificate (default: the system's)
        "portal_host": {"type": "string", "pattern": r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$"},
        "scopes": {"type": "array", "items": _STR, "minItems": 1},
        "user_claim": _STR,
        "groups_claim": _STR,
        "session_lifetime": _DURATION,
        "pending_lifetime": _DURATION,
        "clock_skew": _DURATION,
        "mfa_amr": {"type": "array", "items": _STR},
        "mfa_acr": {"type": "array", "items": _STR},
        "allow_before_signin": _HOSTS,
        "exempt_groups": {"type": "array", "items": _STR},
        "shared_groups": {"type": "array", "items": _STR},
        "require_owner_match": {"type": "boolean"},
        "reauthenticate_shared": {"type": "boolean"},
    },
}

# The keys that say which IdP and how to trust its answer, without the device-only ones (portal,
# destinations before sign-in, groups exempt or shared): what the console's own ``console.oidc:``
# takes (issue #21), so an office can have the console without device sign-in.
IDP_KEYS = ("issuer", "client_id", "client_secret", "client_secret_file", "ca_file", "scopes", "user_claim",
            "groups_claim", "pending_lifetime", "clock_skew", "mfa_amr", "mfa_acr")
IDP_SCHEMA: dict[str, Any] = {**SIGNIN_SCHEMA, "properties": {k: SIGNIN_SCHEMA["properties"][k] for k in IDP_KEYS}}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# RFC 8176 method values that are a second factor (or a phishing-resistant single one).
DEFAULT_MFA_AMR = ("mfa", "otp", "hwk", "swk", "sms", "tel", "fpt", "face", "iris", "retina", "vbm", "sc")


def duration_seconds(value: Any) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+)\s*([smhd])\s*", str(value))
    if m is None:
        raise ValueError(f"not a duration: {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class SignInSettings:
    issuer: str
    client_id: str
    client_secret: str
    portal_host: str = "signin.kanmon.internal"
    ca_file: Path | None = None
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    user_claim: str = "preferred_username"
    groups_claim: str = "groups"
    session_lifetime_seconds: int = 8 * 3600
    pending_lifetime_seconds: int = 600   # time allowed between the redirect to the IdP and the callback
    clock_skew_seconds: int = 60
    mfa_amr: tuple[str, ...] = DEFAULT_MFA_AMR
    mfa_acr: tuple[str, ...] = ()
    allow_before_signin: tuple[str, ...] = ()   # host names; ".example.jp" covers sub-domains
    exempt_groups: tuple[str, ...] = ()         # device groups that never need a user sign-in
    shared_groups: tuple[str, ...] = ()         # pool devices: any user may sign in on them
    require_owner_match: bool = True
    # On a shared device the IdP's own session cookie in the browser outlives the gateway
    # session: without a forced login the next person would be signed in as the previous one.
    reauthenticate_shared: bool = True

    @property
    def redirect_uri(self) -> str:
        return f"https://{self.portal_host}/callback"

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    @property
    def issuer_host(self) -> str:
        return self.issuer.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0].lower()

    def allowed_before_signin(self, host: str | None) -> bool:
        """The IdP itself and the configured destinations (MDM, OS updates) are reachable
        before sign-in; without them no one could ever sign in."""
        if not host:
            return False
        h = normalize_host(host)
        if h is None:
            return False
        if h == self.issuer_host:
            return True
        return host_in(h, *self._before_signin_hosts)

    @cached_property
    def _before_signin_hosts(self) -> tuple[frozenset[str], tuple[str, ...]]:
        return split_host_entries(self.allow_before_signin)


def signin_settings(doc, section: dict | None, errors: list, relative_to,
                    where: tuple[str, ...] = ("signin",)) -> SignInSettings | None:
    """Build the settings from a schema-checked section; problems go to ``errors`` with
    their line (``doc.error(path, message)``). ``where``: the section's path in the file
    (``("console", "oidc")`` for the console's own IdP settings)."""
    if section is None:
        return None
    secret = section.get("client_secret")
    secret_file = section.get("client_secret_file")
    if (secret is None) == (secret_file is None):
        errors.append(doc.error(where, Text("client_secret か client_secret_file のどちらか一方を書いてください",
                                                  "give exactly one of client_secret or client_secret_file")))
        return None
    if secret_file is not None:
        path = relative_to(doc.filename, secret_file)
        try:  # a regular file of at most 64 KiB: /dev/zero or a FIFO is refused, not read (issue #15)
            secret = read_text_file(path, 64 * 1024).strip()
        except SourceErrors as exc:
            first = exc.errors[0]
            reason = first.message.removeprefix("cannot read file: ")
            reason_ja = (first.ja or first.message).removeprefix("ファイルを読めません: ")
            errors.append(doc.error((*where, "client_secret_file"),
                                    Text(f"{path} を読めません: {reason_ja}", f"cannot read {path}: {reason}")))
            return None
        if not secret:
            errors.append(doc.error((*where, "client_secret_file"), Text(f"{path} が空です", f"{path} is empty")))
            return None
    if not (secret.isascii() and secret.isprintable()):
        # Authlib sends it in an HTTP Basic header without the form-encoding RFC 6749 2.3.1
        # asks for, so anything else would fail at every sign-in instead of here
        key = "client_secret" if secret_file is None else "client_secret_file"
        errors.append(doc.error((*where, key), Text("クライアントシークレットは印字可能な ASCII 文字で書いてください",
                                                      "the client secret must be printable ASCII")))
    for key in ("session_lifetime", "pending_lifetime"):
        if key in section and duration_seconds(section[key]) == 0:
            errors.append(doc.error((*where, key), Text("0 より長くしてください", "must be longer than 0")))
    if "openid" not in section.get("scopes", ["openid"]):
        errors.append(doc.error((*where, "scopes"), Text("openid を含めてください(OpenID Connect のサインインです)",
                                                          "must include openid (this is OpenID Connect sign-in)")))
    ca_file = None
    if "ca_file" in section:
        ca_file = relative_to(doc.filename, section["ca_file"])
        if not ca_file.is_file():
            errors.append(doc.error((*where, "ca_file"), Text(f"ファイルがありません: {ca_file}", f"no such file: {ca_file}")))

    def hosts(key: str) -> tuple[str, ...]:
        return tuple(normalize_host_entry(h) for h in section.get(key, []))

    return SignInSettings(
        issuer=section["issuer"].rstrip("/"),
        client_id=section["client_id"],
        client_secret=secret,
        portal_host=section.get("portal_host", "signin.kanmon.internal").lower(),
        ca_file=ca_file,
        scopes=tuple(section.get("scopes", ("openid", "profile", "email"))),
        user_claim=section.get("user_claim", "preferred_username"),
        groups_claim=section.get("groups_claim", "groups"),
        session_lifetime_seconds=duration_seconds(section.get("session_lifetime", "8h")),
        pending_lifetime_seconds=duration_seconds(section.get("pending_lifetime", "10m")),
        clock_skew_seconds=duration_seconds(section.get("clock_skew", 60)),
        mfa_amr=tuple(section.get("mfa_amr", DEFAULT_MFA_AMR)),
        mfa_acr=tuple(section.get("mfa_acr", ())),
        allow_before_signin=hosts("allow_before_signin"),
        exempt_groups=tuple(section.get("exempt_groups", ())),
        shared_groups=tuple(section.get("shared_groups", ())),
        require_owner_match=bool(section.get("require_owner_match", True)),
        reauthenticate_shared=bool(section.get("reauthenticate_shared", True)),
    )
