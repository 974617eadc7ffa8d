"""Gateway configuration: YAML -> schema-checked -> frozen `GatewayConfig`.

Every problem is reported as ``file:line: key: message`` and nothing on the host is
touched before the whole file is valid (`kanmon run` exits 2).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.devices.shards import MAX_PEERS_PER_INTERFACE, ShardLayout, layout_problems
from gateway.hostname import host_in, normalize_host_entry, split_host_entries
from gateway.i18n import Text
from gateway.posture import VersionError, normalize_platform, parse_version
from gateway.registry.schema import REGISTRY_SCHEMA
from gateway.limits import LIMITS_SCHEMA, LimitSettings, limit_settings
from gateway.reports.alerting import ALERTS_SCHEMA
from gateway.autoquarantine.triggers import AUTO_QUARANTINE_SCHEMA, AutoQuarantineSettings, auto_quarantine_settings
from gateway.scan.decide import SCAN_SCHEMA, ScanSettings, clamd_address_error, scan_settings
from gateway.verdict import Action
from gateway.signin.settings import SIGNIN_SCHEMA, SignInSettings, signin_settings
from gateway.signin.operators import CONSOLE_SCHEMA, ConsoleSettings, console_settings
from gateway.pages.organization import ORGANIZATION_SCHEMA, Organization, organization_settings
from gateway.yamlsource import (LoadedYaml, SourceError, SourceErrors, duplicate_folded_keys, load_yaml_file, load_yaml_text,
                                schema_errors)

_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_STR = {"type": "string", "minLength": 1}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["tunnel", "uplink", "state_dir"],
    "properties": {
        "node": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,30}$"}},
        },
        "state_dir": _STR,
        "tunnel": {
            "type": "object",
            "additionalProperties": False,
            "required": ["interface", "listen_port", "ipv4_prefix"],
            "properties": {
                "interface": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,15}$"},
                "listen_port": _PORT,
                "ipv4_prefix": _STR,
                "ipv6_prefix": _STR,
                "endpoint": _STR,
                "mtu": {"type": "integer", "minimum": 1280, "maximum": 9000},
                # issue #19: PersistentKeepalive in the devices' configs (seconds; omit: off)
                "persistent_keepalive": {"type": "integer", "minimum": 1, "maximum": 65535},
                "implementation": {"enum": ["auto", "kernel", "wireguard-go"]},
                "private_key_file": _STR,
                # issue #22: addresses per WireGuard interface (gateway/devices/shards.py); only
                # tests lower it, to get several interfaces from a small pool
                "peers_per_interface": {"type": "integer"},
            },
        },
        "uplink": {
            "type": "object",
            "additionalProperties": False,
            "required": ["interface"],
            "properties": {"interface": {"type": "string", "pattern": "^[A-Za-z0-9_.@-]{1,15}$"}},
        },
        "proxy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "transparent_port": _PORT,
                "dns_port": _PORT,
                "upstream_dns": {"type": "array", "items": _STR},
                "connection_strategy": {"enum": ["lazy", "eager"]},
                # issue #22: the interception CA's key type when it is created; leaves kept
                "ca_key": {"enum": ["ecdsa-p256", "rsa-2048"]},
                "leaf_cert_cache": {"type": "integer", "minimum": 1, "maximum": 1000000},
                "upstream_ca_bundle": _STR,
                "tcp_timeout": {"type": "integer", "minimum": 10},
                "no_sni": {"enum": ["block", "allow"]},
                "sinkhole_ipv4": _STR,
                "sinkhole_ipv6": _STR,
                # issue #14: DNS over TLS (port 853) is refused except to these resolvers
                "dot_resolvers": {"type": "array", "items": _STR},
                # issue #22: inspection processes ("auto": one per core; gateway/runtime/workers.py)
                "workers": {},
            },
        },
        "management": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"listen": _STR},
        },
        "enrollment": {
            # issue #3: mTLS enrollment endpoint (gateway/enroll); absent = not served
            "type": "object",
            "additionalProperties": False,
            "required": ["listen"],
            "properties": {
                "listen": _STR,
                "server_cert_file": _STR,
                "server_key_file": _STR,
                "server_names": {"type": "array", "items": _STR},
                "rate_per_minute": {"type": "number", "exclusiveMinimum": 0},
                "burst": {"type": "integer", "minimum": 1},
                # issue #15: bounds under load (defaults in Config below)
                "handshake_timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
                "request_timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 120},
                "max_connections": {"type": "integer", "minimum": 1, "maximum": 4096},
                "max_connections_per_source": {"type": "integer", "minimum": 1},
            },
        },
        "posture": {
            # issue #3: device posture (gateway/posture.py)
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "min_os": {"type": "object", "additionalProperties": {"type": ["string", "number"]}},
                "quarantine_jailbroken": {"type": "boolean"},
            },
        },
        "helpdesk": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"name_ja": _STR, "name_en": _STR, "contact": _STR},
        },
        "organization": ORGANIZATION_SCHEMA,   # issue #19: name, logo, helpdesk on the staff pages
        "rules": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "default_action": {"enum": ["allow", "block"]},
                "list": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["id", "action", "hosts"],
                        "properties": {
                            "id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]+$"},
                            "action": {"enum": ["allow", "block"]},
                            "hosts": {"type": "array", "minItems": 1, "items": _STR},
                            "reason": _STR,
                        },
                    },
                },
            },
        },
        "policy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"path": _STR},
        },
        "quarantine": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"allow_hosts": {"type": "array", "items": _STR}},
        },
        "alerts": ALERTS_SCHEMA,
        "scan": SCAN_SCHEMA,                        # issue #18: downloads scanned by clamd (gateway/scan)
        "auto_quarantine": AUTO_QUARANTINE_SCHEMA,  # issue #18: triggers (gateway/autoquarantine)
        "registry": REGISTRY_SCHEMA,
        "logs": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                # IPA SME 技術的対策 3.8: keep gateway logs three years.
                "retention_days": {"type": "integer", "minimum": 1},
                "on_write_error": {"enum": ["block", "continue"]},
                "fsync": {"enum": ["rotate", "always", "interval"]},
                # Firewall log (gateway/net/firewalllog.py): NFLOG group of the table's drop logs,
                # and seconds per aggregated record.
                "firewall_group": {"type": "integer", "minimum": 1, "maximum": 65535},
                "firewall_interval": {"type": "number", "minimum": 1, "maximum": 3600},
                "syslog": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["host"],
                    "properties": {"host": _STR, "port": _PORT, "transport": {"enum": ["udp", "tcp"]}},
                },
            },
        },
        "mail": {
            # issue #5: mail filtering at the edge (addons/mail.py)
            "type": "object",
            "additionalProperties": False,
            "required": ["organization_hosts"],
            "properties": {
                "policy": _STR,
                "organization_hosts": {"type": "array", "items": _STR},
                "clamd_socket": _STR,
                "idle_timeout_seconds": {"type": "integer", "minimum": 60},
                "max_message_bytes": {"type": "integer", "minimum": 1024},
                "starttls": {"enum": ["cut", "pass"]},
                "reject_freemail_recipients": {"type": "boolean"},
                "allowed_recipient_domains": {"type": "array", "items": _STR},
            },
        },
        "signin": SIGNIN_SCHEMA,   # issue #9: OIDC user sign-in (gateway/signin/settings.py)
        "console": CONSOLE_SCHEMA,  # issue #21: the operator console (gateway/signin/operators.py)
        "limits": LIMITS_SCHEMA,   # issue #14: per-device resource limits (gateway/limits.py)
        "addons": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "extra": {"type": "array", "items": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"}},
            },
        },
    },
}


@dataclass(frozen=True)
class HostRule:
    """Placeholder allow/block rule on host names (exact, or suffix when written `.example`).
    The policy engine replaces these; they stay as the gateway's built-in minimal filter."""

    rule_id: str
    action: Action
    exact: frozenset[str]
    suffixes: tuple[str, ...]
    reason: str

    def matches(self, host: str) -> bool:
        return host_in(host, self.exact, self.suffixes)


