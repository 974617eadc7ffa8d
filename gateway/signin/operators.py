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
      oidc:                              # the IdP the console signs operators in with
        issuer: https://login.example.lg.jp/realms/staff
        client_id: kanmon-console
        client_secret_file: /etc/kanmon/console-client-secret
        mfa_amr: [otp, mfa, hwk, swk]

``console.oidc:`` takes the IdP keys of the ``signin:`` section (gateway/signin/settings.py
IDP_KEYS: issuer, client, CA, scopes, claims, MFA rule) and is read by the same code. It
gives the console its IdP without ``signin:``, which would also make every device sign in.
Without ``console.oidc:`` the console uses ``signin:`` (the IdP, the claims, the MFA rule),
optionally with its own client (``console.client_id`` / ``client_secret_file``). Pure: the
schema, the settings and the role mapping; no I/O besides reading the secret file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.i18n import Text
from gateway.signin.settings import IDP_SCHEMA, SignInSettings, duration_seconds, signin_settings
from gateway.yamlsource import SourceErrors, read_text_file

ROLE_ADMIN, ROLE_HELPDESK, ROLE_AUDITOR, ROLE_USER = "admin", "helpdesk", "auditor", "user"
OPERATOR_ROLES = (ROLE_ADMIN, ROLE_HELPDESK, ROLE_AUDITOR)

_STR = {"type": "string", "minLength": 1}
# Durations and public_url are checked in console_settings, where the error can say what to write
# (the schema's own message would be "not valid under any of the given schemas" or a raw regex).
_DURATION = {"type": ["integer", "string"]}
_PUBLIC_URL = re.compile(r"https://[^\s/?#]+/?")
_GROUPS = {"type": "array", "items": _STR}

CONSOLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["listen", "roles"],
    "properties": {
        "listen": _STR,
        "public_url": _STR,
        "server_names": {"type": "array", "items": _STR},
        "roles": {"type": "object", "additionalProperties": False,
                  "properties": {r: _GROUPS for r in OPERATOR_ROLES}},
        "idle_timeout": _DURATION,
        "absolute_timeout": _DURATION,
        "client_id": _STR,
        "client_secret_file": _STR,
        "server_cert_file": _STR,
        "server_key_file": _STR,
        "oidc": IDP_SCHEMA,
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
    idp: SignInSettings | None = None      # console.oidc: (None: the signin: section's IdP)

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
                     taken_ports: Iterable[tuple[str, int]] = (), device_networks: Iterable = ()) -> ConsoleSettings | None:
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
    idp = signin_settings(doc, section.get("oidc"), errors, relative_to, where=("console", "oidc"))
    if not has_signin and "oidc" not in section:
        errors.append(doc.error(("console",), Text(
            "コンソールのサインインには IdP の設定が必要です: console.oidc: を書いてください"
            "(signin: セクションを使うこともできますが、signin: はすべての端末にサインインを求めます)",
            "the console signs operators in through the IdP: give console.oidc: (a signin: section "
            "would do too, but signin: also makes every device sign in)")))
    if "oidc" in section and ("client_id" in section or "client_secret_file" in section):
        key = "client_id" if "client_id" in section else "client_secret_file"
        errors.append(doc.error(("console", key), Text("console.oidc: があるときは、client_id などは console.oidc: の中に書いてください",
                                                       "with console.oidc:, give client_id and its secret inside console.oidc:")))
    if any(ipaddress.ip_address(host) in net for net in device_networks):
        # the gateway's own tunnel address: the devices' side (and steering drops tunnel traffic to it)
        errors.append(doc.error(("console", "listen"), Text(
            f"{host} は端末のトンネル側のアドレスです。情報システム担当の PC から届く管理用アドレスを書いてください",
            f"{host} is on the devices' tunnel side: give the management address the IT section's PCs reach")))
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
    idle = _duration(doc, section, "idle_timeout", "15m", errors)
    absolute = _duration(doc, section, "absolute_timeout", "8h", errors)
    if "public_url" in section and not _PUBLIC_URL.fullmatch(section["public_url"]):
        errors.append(doc.error(("console", "public_url"), Text(
            "ブラウザで開く URL を https://名前:ポート の形で書いてください(パスなし。例 https://console.kanmon.internal:9443)",
            "give the URL browsers open as https://NAME:PORT, without a path "
            "(e.g. https://console.kanmon.internal:9443)")))
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
                           server_cert_file=file_of("server_cert_file"), server_key_file=file_of("server_key_file"),
                           idp=idp)


def _duration(doc, section: dict, key: str, default: str, errors: list) -> int:
    value = section.get(key, default)
    try:
        seconds = duration_seconds(value)
    except ValueError:
        seconds = 0
    if isinstance(value, bool) or seconds < 1:
        errors.append(doc.error(("console", key), Text(
            f"{value!r} は時間として読めません。数字と単位(s 秒、m 分、h 時間、d 日)で書いてください(例 15m、8h)",
            f"{value!r} is not a duration: write a number and a unit, s, m, h or d (e.g. 15m, 8h)")))
        return duration_seconds(default)
    return seconds
