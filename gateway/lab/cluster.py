"""Two gateway nodes on one PostgreSQL registry, built on top of `Lab` (issue #8).

    device namespaces ── underlay bridge (in node A's namespace) ──┬── node A  100.64.0.1 ── uplink ── internet
                                                                   ├── node B  100.64.0.2 ── uplink2 ─┘
                                                                   └── db      100.64.0.5 (PostgreSQL)

`Lab` builds node A, the internet and the bridge; this module adds node B (its own namespace,
state directory and WireGuard interface; the deployment's shared server key), a namespace
running a private PostgreSQL cluster (initdb/pg_ctl as the `postgres` user, data in a fresh
temporary directory, never the system cluster), and devices that may use either node.
`PostgresServer` alone (unix socket only, no namespace) serves the unit tests.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.lab.topology import (UNDERLAY_GW, WG_PORT, Device, GatewayProcess, Lab, LabError, Netns, _project_root,
                                  run, wait_until)

NODE_B_UNDERLAY = "100.64.0.2"
DB_UNDERLAY = "100.64.0.5"
UPLINK_B4, UPLINK_B_INET4 = "198.51.101.1", "198.51.101.254"
UPLINK_B6, UPLINK_B_INET6 = "2001:db8:101::1", "2001:db8:101::fe"
PG_PORT = 5432


def postgres_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL server binaries (package `postgresql`), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def postgres_prerequisites() -> list[str]:
    missing = []
    if postgres_bin_dir() is None:
        missing.append("PostgreSQL server (Debian package postgresql)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing.append("user postgres")
    if os.geteuid() != 0:
        missing.append("root (to run PostgreSQL as the postgres user)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing.append("psycopg (pip install 'psycopg[binary]==3.3.9')")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster: own data directory (a fresh temporary directory the
    postgres user owns), own port and unix socket directory, trust authentication (nothing
    but this test can reach it). `netns`/`listen`: also serve TCP inside that namespace."""

    netns: Netns | None = None
    listen: str = ""
    port: int = 0
    database: str = "kanmon"

    def __post_init__(self) -> None:
        self.port = self.port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="kanmon-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self.bin = postgres_bin_dir()
        if self.bin is None:
            raise LabError("PostgreSQL server binaries not found (apt-get install postgresql)")
        pg = pwd.getpwnam("postgres")
        self.sockets.mkdir()
        for path in (self.root, self.sockets):
            os.chown(path, pg.pw_uid, pg.pw_gid)
        self.started = False

    def _as_postgres(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", "postgres", "--", *args]
        if self.netns is not None:
            cmd = self.netns.cmd(*cmd)
        return run(cmd, check=check, timeout=timeout)

    def init(self) -> "PostgresServer":
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        conf = (f"\nport = {self.port}\nunix_socket_directories = '{self.sockets}'\nlisten_addresses = '{self.listen}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(conf)
        if self.listen:
            with open(self.data / "pg_hba.conf", "a") as f:
                f.write("host all all 100.64.0.0/24 trust\n")
        return self

    def running(self) -> bool:
        return self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def start(self, timeout: float = 30) -> "PostgresServer":
        """Start (again); does nothing when it already runs."""
        if self.started and self.running():
            return self
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w",
                          "-t", str(int(timeout)), "start", timeout=timeout + 10)
        if not self.started:
            self._as_postgres(str(self.bin / "psql"), "-h", str(self.sockets), "-p", str(self.port), "-U", "postgres",
                              "-d", "postgres", "-qc", f"CREATE DATABASE {self.database}", check=False)
        self.started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def create_database(self, name: str) -> str:
        self._as_postgres(str(self.bin / "psql"), "-h", str(self.sockets), "-p", str(self.port), "-U", "postgres",
                          "-d", "postgres", "-qc", f"CREATE DATABASE {name}")
        return self.url(database=name)

    def url(self, *, database: str | None = None, tcp: bool = False) -> str:
        db = database or self.database
        if tcp:
            return f"postgresql://postgres@{self.listen}:{self.port}/{db}"
        return f"postgresql://postgres@/{db}?host={self.sockets}&port={self.port}"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Node:
    name: str
    ns: Netns
    state_dir: Path
    config_path: Path
    wg_interface: str
    underlay: str
    gateway: GatewayProcess | None = None


class ClusterLab:
    """`Lab` (node A + internet + underlay) plus node B and a PostgreSQL namespace."""

    def __init__(self, workdir: Path, overrides: dict | None = None):
        self.workdir = Path(workdir)
        self.pg: PostgresServer | None = None
        self.lab = Lab(self.workdir, n_devices=0, config_overrides=overrides or {})
        self.overrides = overrides or {}
        self.db_ns = Netns(f"{self.lab.prefix}-db")
        self.nodes: dict[str, Node] = {}
        self.device_node: dict[str, str] = {}

    @property
    def registry_url(self) -> str:
        assert self.pg is not None
        return self.pg.url(tcp=True)

    def launcher(self) -> tuple[str, ...]:
        return (sys.executable, "-m", "gateway.cli", "--registry-url", self.registry_url)

    # -- build -----------------------------------------------------------------------------
    def build(self) -> "ClusterLab":
        lab = self.lab
        lab.config_overrides = _merge({"node": {"name": "node-a"}}, self.overrides)
        lab.build()
        self._add_ns(self.db_ns)
        self._attach_to_underlay(self.db_ns, "db", DB_UNDERLAY)
        self.pg = PostgresServer(netns=self.db_ns, listen=DB_UNDERLAY, port=PG_PORT).init().start()
        lab.kanmon_cmd = self.launcher()
        self.nodes["node-a"] = Node("node-a", lab.gw, lab.state_dir, lab.config_path, lab.wg_interface, UNDERLAY_GW)
        self._build_node_b()
        return self

    def _add_ns(self, ns: Netns) -> None:
        self.lab._add_ns(ns)

    def _attach_to_underlay(self, ns: Netns, tag: str, address: str) -> None:
        inner, outer = f"{self.lab.prefix}{tag}", f"{self.lab.prefix}{tag}b"
        run(["ip", "link", "add", inner, "netns", ns.name, "type", "veth", "peer", "name", outer,
             "netns", self.lab.gw.name])
        self.lab.gw.run("ip", "link", "set", outer, "master", self.lab.underlay_bridge)
        self.lab.gw.run("ip", "link", "set", outer, "up")
        ns.run("ip", "addr", "add", f"{address}/24", "dev", inner)
        ns.run("ip", "link", "set", inner, "up")

    def _build_node_b(self) -> None:
        lab = self.lab
        ns = Netns(f"{lab.prefix}-gwb")
        self._add_ns(ns)
        self._attach_to_underlay(ns, "nb", NODE_B_UNDERLAY)
        gw_if, inet_if = f"{lab.prefix}v0", f"{lab.prefix}v1"
        run(["ip", "link", "add", gw_if, "netns", ns.name, "type", "veth", "peer", "name", inet_if,
             "netns", lab.inet.name])
        ns.run("ip", "addr", "add", f"{UPLINK_B4}/24", "dev", gw_if)
        ns.run("ip", "-6", "addr", "add", f"{UPLINK_B6}/64", "dev", gw_if, "nodad")
        ns.run("ip", "link", "set", gw_if, "up")
        ns.run("ip", "route", "add", "default", "via", UPLINK_B_INET4)
        ns.run("ip", "-6", "route", "add", "default", "via", UPLINK_B_INET6)
        lab.inet.run("ip", "addr", "add", f"{UPLINK_B_INET4}/24", "dev", inet_if)
        lab.inet.run("ip", "-6", "addr", "add", f"{UPLINK_B_INET6}/64", "dev", inet_if, "nodad")
        lab.inet.run("ip", "link", "set", inet_if, "up")
        state = self.workdir / "node-b-state"
        state.mkdir(mode=0o700)
        # The deployment's shared server key: one device configuration works on every node.
        shutil.copy(lab.state_dir / "wg-private.key", state / "wg-private.key")
        (state / "wg-private.key").chmod(0o600)
        cfg = lab.gateway_config()
        cfg["node"] = {"name": "node-b"}
        cfg["state_dir"] = str(state)
        cfg["tunnel"] = dict(cfg["tunnel"], interface=f"{lab.prefix}wb", endpoint=f"{NODE_B_UNDERLAY}:{WG_PORT}")
        cfg["uplink"] = {"interface": gw_if}
        path = self.workdir / "kanmon-node-b.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
        self.nodes["node-b"] = Node("node-b", ns, state, path, f"{lab.prefix}wb", NODE_B_UNDERLAY)

    # -- nodes -----------------------------------------------------------------------------
    def start_node(self, name: str, timeout: float = 60) -> GatewayProcess:
        node = self.nodes[name]
        log_path = self.workdir / f"{name}.log"
        start_offset = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "a")
        env = dict(os.environ, PYTHONPATH=_project_root(), KANMON_LOG_LEVEL="info")
        proc = node.ns.popen(*self.launcher(), "run", "--config", str(node.config_path), stdout=log, env=env)
        node.gateway = GatewayProcess(proc, log_path)

        def ready() -> bool:
            return "gateway ready" in log_path.read_text(errors="replace")[start_offset:] or proc.poll() is not None

        wait_until(ready, timeout, f"gateway {name} to start")
        if proc.poll() is not None:
            raise LabError(f"gateway {name} exited with {proc.returncode}:\n{node.gateway.log_text()[-4000:]}")
        return node.gateway

    def stop_node(self, name: str) -> None:
        node = self.nodes[name]
        if node.gateway is None:
            return
        proc = node.gateway.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        node.gateway = None

    def kanmon(self, node: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """`kanmon` (through the cluster launcher) in a node's namespace."""
        env = dict(os.environ, PYTHONPATH=_project_root())
        cmd = self.nodes[node].ns.cmd(*self.launcher(), *args)
        return run(cmd, check=check, timeout=timeout, env=env)

    def peers(self, node: str) -> str:
        n = self.nodes[node]
        return n.ns.run("wg", "show", n.wg_interface, "allowed-ips", check=False).stdout

    def wait_for_peer(self, node: str, device: Device, timeout: float = 15) -> None:
        wait_until(lambda: device.public_key in self.peers(node), timeout, f"peer {device.device_id} on {node}")

    def metrics_text(self, node: str) -> str:
        return self.nodes[node].ns.run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:9180/metrics",
                                       check=False).stdout

    # -- devices ---------------------------------------------------------------------------
    def add_device(self, index: int, node: str) -> Device:
        """A device namespace on the underlay (registered by the caller, in PostgreSQL), whose
        tunnel points at `node`. Same server key on every node: only the endpoint differs."""
        device = self.lab.add_device(index, register=False)
        self.use_node(device, node)
        return device

    def use_node(self, device: Device, node: str) -> None:
        """Move a device to another node: the same configuration, another endpoint. The tunnel
        is re-established (as a phone does when it changes network or reconnects): otherwise
        WireGuard's roaming would follow the old node's next packet straight back to it."""
        peer = self.lab.gateway_public_key
        device.ns.run("wg", "set", device.wg_interface, "peer", peer, "remove")
        device.ns.run("wg", "set", device.wg_interface, "peer", peer, "endpoint", f"{self.nodes[node].underlay}:{WG_PORT}",
                      "allowed-ips", "0.0.0.0/0,::/0")
        self.device_node[device.device_id] = node

    # -- teardown --------------------------------------------------------------------------
    def teardown(self) -> None:
        for name in list(self.nodes):
            try:
                self.stop_node(name)
            except Exception:
                pass
        if self.pg is not None:
            try:
                self.pg.destroy()
            except Exception:
                pass
        self.lab.teardown()


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def wait_for_port(ns: Netns, host: str, port: int, timeout: float = 10) -> None:
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
    wait_until(lambda: ns.python(code, check=False).returncode == 0, timeout, f"{host}:{port}")