@dataclass(frozen=True)
class MailSettings:
    """The `mail:` section (issue #5, addons/mail.py). Only `organization_hosts` (host names
    matched against SNI, `.suffix` for a domain, or IP addresses / networks matched against the
    destination) are reachable on mail ports; everything else on 25/465/587/110/995/143/993
    is blocked (IPA SME sample 7.3: no private mail servers)."""

    policy_path: Path
    organization_hosts: tuple[str, ...]
    clamd_socket: str | None = None          # None: the mail policy's clamd section
    idle_timeout_seconds: int = 1860         # IMAP IDLE: RFC 2177 asks clients to re-IDLE within 29 min
    max_message_bytes: int = 50 * 1024 * 1024
    starttls: str = "cut"                    # TLS inside a mail stream cannot be inspected
    reject_freemail_recipients: bool = True
    allowed_recipient_domains: tuple[str, ...] = ()   # empty: any recipient not on the free-mail list


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    node_name: str
    state_dir: Path
    wg_interface: str
    wg_listen_port: int
    wg_implementation: str
    wg_private_key_file: Path
    wg_mtu: int
    wg_persistent_keepalive: int | None   # issue #19: in the devices' configs; None: off
    endpoint: str | None
    ipv4_prefix: ipaddress.IPv4Network
    ipv6_prefix: ipaddress.IPv6Network | None
    uplink_interface: str
    transparent_port: int
    dns_port: int
    upstream_dns: tuple[str, ...]
    connection_strategy: str
    upstream_ca_bundle: Path | None
    tcp_timeout: int
    no_sni: str
    management_host: str
    management_port: int
    helpdesk_ja: str
    helpdesk_en: str
    helpdesk_contact: str
    default_action: Action
    host_rules: tuple[HostRule, ...]
    extra_addons: tuple[str, ...]
    sinkhole_ipv4: str = "198.18.0.1"   # DNS answer for names blocked with dns_block: sinkhole
    dot_resolvers: tuple[str, ...] = ()   # DNS over TLS allowed only to these addresses (issue #14)
    sinkhole_ipv6: str = "100::1"       # (RFC 2544 benchmark / RFC 6666 discard: never real hosts)
    log_retention_days: int = 1096              # 3 years (IPA SME 技術的対策 3.8)
    log_on_write_error: str = "block"           # block the request, or continue unlogged
    log_fsync: str = "rotate"
    firewall_log_group: int = 7                 # NFLOG group (per network namespace)
    firewall_log_interval: float = 10.0         # seconds per aggregated firewall record
    syslog: dict | None = None                  # {host, port, transport}: RFC 5424 forwarding
    registry_url: str | None = None            # postgresql://...: registry shared by several nodes
    alerts: dict | None = None                 # the `alerts:` section (gateway/reports/alerting.py)
    policy_path: Path | None = None          # the policy engine's file; None: built-in host rules
    quarantine_allow_hosts: tuple[str, ...] = ()
    # issue #3 (enrollment endpoint, posture); defaults keep older constructors working
    enrollment_host: str | None = None          # None: the enrollment endpoint is not served
    enrollment_port: int = 8443
    enrollment_cert_file: Path | None = None    # None: issued from the org CA (or self-signed) under state_dir
    enrollment_key_file: Path | None = None
    enrollment_server_names: tuple[str, ...] = ()
    enrollment_rate_per_minute: float = 6.0
    enrollment_burst: int = 5
    # issue #15: a connection must finish TLS within handshake_timeout, then send its request
    # within request_timeout; at most max_connections at once, max_connections_per_source of
    # them from one source address (IPv6: one /64), refused at accept before any TLS.
    enrollment_handshake_timeout: float = 5.0
    enrollment_request_timeout: float = 10.0
    enrollment_max_connections: int = 128
    enrollment_max_connections_per_source: int = 4
    posture_min_os: tuple[tuple[str, str], ...] = ()
    posture_quarantine_jailbroken: bool = True
    mail: MailSettings | None = None          # issue #5; None: no mail filtering
    signin: SignInSettings | None = None      # issue #9; None: devices need no user sign-in
    limits: LimitSettings = LimitSettings()   # issue #14; the defaults are documented in gateway/limits.py
    scan: ScanSettings | None = None          # issue #18; None: downloads are not scanned
    auto_quarantine: AutoQuarantineSettings | None = None   # issue #18; None: only operators quarantine
    organization: Organization | None = None  # issue #19; None: built from helpdesk_* (gateway/pages/organization.py)
    console: ConsoleSettings | None = None    # issue #21; None: no operator console
    proxy_workers: int = 1                    # issue #22: inspection processes (gateway/runtime/workers.py)
    proxy_ca_key: str = "ecdsa-p256"          # issue #22: gateway/proxy/interceptca.py
    leaf_cert_cache: int = 10_000             # issue #22: gateway/proxy/certcache.py
    wg_peers_per_interface: int = MAX_PEERS_PER_INTERFACE   # issue #22: gateway/devices/shards.py

    @property
    def gateway_ipv4(self) -> ipaddress.IPv4Address:
        return next(self.ipv4_prefix.hosts())

    @property
    def tunnel_shards(self) -> ShardLayout:
        """issue #22: which WireGuard interface and port serve which addresses of the pool."""
        return ShardLayout(self.wg_interface, self.wg_listen_port, self.ipv4_prefix, self.ipv6_prefix,
                           self.wg_peers_per_interface)

    def device_endpoint(self, address, endpoint: str | None = None) -> str | None:
        """issue #22: the endpoint (host:port) for the device with this tunnel address: the port
        of its shard's interface (tunnel.endpoint unchanged while the pool is one interface)."""
        endpoint = self.endpoint if endpoint is None else endpoint
        return None if endpoint is None else self.tunnel_shards.endpoint_for(endpoint, address)

    @property
    def gateway_ipv6(self) -> ipaddress.IPv6Address | None:
        return None if self.ipv6_prefix is None else self.ipv6_prefix[1]

    @property
    def nft_table(self) -> str:
        return f"kanmon_{self.node_name.replace('-', '_')}"

    @property
    def mitmproxy_confdir(self) -> Path:
        return self.state_dir / "mitmproxy"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def applied_policy_link(self) -> Path:
        """`kanmon policy apply` points this at the policy in force; it wins over policy.path."""
        return self.state_dir / "policy-applied"

    @property
    def policy_status_path(self) -> Path:
        return self.state_dir / "policy-status.json"

    @property
    def applied_status_path(self) -> Path:
        """The registry revision the running gateway has enforced (gatewayprocess.write_applied)."""
        return self.state_dir / "applied-revision.json"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "kanmon.pid"

    def active_policy_path(self) -> Path | None:
        link = self.applied_policy_link
        if link.is_symlink() or link.exists():
            return Path(os.readlink(link)) if link.is_symlink() else Path(link.read_text().strip())
        return self.policy_path


