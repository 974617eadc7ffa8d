"""A whole Kanmon deployment in network namespaces on one machine.

    device namespaces (wireguard-go clients)          gateway namespace                 internet namespace
    ┌─────────────┐  underlay 100.64.0.0/24   ┌──────────────────────────────┐  uplink  ┌──────────────────────┐
    │ dN: wg ─────┼──── veth ── bridge ───────┤ wg (Kanmon) -> nft -> proxy ├── veth ──┤ nginx HTTP/HTTPS,    │
    │ default via │                           │ 10.77.0.1 / fd77:77::1       │ 198.51.  │ DNS (.test zone),    │
    │ the tunnel  │                           └──────────────────────────────┘ 100.0/24 │ room for mail servers│
    └─────────────┘                                                                      └──────────────────────┘

Everything lives in namespaces this lab creates; no packet leaves the machine. Used by the
end-to-end tests, `kanmon demo` and bench/proxy.py. Needs root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from wireguard_tools import WireguardKey

from gateway.lab.testca import TestCA

# Addresses of the lab (documentation and shared-address ranges, inside namespaces only).
UNDERLAY_GW = "100.64.0.1"
UPLINK_GW4, UPLINK_INET4 = "198.51.100.1", "198.51.100.254"
UPLINK_GW6, UPLINK_INET6 = "2001:db8:100::1", "2001:db8:100::fe"
WEB4, WEB6 = "198.51.100.80", "2001:db8:100::80"
DNS4 = "198.51.100.53"
SPARE4 = "198.51.100.90"          # a second internet host (raw TCP / UDP listeners in tests)
MAIL4, PRIVATE_MAIL4 = "198.51.100.25", "198.51.100.26"   # Lab(mail=True): organization / "private" mail server
IDP4 = "198.51.100.43"            # Lab(idp=True): the OpenID Connect provider idp.test (issue #9)
TUNNEL4, TUNNEL6 = "10.77.0.0/24", "fd77:77::/64"
GATEWAY_TUNNEL4, GATEWAY_TUNNEL6 = "10.77.0.1", "fd77:77::1"
WG_PORT = 51820
MANAGEMENT = "127.0.0.1:9180"

WEB_NAMES = ["example.test", "www.example.test", "v6.example.test", "blocked.test", "www.blocked.test",
             "allowed.test", "files.example.test", "mail.example.test", "webmail.test", "www.webmail.test",
             "bank.test", "doh.test", "tracker.test", "switch.test", "ech.example.test", "mdm.test",
             "accounts.google.com", "login.microsoftonline.com", "www.example.jp"]   # www.example.jp: README walkthrough
# A fake ECH config in an HTTPS record (the gateway must strip it so it can intercept).
ECH_CONFIG_B64 = "AEX+DQBBpQAgACDDb5Ffyj7mNyvxBT4UDBkIEfQKNIEN+ZrLBLYW8vwKOAAEAAEAAQASY2xvdWRmbGFyZS1lY2guY29tAAA="


class LabError(Exception):
    pass


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input, env=env)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise LabError(f"timed out after {timeout}s waiting for {what}")


def lab_prerequisites() -> list[str]:
    """What is missing for the lab to run here (empty when it can run)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    for tool in ("ip", "nft", "wireguard-go", "wg", "nginx", "curl"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun")
    return missing


@dataclass
class Netns:
    name: str

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        return run(self.cmd(*args), check=check, timeout=timeout, input=input)

    def popen(self, *args: str, stdout=None, stderr=None, env=None) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), stdout=stdout or subprocess.DEVNULL, stderr=stderr or subprocess.STDOUT,
                                env=env, start_new_session=True)

    def python(self, code: str, *, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-c", code, timeout=timeout, check=check)


@dataclass
class Device:
    index: int
    device_id: str
    ns: Netns
    wg_interface: str
    private_key: WireguardKey
    ipv4: str
    ipv6: str | None
    lab: "Lab"

    @property
    def public_key(self) -> str:
        return str(self.private_key.public_key())

    def assume_identity(self, device_id: str, key: WireguardKey, ipv4: str, key_dir: Path) -> None:
        """Reuse this namespace as another (newly registered) device: its key and /32 address."""
        key_file = key_dir / f"{device_id}.key"
        key_file.write_text(str(key) + "\n")
        key_file.chmod(0o600)
        self.ns.run("wg", "set", self.wg_interface, "private-key", str(key_file))
        self.ns.run("ip", "addr", "flush", "dev", self.wg_interface)
        self.ns.run("ip", "addr", "add", f"{ipv4}/32", "dev", self.wg_interface)
        self.ns.run("ip", "route", "replace", "default", "dev", self.wg_interface)
        self.private_key, self.ipv4, self.device_id = key, ipv4, device_id

    def curl(self, url: str, *extra: str, timeout: float = 20) -> subprocess.CompletedProcess:
        """curl from the device, trusting the gateway's interception CA (as an enrolled phone
        does). Output: body, then a last line `HTTP_CODE=<code>`."""
        return self.ns.run("curl", "-sS", "--max-time", str(timeout), "--cacert", str(self.lab.interception_ca),
                           "-w", "\nHTTP_CODE=%{http_code}", *extra, url, check=False, timeout=timeout + 10)


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Lab:
    workdir: Path
    n_devices: int = 2
    prefix: str = field(default_factory=lambda: "km" + secrets.token_hex(2))
    config_overrides: dict = field(default_factory=dict)
    kanmon_cmd: tuple[str, ...] = (sys.executable, "-m", "gateway.cli")
    mail: bool = False                  # Postfix + Dovecot + clamd in the internet namespace (issue #5)
    mail_signatures: dict = field(default_factory=dict)   # clamd test signatures: name -> marker bytes
    # Lab(idp=True): a real OIDC provider at https://idp.test (issue #9). After build(), lab.idp
    # is the running gateway.lab.oidcprovider.OidcProvider (None without the option).
    idp: object = False
    idp_client: object = None           # gateway.lab.oidcprovider.OidcClient to register (None: the default)
    idp_users: object = None            # name -> gateway.lab.oidcprovider.TestUser (None: TEST_USERS)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.gw = Netns(f"{self.prefix}-gw")
        self.inet = Netns(f"{self.prefix}-inet")
        self.devices: list[Device] = []
        self.gateway: GatewayProcess | None = None
        self.server_procs: list[subprocess.Popen] = []
        self._namespaces: list[Netns] = []
        self.state_dir = self.workdir / "gateway-state"
        self.config_path = self.workdir / "kanmon.yaml"
        self.ca: TestCA | None = None
        self.web_dir = self.workdir / "web"
        self.dns_query_log = self.workdir / "dns-queries.jsonl"
        self.mail_servers = None
        self.with_idp = bool(self.idp)
        self.idp = None

    # -- names ---------------------------------------------------------------------------
    @property
    def wg_interface(self) -> str:
        return f"{self.prefix}wg"

    @property
    def interception_ca(self) -> Path:
        return self.state_dir / "mitmproxy" / "mitmproxy-ca-cert.pem"

    @property
    def nginx_access_log(self) -> Path:
        return self.web_dir / "access.log"

    # -- build ---------------------------------------------------------------------------
    def build(self) -> "Lab":
        missing = lab_prerequisites()
        if missing:
            raise LabError("lab prerequisites missing: " + ", ".join(missing))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for ns in (self.gw, self.inet):
            self._add_ns(ns)
        self._link_uplink()
        self._build_underlay()
        self.ca = TestCA(self.workdir / "ca")
        self._start_dns()
        self._start_nginx()
        if self.mail:
            self._start_mail()
        if self.with_idp:
            self._start_idp()
        self.write_config()
        for i in range(1, self.n_devices + 1):
            self.add_device(i)
        return self

    def _add_ns(self, ns: Netns) -> None:
        run(["ip", "netns", "add", ns.name])
        self._namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        # Fresh namespaces forward nothing; the gateway relies on that too.
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    def _link_uplink(self) -> None:
        gw_if, inet_if = f"{self.prefix}u0", f"{self.prefix}u1"
        run(["ip", "link", "add", gw_if, "netns", self.gw.name, "type", "veth", "peer", "name", inet_if,
             "netns", self.inet.name])
        self.gw.run("ip", "addr", "add", f"{UPLINK_GW4}/24", "dev", gw_if)
        self.gw.run("ip", "-6", "addr", "add", f"{UPLINK_GW6}/64", "dev", gw_if, "nodad")
        self.gw.run("ip", "link", "set", gw_if, "up")
        self.gw.run("ip", "route", "add", "default", "via", UPLINK_INET4)
        self.gw.run("ip", "-6", "route", "add", "default", "via", UPLINK_INET6)
        self.inet.run("ip", "addr", "add", f"{UPLINK_INET4}/24", "dev", inet_if)
        extras = (*((MAIL4, PRIVATE_MAIL4) if self.mail else ()), *((IDP4,) if self.with_idp else ()))
        for extra in (WEB4, DNS4, SPARE4, *extras):
            self.inet.run("ip", "addr", "add", f"{extra}/32", "dev", inet_if)
        self.inet.run("ip", "-6", "addr", "add", f"{UPLINK_INET6}/64", "dev", inet_if, "nodad")
        self.inet.run("ip", "-6", "addr", "add", f"{WEB6}/128", "dev", inet_if, "nodad")
        self.inet.run("ip", "link", "set", inet_if, "up")
        self.uplink_interface = gw_if

    def _build_underlay(self) -> None:
        bridge = f"{self.prefix}br"
        self.gw.run("ip", "link", "add", bridge, "type", "bridge")
        self.gw.run("ip", "addr", "add", f"{UNDERLAY_GW}/24", "dev", bridge)
        self.gw.run("ip", "link", "set", bridge, "up")
        self.underlay_bridge = bridge

    def _start_dns(self) -> None:
        zone = {
            "records": {
                "v6only.example.test": {"AAAA": [WEB6]},
                "spare.test": {"A": [SPARE4]},
                "accounts.google.com": {"A": [WEB4], "AAAA": [WEB6]},
                "login.microsoftonline.com": {"A": [WEB4], "AAAA": [WEB6]},
                "www.example.jp": {"A": [WEB4], "AAAA": [WEB6]},      # README walkthrough: an allowed site
                "mail.yahoo.co.jp": {"A": [WEB4], "AAAA": [WEB6]},    # ... and a free web mail it blocks
                "ech.example.test": {"A": [WEB4], "AAAA": [WEB6],
                                     "HTTPS": [["1", ".", "alpn=h2", f"echconfig={ECH_CONFIG_B64}"]]},
            },
            "wildcard_a": WEB4,
            "wildcard_aaaa": WEB6,
        }
        if self.mail:
            from gateway.lab.mailservers import MAIL_HOST, PRIVATE_MAIL_HOST
            zone["records"][MAIL_HOST] = {"A": [MAIL4]}
            zone["records"][PRIVATE_MAIL_HOST] = {"A": [PRIVATE_MAIL4]}
        if self.with_idp:
            from gateway.lab.oidcprovider import IDP_HOST
            zone["records"][IDP_HOST] = {"A": [IDP4]}     # IPv4 only: no AAAA answer, no wildcard
        zone_path = self.workdir / "zone.json"
        zone_path.write_text(json.dumps(zone))
        log = open(self.workdir / "dns-server.log", "w")
        env = dict(os.environ, PYTHONPATH=_project_root())
        proc = self.inet.popen(sys.executable, "-m", "gateway.lab.dnsserver", "--zone", str(zone_path),
                               "--address", DNS4, "--query-log", str(self.dns_query_log), stdout=log, env=env)
        self.server_procs.append(proc)
        wait_until(lambda: "dns ready" in (self.workdir / "dns-server.log").read_text() or proc.poll() is not None,
                   15, "the lab DNS server")
        if proc.poll() is not None:
            raise LabError("lab DNS server died: " + (self.workdir / "dns-server.log").read_text())

    def _start_nginx(self) -> None:
        assert self.ca is not None
        pair = self.ca.issue_server("web", WEB_NAMES, [WEB4, WEB6])
        www = self.web_dir / "www"
        (www / "files").mkdir(parents=True, exist_ok=True)
        (self.web_dir / "tmp").mkdir(exist_ok=True)
        (www / "files" / "app.apk").write_bytes(b"PK\x03\x04 fake android package")
        (www / "files" / "report.pdf").write_bytes(b"%PDF-1.4 fake report")
        with open(www / "big.bin", "wb") as f:
            f.truncate(512 * 1024 * 1024)  # sparse: costs no disk
        d = self.web_dir
        conf = f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format kanmon escape=json '{{"remote":"$remote_addr","host":"$host","uri":"$request_uri","status":$status,"method":"$request_method","scheme":"$scheme","bytes":$bytes_sent}}';
  access_log {d}/access.log kanmon;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fcgi;
  uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  types {{ application/vnd.android.package-archive apk; application/pdf pdf; }}
  server {{
    listen {WEB4}:80 default_server; listen [{WEB6}]:80 default_server;
    listen {WEB4}:443 ssl http2 default_server; listen [{WEB6}]:443 ssl http2 default_server;
    ssl_certificate {pair.cert_path}; ssl_certificate_key {pair.key_path};
    server_name _;
    location = /big {{ alias {www}/big.bin; default_type application/octet-stream; limit_rate 4m; }}
    location /files/ {{ alias {www}/files/; }}
    location /echo-headers {{ default_type application/json; return 200 '{{"x_googapps_allowed_domains":"$http_x_googapps_allowed_domains","restrict_access_to_tenants":"$http_restrict_access_to_tenants","restrict_access_context":"$http_restrict_access_context","host":"$host"}}\\n'; }}
    location / {{ default_type text/plain; return 200 "hello from $host via $scheme\\n"; }}
  }}
}}
"""
        conf_path = self.web_dir / "nginx.conf"
        conf_path.write_text(conf)
        log = open(self.web_dir / "nginx.out", "w")
        proc = self.inet.popen("nginx", "-c", str(conf_path), stdout=log)
        self.server_procs.append(proc)
        wait_until(lambda: (self.web_dir / "nginx.pid").exists() or proc.poll() is not None, 15, "nginx")
        if proc.poll() is not None:
            raise LabError("nginx died: " + (self.web_dir / "nginx.out").read_text())

    def _start_mail(self) -> None:
        from gateway.lab.mailservers import MAIL_HOST, PRIVATE_MAIL_HOST, MailServers
        pair = self.ca.issue_server("mail", [MAIL_HOST, PRIVATE_MAIL_HOST], [MAIL4, PRIVATE_MAIL4])
        self.mail_servers = MailServers(self.inet, self.workdir / "mail", (MAIL4, PRIVATE_MAIL4), pair.cert_path,
                                        pair.key_path, clamd_signatures=dict(self.mail_signatures))
        self.mail_servers.start()

    def _start_idp(self) -> None:
        from gateway.lab.oidcprovider import IDP_HOST, OidcClient, OidcProvider
        pair = self.ca.issue_server("idp", [IDP_HOST], [IDP4])
        self.idp = OidcProvider(self.inet, self.workdir / "idp", IDP4, pair.cert_path, pair.key_path,
                                self.ca.cert_path, client=self.idp_client or OidcClient(),
                                **({"users": dict(self.idp_users)} if self.idp_users else {}))
        self.idp.start()
        # The gateway itself talks to the IdP (discovery, token, JWKS) by name, like a real
        # gateway host with a resolver: `ip netns exec` binds this file over /etc/resolv.conf.
        # It must trust self.ca.cert_path (the lab's test CA) for https://idp.test.
        resolv = Path("/etc/netns") / self.gw.name
        resolv.mkdir(parents=True, exist_ok=True)
        (resolv / "resolv.conf").write_text(f"nameserver {DNS4}\n")

    # -- gateway -------------------------------------------------------------------------
    def gateway_config(self) -> dict:
        cfg = {
            "node": {"name": "lab"},
            "state_dir": str(self.state_dir),
            "tunnel": {
                "interface": self.wg_interface,
                "listen_port": WG_PORT,
                "ipv4_prefix": TUNNEL4,
                "ipv6_prefix": TUNNEL6,
                "endpoint": f"{UNDERLAY_GW}:{WG_PORT}",
            },
            "uplink": {"interface": self.uplink_interface},
            # One inspection process unless a test asks otherwise (the product default is
            # `auto`, exercised by tests/e2e/test_workers_*.py): tests about something else
            # keep one gateway process's behaviour and the lab's CPU to themselves.
            "proxy": {"upstream_dns": [DNS4], "upstream_ca_bundle": str(self.ca.cert_path), "workers": 1},
            "management": {"listen": MANAGEMENT},
            "helpdesk": {"name_ja": "情報システム課", "name_en": "the IT desk", "contact": "helpdesk@example.test / 内線 1234"},
            "rules": {
                "default_action": "allow",
                "list": [
                    {"id": "lab-block-blocked-test", "action": "block", "hosts": ["blocked.test", ".blocked.test"],
                     "reason": "lab: blocked.test is on the block list"},
                ],
            },
        }
        return _deep_merge(cfg, self.config_overrides)

    def write_config(self, overrides: dict | None = None) -> Path:
        if overrides is not None:
            self.config_overrides = overrides
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file = self.state_dir / "wg-private.key"
        if not key_file.exists():
            key_file.write_text(str(WireguardKey.generate()) + "\n")
            key_file.chmod(0o600)
        self.config_path.write_text(yaml.safe_dump(self.gateway_config(), allow_unicode=True, sort_keys=False))
        return self.config_path

    @property
    def gateway_public_key(self) -> str:
        return str(WireguardKey((self.state_dir / "wg-private.key").read_text().strip()).public_key())

    def kanmon(self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None,
               ns: Netns | None = None) -> subprocess.CompletedProcess:
        cmd = [*self.kanmon_cmd, *args]
        env = dict(os.environ, PYTHONPATH=_project_root())
        if ns is not None:
            cmd = ns.cmd(*cmd)
        return run(cmd, check=check, timeout=timeout, input=input, env=env)

    def start_gateway(self, timeout: float = 60, env: dict | None = None) -> GatewayProcess:
        """`env`: extra environment variables for the gateway process only (e.g. LD_PRELOAD
        of libfaketime in the clock-jump test)."""
        log_path = self.workdir / "gateway.log"
        log = open(log_path, "a")
        env = {**os.environ, "PYTHONPATH": _project_root(), "KANMON_LOG_LEVEL": "info", **(env or {})}
        proc = self.gw.popen(*self.kanmon_cmd, "run", "--config", str(self.config_path), stdout=log, env=env)
        self.gateway = GatewayProcess(proc, log_path)
        start = log_path.stat().st_size if log_path.exists() else 0
        start_offset = max(0, start - 1)

        def ready() -> bool:
            text = log_path.read_text(errors="replace")[start_offset:]
            return "gateway ready" in text or proc.poll() is not None

        wait_until(ready, timeout, "the gateway to start")
        if proc.poll() is not None:
            raise LabError(f"gateway exited with {proc.returncode}:\n{self.gateway.log_text()[-4000:]}")
        return self.gateway

    def stop_gateway(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.gateway is None:
            return None
        proc = self.gateway.proc
        if proc.poll() is None:
            proc.send_signal(sig)  # the gateway process only, like `kill -9 PID`
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.gateway = None
        return proc.returncode

    def metrics_text(self) -> str:
        return self.gw.run("curl", "-sS", "--max-time", "5", f"http://{MANAGEMENT}/metrics").stdout

    def metric_value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    # -- devices -------------------------------------------------------------------------
    def add_device(self, index: int, *, register: bool = True, device_id: str | None = None) -> Device:
        ns = Netns(f"{self.prefix}-d{index}")
        self._add_ns(ns)
        dev_if, gw_if = f"{self.prefix}d{index}", f"{self.prefix}d{index}g"
        run(["ip", "link", "add", dev_if, "netns", ns.name, "type", "veth", "peer", "name", gw_if,
             "netns", self.gw.name])
        self.gw.run("ip", "link", "set", gw_if, "master", self.underlay_bridge)
        self.gw.run("ip", "link", "set", gw_if, "up")
        ns.run("ip", "addr", "add", f"100.64.0.{10 + index}/24", "dev", dev_if)
        ns.run("ip", "link", "set", dev_if, "up")
        key = WireguardKey.generate()
        device_id = device_id or f"dev{index}"
        ipv4, ipv6 = f"10.77.0.{200 + index}", f"fd77:77::{200 + index:x}"
        if register:
            out = self.kanmon("device", "add", "--config", str(self.config_path), "--id", device_id,
                              "--public-key", str(key.public_key()), "--owner", f"user{index}@example.test",
                              "--group", "staff", "--json")
            rec = json.loads(out.stdout)
            ipv4, ipv6 = rec["ipv4"], rec["ipv6"]
        device = Device(index, device_id, ns, f"{self.prefix}w{index}", key, ipv4, ipv6, self)
        self._bring_up_tunnel(device)
        resolv = Path("/etc/netns") / ns.name
        resolv.mkdir(parents=True, exist_ok=True)
        (resolv / "resolv.conf").write_text(f"nameserver {GATEWAY_TUNNEL4}\n")
        self.devices.append(device)
        return device

    def _bring_up_tunnel(self, device: Device) -> None:
        ns, wg_if = device.ns, device.wg_interface
        env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
        run(ns.cmd("wireguard-go", wg_if), env=env)
        key_file = self.workdir / f"{wg_if}.key"
        key_file.write_text(str(device.private_key) + "\n")
        key_file.chmod(0o600)
        ns.run("wg", "set", wg_if, "private-key", str(key_file), "peer", self.gateway_public_key,
               "endpoint", f"{UNDERLAY_GW}:{WG_PORT}", "allowed-ips", "0.0.0.0/0,::/0")
        ns.run("ip", "addr", "add", f"{device.ipv4}/32", "dev", wg_if)
        if device.ipv6:
            ns.run("ip", "-6", "addr", "add", f"{device.ipv6}/128", "dev", wg_if, "nodad")
        ns.run("ip", "link", "set", wg_if, "mtu", "1420", "up")
        ns.run("ip", "route", "add", "default", "dev", wg_if)
        ns.run("ip", "-6", "route", "add", "default", "dev", wg_if)

    def wait_for_peer(self, device: Device, timeout: float = 10) -> None:
        """Until the gateway has this device as a peer (reconciler applied the registry)."""
        def present() -> bool:
            out = self.gw.run("wg", "show", self.wg_interface, "allowed-ips", check=False).stdout
            return device.public_key in out
        wait_until(present, timeout, f"peer {device.device_id} on the gateway")

    # -- evidence ------------------------------------------------------------------------
    def nginx_requests(self) -> list[dict]:
        if not self.nginx_access_log.exists():
            return []
        return [json.loads(line) for line in self.nginx_access_log.read_text().splitlines() if line.strip()]

    def dns_queries(self) -> list[dict]:
        if not self.dns_query_log.exists():
            return []
        return [json.loads(line) for line in self.dns_query_log.read_text().splitlines() if line.strip()]

    def log_records(self, stream: str) -> list[dict]:
        out = []
        for path in sorted((self.state_dir / "logs" / stream).glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    # -- teardown ------------------------------------------------------------------------
    def teardown(self) -> None:
        if self.gateway is not None:
            try:
                self.stop_gateway()
            except Exception:
                pass
        if self.mail_servers is not None:
            try:
                self.mail_servers.stop()
            except Exception:
                pass
        if self.idp is not None:
            try:
                self.idp.stop()
            except Exception:
                pass
        for proc in self.server_procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=5)
                except Exception:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for ns in reversed(self._namespaces):
            # Kill whatever still runs in the namespace (wireguard-go daemons), then delete it.
            pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "delete", ns.name], check=False)
            shutil.rmtree(Path("/etc/netns") / ns.name, ignore_errors=True)
        for sock in Path("/var/run/wireguard").glob(f"{self.prefix}*.sock"):
            sock.unlink(missing_ok=True)
        self._namespaces.clear()


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
