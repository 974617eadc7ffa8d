"""The `console:` section of the gateway config (issue #21): who may use the operator console.

    console:
      listen: 10.0.0.1:9443              # the management address; HTTPS only
      public_url: https://console.kanmon.internal:9443   # as browsers reach it (the IdP redirect URI
                                         # is PUBLIC_URL/callback); default https://LISTEN
      server_names: [console.kanmon.internal]            # extra names in its certificate
      roles:                             # IdP groups (the signin.groups_claim claim) per role
        admin: [kanmon-admins]
        helpdesk: [it-helpdesk]
        auditor: [audit]
      idle_timeout: 15m                  # a session unused this long ends
      absolute_timeout: 8h               # and every session ends this long after sign-in
      client_id: kanmon-console          # optional: its own OIDC client (default: signin's)
      client_secret_file: /etc/kanmon/console-client-secret

The IdP, the claims and the MFA rule (``mfa_amr``/``mfa_acr``) come from the ``signin:``
section: the console signs operators in exactly as the portal signs staff in. Pure: the
schema, the settings and the role mapping; no I/O besides reading the secret file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.i18n import Text
from gateway.signin.settings import duration_seconds
from gateway.yamlsource import SourceErrors, read_text_file

ROLE_ADMIN, ROLE_HELPDESK, ROLE_AUDITOR, ROLE_USER = "admin", "helpdesk", "auditor", "user"
OPERATOR_ROLES = (ROLE_ADMIN, ROLE_HELPDESK, ROLE_AUDITOR)

_STR = {"type": "string", "minLength": 1}
_DURATION = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^\s*[0-9]+\s*[smhd]\s*$"}]}
_GROUPS = {"type": "array", "items": _STR}

CONSOLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["listen", "roles"],
    "properties": {
        "listen": _STR,
        "public_url": {"type": "string", "pattern": r"^https://[^\s/?#]+/?$"},
        "server_names": {"type": "array", "items": _STR},
        "roles": {"type": "object", "additionalProperties": False,
                  "properties": {r: _GROUPS for r in OPERATOR_ROLES}},
        "idle_timeout": _DURATION,
        "absolute_timeout": _DURATION,
        "client_id": _STR,
        "client_secret_file": _STR,
        "server_cert_file": _STR,
        "server_key_file": _STR,
    },
}


@dataclass(frozen=True)
class ConsoleSettings:
    host: str
    port: int
    public_url: str
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    server_names: tuple[str, ...] = ()
    idle_timeout_seconds: int = 15 * 60
    absolute_timeout_seconds: int = 8 * 3600
    client_id: str | None = None
    client_secret: str | None = None
    server_cert_file: str | None = None
    server_key_file: str | None = None

    @property
    def redirect_uri(self) -> str:
        return self.public_url + "/callback"

    @property
    def origin(self) -> str:
        return self.public_url


def roles_for(groups: Iterable[str], settings: ConsoleSettings) -> frozenset[str]:
    """The console roles of a signed-in person: every role one of their IdP groups grants,
    and always ``user`` (self-service on their own devices)."""
    have = set(groups)
    return frozenset({role for role, granted in settings.roles.items() if have & set(granted)} | {ROLE_USER})


def _listen(text: str) -> tuple[str, int] | None:
    import ipaddress

    m = re.fullmatch(r"\[?([0-9A-Fa-f:.]+)\]?:(\d+)", text)
    if not m or not 0 < int(m.group(2)) < 65536:
        return None
    try:
        ipaddress.ip_address(m.group(1))
    except ValueError:
        return None
    return m.group(1), int(m.group(2))


def _every_address(host: str) -> bool:
    """0.0.0.0 or :: in any spelling ("0:0::0", "::ffff:0.0.0.0" binds every IPv4 address too)."""
    import ipaddress

    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_unspecified or (mapped is not None and mapped.is_unspecified)


def console_settings(doc, section: dict | None, errors: list, relative_to, *, has_signin: bool,
                     taken_ports: Iterable[tuple[str, int]] = ()) -> ConsoleSettings | None:
    """Settings from a schema-checked section; problems go to ``errors`` with their line."""
    if section is None:
        return None
    where = _listen(section["listen"])
    if where is None:
        errors.append(doc.error(("console", "listen"), Text("アドレス:ポート で書いてください（例 10.0.0.1:9443）",
                                                           "must be ADDRESS:PORT, e.g. 10.0.0.1:9443")))
        return None
    host, port = where
    if _every_address(host):
        # every address would include the gateway's outer one, which faces the devices' networks
        errors.append(doc.error(("console", "listen"), Text("管理用アドレスを書いてください(0.0.0.0 や :: はゲートウェイの外側アドレスも含みます)",
                                                           "give the management address (0.0.0.0 or :: includes the gateway's outer address)")))
    if any(p == port and h in (host, "0.0.0.0", "::") for h, p in taken_ports):
        errors.append(doc.error(("console", "listen"), Text("このポートはほかの待ち受けが使っています",
                                                           "port already used by another listener of the gateway")))
    if not has_signin:
        errors.append(doc.error(("console",), Text("コンソールのサインインには signin: セクション(IdP)が必要です",
                                                   "the console signs operators in through the IdP: a signin: section is required")))
    roles = {r: tuple(section["roles"].get(r, ())) for r in OPERATOR_ROLES}
    if not any(roles.values()):
        errors.append(doc.error(("console", "roles"), Text("どの役割にもグループがありません(admin、helpdesk、auditor のどれかに書いてください)",
                                                          "no role has a group: give admin, helpdesk or auditor at least one IdP group")))
    secret = None
    if "client_secret_file" in section:
        if "client_id" not in section:
            errors.append(doc.error(("console", "client_secret_file"), Text("client_id と一緒に書いてください",
                                                                            "goes together with client_id")))
        path = relative_to(doc.filename, section["client_secret_file"])
        try:
            secret = read_text_file(path, 64 * 1024).strip()
        except SourceErrors as exc:
            reason = exc.errors[0].message.removeprefix("cannot read file: ")
            errors.append(doc.error(("console", "client_secret_file"), Text(f"{path} を読めません: {reason}",
                                                                            f"cannot read {path}: {reason}")))
    elif "client_id" in section:
        errors.append(doc.error(("console", "client_id"), Text("client_secret_file も書いてください",
                                                               "give client_secret_file too")))
    if ("server_cert_file" in section) != ("server_key_file" in section):
        errors.append(doc.error(("console",), Text("server_cert_file と server_key_file は両方書いてください",
                                                   "server_cert_file and server_key_file go together")))
    idle = duration_seconds(section.get("idle_timeout", "15m"))
    absolute = duration_seconds(section.get("absolute_timeout", "8h"))
    if idle > absolute:
        errors.append(doc.error(("console", "idle_timeout"), Text("absolute_timeout より長くできません",
                                                                  "may not be longer than absolute_timeout")))
    shown = f"[{host}]" if ":" in host else host
    public = section.get("public_url", f"https://{shown}:{port}").rstrip("/")

    def file_of(key: str) -> str | None:
        return str(relative_to(doc.filename, section[key])) if key in section else None

    return ConsoleSettings(host=host, port=port, public_url=public, roles=roles,
                           server_names=tuple(section.get("server_names", ())), idle_timeout_seconds=idle,
                           absolute_timeout_seconds=absolute, client_id=section.get("client_id"), client_secret=secret,
                           server_cert_file=file_of("server_cert_file"), server_key_file=file_of("server_key_file"))