def load_config(path: str | Path) -> GatewayConfig:
    return _build(load_yaml_file(path))


def load_config_text(text: str, filename: str = "<string>") -> GatewayConfig:
    return _build(load_yaml_text(text, filename))


def _build(doc: LoadedYaml) -> GatewayConfig:
    if not isinstance(doc.data, dict):
        raise SourceErrors([doc.error((), Text("設定はキーと値の組（マッピング）で書いてください",
                                               "the configuration must be a mapping of keys"))])
    errors = schema_errors(doc, SCHEMA)
    if errors:
        raise SourceErrors(errors)
    d = doc.data
    errors = []

    def network(path: tuple, version: int):
        try:
            net = ipaddress.ip_network(_get(d, path), strict=True)
        except ValueError as exc:
            errors.append(doc.error(path, Text(f"ネットワークとして正しくありません: {exc}", f"not a valid network: {exc}")))
            return None
        if net.version != version:
            errors.append(doc.error(path, Text(f"IPv{version} のプレフィックスにしてください", f"must be an IPv{version} prefix")))
            return None
        if net.num_addresses < 4:
            errors.append(doc.error(path, Text("プレフィックスが小さすぎます（ゲートウェイと端末のアドレスが足りません）",
                                               "prefix too small for a gateway and devices")))
            return None
        return net

    tunnel, proxy, mgmt = d["tunnel"], d.get("proxy", {}), d.get("management", {})
    ipv4 = network(("tunnel", "ipv4_prefix"), 4)
    ipv6 = network(("tunnel", "ipv6_prefix"), 6) if "ipv6_prefix" in tunnel else None

    transparent_port = proxy.get("transparent_port", 8080)
    dns_port = proxy.get("dns_port", 8053)
    if transparent_port == dns_port:
        errors.append(doc.error(("proxy", "dns_port"), Text("proxy.transparent_port と別の番号にしてください", "must differ from proxy.transparent_port")))

    workers = _proxy_workers(doc, d, transparent_port, dns_port, errors)   # issue #22

    for i, server in enumerate(proxy.get("dot_resolvers", [])):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            errors.append(doc.error(("proxy", "dot_resolvers", i), Text(f"{server!r} は IP アドレスではありません", f"{server!r} is not an IP address")))
    for i, server in enumerate(proxy.get("upstream_dns", [])):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            errors.append(doc.error(("proxy", "upstream_dns", i), Text(f"{server!r} は IP アドレスではありません", f"{server!r} is not an IP address")))

    mgmt_host, mgmt_port = "127.0.0.1", 9180
    if "listen" in mgmt:
        m = re.fullmatch(r"\[?([0-9A-Fa-f:.]+)\]?:(\d+)", mgmt["listen"])
        if not m or not _is_ip(m.group(1)) or not 0 < int(m.group(2)) < 65536:
            errors.append(doc.error(("management", "listen"), Text("アドレス:ポート で書いてください（例 127.0.0.1:9180）", "must be ADDRESS:PORT, e.g. 127.0.0.1:9180")))
        else:
            mgmt_host, mgmt_port = m.group(1), int(m.group(2))

    enroll = d.get("enrollment")
    enroll_host, enroll_port = None, 8443
    if enroll is not None:
        m = re.fullmatch(r"\[?([0-9A-Fa-f:.]+)\]?:(\d+)", enroll["listen"])
        if not m or not _is_ip(m.group(1)) or not 0 < int(m.group(2)) < 65536:
            errors.append(doc.error(("enrollment", "listen"), Text("アドレス:ポート で書いてください（例 0.0.0.0:8443）", "must be ADDRESS:PORT, e.g. 0.0.0.0:8443")))
        else:
            enroll_host, enroll_port = m.group(1), int(m.group(2))
            if enroll_port in (*range(transparent_port, transparent_port + workers), *range(dns_port, dns_port + workers)) or (enroll_port == mgmt_port and enroll_host == mgmt_host):
                errors.append(doc.error(("enrollment", "listen"), Text("このポートはプロキシか管理用の待ち受けが使っています", "port already used by the proxy or management listener")))
        if ("server_cert_file" in enroll) != ("server_key_file" in enroll):
            errors.append(doc.error(("enrollment",), Text("server_cert_file と server_key_file は両方書いてください", "server_cert_file and server_key_file go together")))

    posture_cfg = d.get("posture", {})
    # Platforms compare without case (posture.normalize_platform): ios and IOS are one key.
    errors += duplicate_folded_keys(doc, ("posture", "min_os"), posture_cfg.get("min_os", {}),
                                    lambda p: normalize_platform(p) or "")
    min_os = []
    for platform, version in posture_cfg.get("min_os", {}).items():
        if isinstance(version, float):
            # YAML reads 17.10 as the number 17.1: refuse rather than enforce the wrong floor.
            errors.append(doc.error(("posture", "min_os", platform),
                                    Text(f"バージョンは引用符で囲んでください（YAML は {version!r} を数値として読みます）",
                                         f"write the version in quotes (YAML reads {version!r} as a number)")))
            continue
        try:
            parse_version(str(version))
        except VersionError as exc:
            errors.append(doc.error(("posture", "min_os", platform),
                                    Text(f"バージョン番号ではありません: {str(version)!r}", str(exc))))
        else:
            min_os.append((normalize_platform(platform), str(version)))

    for key, version in (("sinkhole_ipv4", 4), ("sinkhole_ipv6", 6)):
        if key in proxy:
            try:
                if ipaddress.ip_address(proxy[key]).version != version:
                    raise ValueError
            except ValueError:
                errors.append(doc.error(("proxy", key), Text(f"IPv{version} アドレスにしてください", f"must be an IPv{version} address")))

    if ipv4 is not None:   # issue #22: the pool split over WireGuard interfaces
        for key, problem in layout_problems(ShardLayout(tunnel["interface"], tunnel["listen_port"], ipv4, ipv6,
                                                        tunnel.get("peers_per_interface", MAX_PEERS_PER_INTERFACE)),
                                            tunnel.get("endpoint")):
            errors.append(doc.error(("tunnel", key), problem))

    if d["uplink"]["interface"] == tunnel["interface"]:
        errors.append(doc.error(("uplink", "interface"), Text("tunnel.interface と別のインターフェースにしてください", "must differ from tunnel.interface")))

    rules_cfg = d.get("rules", {})
    rules, seen_ids = [], {}
    for i, r in enumerate(rules_cfg.get("list", [])):
        if r["id"] in seen_ids:
            errors.append(doc.error(("rules", "list", i, "id"),
                                    Text(f"ルール ID が重複しています（{seen_ids[r['id']]} 行目にもあります）",
                                         f"duplicate rule id (also at line {seen_ids[r['id']]})")))
        seen_ids[r["id"]] = doc.line_of(("rules", "list", i, "id"))
        exact, suffixes = split_host_entries(r["hosts"])
        rules.append(HostRule(rule_id=r["id"], action=Action(r["action"]), exact=exact, suffixes=suffixes,
                              reason=r.get("reason", "")))

    mail = _mail_settings(doc, d.get("mail"), errors)
    if "scan" in d and (problem := clamd_address_error(d["scan"])):
        errors.append(doc.error(("scan", "clamd"), problem))
    signin = signin_settings(doc, d.get("signin"), errors, _relative_to)
    organization = organization_settings(doc, d.get("organization"), d.get("helpdesk"), errors)
    console = console_settings(doc, d.get("console"), errors, _relative_to, has_signin="signin" in d,
                               taken_ports=[("0.0.0.0", transparent_port), ("0.0.0.0", dns_port), (mgmt_host, mgmt_port)]
                               + ([(enroll_host, enroll_port)] if enroll_host else []),
                               device_networks=[n for n in (ipv4, ipv6) if n is not None])

    if errors:
        raise SourceErrors(errors)

    state_dir = Path(d["state_dir"])
    key_file = Path(tunnel.get("private_key_file", "wg-private.key"))
    helpdesk = d.get("helpdesk", {})
    return GatewayConfig(
        source=doc.filename,
        node_name=d.get("node", {}).get("name", "gw"),
        state_dir=state_dir,
        wg_interface=tunnel["interface"],
        wg_listen_port=tunnel["listen_port"],
        wg_implementation=tunnel.get("implementation", "auto"),
        wg_private_key_file=key_file if key_file.is_absolute() else state_dir / key_file,
        wg_mtu=tunnel.get("mtu", 1420),
        wg_persistent_keepalive=tunnel.get("persistent_keepalive"),
        endpoint=tunnel.get("endpoint"),
        wg_peers_per_interface=tunnel.get("peers_per_interface", MAX_PEERS_PER_INTERFACE),
        ipv4_prefix=ipv4,
        ipv6_prefix=ipv6,
        uplink_interface=d["uplink"]["interface"],
        transparent_port=transparent_port,
        dns_port=dns_port,
        upstream_dns=tuple(proxy.get("upstream_dns", [])),
        dot_resolvers=tuple(proxy.get("dot_resolvers", [])),
        connection_strategy=proxy.get("connection_strategy", "lazy"),
        proxy_ca_key=proxy.get("ca_key", "ecdsa-p256"),
        leaf_cert_cache=proxy.get("leaf_cert_cache", 10_000),
        upstream_ca_bundle=Path(proxy["upstream_ca_bundle"]) if "upstream_ca_bundle" in proxy else None,
        tcp_timeout=proxy.get("tcp_timeout", 600),
        no_sni=proxy.get("no_sni", "block"),
        proxy_workers=workers,
        management_host=mgmt_host,
        management_port=mgmt_port,
        helpdesk_ja=helpdesk.get("name_ja", "情報システム担当"),
        helpdesk_en=helpdesk.get("name_en", "IT helpdesk"),
        helpdesk_contact=helpdesk.get("contact", ""),
        default_action=Action(rules_cfg.get("default_action", "allow")),
        host_rules=tuple(rules),
        extra_addons=tuple(d.get("addons", {}).get("extra", [])),
        alerts=d.get("alerts"),
        registry_url=d.get("registry", {}).get("url"),
        log_retention_days=d.get("logs", {}).get("retention_days", 1096),
        log_on_write_error=d.get("logs", {}).get("on_write_error", "block"),
        log_fsync=d.get("logs", {}).get("fsync", "rotate"),
        firewall_log_group=d.get("logs", {}).get("firewall_group", 7),
        firewall_log_interval=float(d.get("logs", {}).get("firewall_interval", 10.0)),
        syslog=d.get("logs", {}).get("syslog"),
        sinkhole_ipv4=proxy.get("sinkhole_ipv4", "198.18.0.1"),
        sinkhole_ipv6=proxy.get("sinkhole_ipv6", "100::1"),
        policy_path=_relative_to(doc.filename, d["policy"]["path"]) if "path" in d.get("policy", {}) else None,
        quarantine_allow_hosts=tuple(normalize_host_entry(h) for h in d.get("quarantine", {}).get("allow_hosts", [])),
        enrollment_host=enroll_host,
        enrollment_port=enroll_port,
        enrollment_cert_file=_state_path(state_dir, enroll.get("server_cert_file")) if enroll else None,
        enrollment_key_file=_state_path(state_dir, enroll.get("server_key_file")) if enroll else None,
        enrollment_server_names=tuple(enroll.get("server_names", [])) if enroll else (),
        enrollment_rate_per_minute=float(enroll.get("rate_per_minute", 6.0)) if enroll else 6.0,
        enrollment_burst=int(enroll.get("burst", 5)) if enroll else 5,
        enrollment_handshake_timeout=float((enroll or {}).get("handshake_timeout", 5.0)),
        enrollment_request_timeout=float((enroll or {}).get("request_timeout", 10.0)),
        enrollment_max_connections=int((enroll or {}).get("max_connections", 128)),
        enrollment_max_connections_per_source=int((enroll or {}).get("max_connections_per_source", 4)),
        posture_min_os=tuple(min_os),
        posture_quarantine_jailbroken=bool(posture_cfg.get("quarantine_jailbroken", True)),
        mail=mail,
        signin=signin,
        limits=limit_settings(d.get("limits")),
        scan=scan_settings(d.get("scan")),
        auto_quarantine=auto_quarantine_settings(d.get("auto_quarantine")),
        organization=organization,
        console=console,
    )


MAX_PROXY_WORKERS = 64


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or systemd's
    CPUAffinity narrows), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _proxy_workers(doc: LoadedYaml, d: dict, transparent_port: int, dns_port: int, errors: list) -> int:
    """issue #22: `proxy.workers: auto | N`. Worker i listens on transparent_port + i and
    dns_port + i, so the two port ranges must not overlap and must stay below 65536. User
    sign-in and automatic quarantine work with any count (gateway/runtime/workers.py). The
    default is ``auto``: one worker per usable core."""
    value = d.get("proxy", {}).get("workers", "auto")
    if value == "auto":
        count = min(usable_cores(), MAX_PROXY_WORKERS)
    elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PROXY_WORKERS:
        count = value
    else:
        errors.append(doc.error(("proxy", "workers"), Text(
            f"auto か 1〜{MAX_PROXY_WORKERS} の整数にしてください（{value!r}）",
            f"must be auto or an integer from 1 to {MAX_PROXY_WORKERS} ({value!r})")))
        return 1
    if count > 1:
        tp, dp = range(transparent_port, transparent_port + count), range(dns_port, dns_port + count)
        if tp[-1] > 65535 or dp[-1] > 65535:
            errors.append(doc.error(("proxy", "workers"), Text(
                f"ワーカー {count} 個分のポート（transparent_port/dns_port から連番）が 65535 を超えます",
                f"the ports of {count} workers (consecutive from transparent_port and dns_port) exceed 65535")))
        elif set(tp) & set(dp):
            errors.append(doc.error(("proxy", "workers"), Text(
                f"ワーカー {count} 個分のポート {tp[0]}-{tp[-1]} と {dp[0]}-{dp[-1]} が重なります。dns_port を離してください",
                f"the ports of {count} workers, {tp[0]}-{tp[-1]} and {dp[0]}-{dp[-1]}, overlap: move dns_port away")))
    return count


def _mail_settings(doc: LoadedYaml, m: dict | None, errors: list) -> MailSettings | None:
    if m is None:
        return None
    for i, host in enumerate(m["organization_hosts"]):
        try:
            ipaddress.ip_network(host, strict=False)
        except ValueError:
            if not re.fullmatch(r"\.?([A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?", host):
                errors.append(doc.error(("mail", "organization_hosts", i),
                                        Text(f"{host!r} はホスト名でもアドレスでもありません", f"{host!r} is neither a host name nor an address")))
    default_policy = Path(__file__).resolve().parents[1] / "policies" / "mail.yaml"
    return MailSettings(
        policy_path=_relative_to(doc.filename, m["policy"]) if "policy" in m else default_policy,
        organization_hosts=tuple(normalize_host_entry(h) for h in m["organization_hosts"]),
        clamd_socket=m.get("clamd_socket"),
        idle_timeout_seconds=m.get("idle_timeout_seconds", 1860),
        max_message_bytes=m.get("max_message_bytes", 50 * 1024 * 1024),
        starttls=m.get("starttls", "cut"),
        reject_freemail_recipients=m.get("reject_freemail_recipients", True),
        allowed_recipient_domains=tuple(x.lower() for x in m.get("allowed_recipient_domains", [])),
    )


def _state_path(state_dir: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else state_dir / path


def _relative_to(config_file: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(config_file).resolve().parent / p


def _get(data: dict, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


__all__ = ["GatewayConfig", "HostRule", "MailSettings", "load_config", "load_config_text", "SourceError", "SourceErrors"]
