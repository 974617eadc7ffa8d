"""The WireGuard interface that terminates every device's tunnel.

Kernel WireGuard where the module exists, else Debian's `wireguard-go`. Peers carry
AllowedIPs = the device's own /32 and /128, so cryptokey routing makes a packet's tunnel
source address an authenticated device identity.

Reading state goes through the `wireguard-tools` package (`WireguardDevice.get`, which
picks UAPI for wireguard-go and netlink for the kernel). Writing peers does not use its
`set_config`: over UAPI it always sends `replace_peers=true` (every device would lose its
session on each change) and writes `endpoint=None:None` for peers without an endpoint,
which wireguard-go rejects. So peer changes are sent as incremental operations: the UAPI
text protocol (documented by WireGuard's "cross-platform interface" page) for wireguard-go,
pyroute2's WireGuard netlink family for the kernel.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from wireguard_tools import WireguardDevice, WireguardKey

from gateway.i18n import Text

log = logging.getLogger("kanmon.tunnel")

UAPI_DIR = Path("/var/run/wireguard")
IFA_F_NODAD = 0x02


class TunnelError(Exception):
    """The WireGuard interface cannot be made or configured: the gateway does not start. ``text``: the reason in Japanese and English."""

    def __init__(self, message: "str | Text") -> None:
        self.text = message if isinstance(message, Text) else Text(message, message)
        super().__init__(self.text.en)


@dataclass(frozen=True)
class PeerSpec:
    public_key: str                 # base64, as `wg` prints it
    allowed_ips: tuple[str, ...]    # e.g. ("10.77.0.2/32", "fd77::2/128")


@dataclass(frozen=True)
class PeerState:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None
    last_handshake: float | None


@dataclass(frozen=True)
class PeerSyncResult:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    updated: tuple[str, ...]


def load_or_create_private_key(path: Path) -> WireguardKey:
    """The gateway's WireGuard private key, created 0600 on first start."""
    if path.exists():
        try:
            return WireguardKey(path.read_text().strip())
        except ValueError as exc:
            raise TunnelError(Text(f"{path}: WireGuard の秘密鍵ではありません ({exc})",
                                    f"{path}: not a WireGuard private key ({exc})")) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = WireguardKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(key) + "\n")
    return key


def _key_hex(b64: str) -> str:
    return WireguardKey(b64).hex


class WireGuardInterface:
    """One WireGuard interface in the current network namespace."""

    def __init__(self, name: str, implementation: str = "auto"):
        self.name = name
        self.implementation = implementation
        self.kind: str | None = None  # "kernel" | "wireguard-go" once up

    # -- lifecycle -----------------------------------------------------------------------
    def ensure(self, private_key: WireguardKey, listen_port: int, mtu: int,
               addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> str:
        """Create the interface, or take over a healthy one left by a previous run (so
        devices keep their sessions across a gateway restart). Returns the kind in use."""
        with IPRoute() as ipr:
            existing = ipr.link_lookup(ifname=self.name)
        if existing:
            kind = self._existing_kind()
            if kind is None:
                log.warning("interface %s exists but is not a working WireGuard device; recreating", self.name)
                self._delete_link()
            else:
                self.kind = kind
                log.info("reusing existing %s WireGuard interface %s", kind, self.name)
        if self.kind is None:
            self.kind = self._create()
        self._set_device(private_key, listen_port)
        self._set_link(mtu, addresses)
        return self.kind

    def _existing_kind(self) -> str | None:
        with IPRoute() as ipr:
            link = ipr.get_links(ifname=self.name)[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind == "wireguard":
            return "kernel"
        if kind == "tun" and self._uapi_alive():
            return "wireguard-go"
        return None

    def _uapi_path(self) -> Path:
        return UAPI_DIR / f"{self.name}.sock"

    def _uapi_alive(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self._uapi_path()))
            return True
        except OSError:
            return False

    def _create(self) -> str:
        if self.implementation in ("auto", "kernel"):
            try:
                with IPRoute() as ipr:
                    ipr.link("add", ifname=self.name, kind="wireguard")
                log.info("created %s with the kernel WireGuard module", self.name)
                return "kernel"
            except NetlinkError as exc:
                if self.implementation == "kernel":
                    raise TunnelError(Text(f"カーネルの WireGuard を使えません: {exc}", f"kernel WireGuard unavailable: {exc}")) from None
                log.info("kernel WireGuard unavailable (%s); using wireguard-go", exc)
        return self._create_userspace()

    def _create_userspace(self) -> str:
        binary = shutil.which("wireguard-go")
        if binary is None:
            raise TunnelError(Text("カーネルの WireGuard も wireguard-go もありません (apt-get install wireguard-go)",
                                   "no kernel WireGuard and no wireguard-go binary (apt-get install wireguard-go)"))
        sock = self._uapi_path()
        if sock.exists():
            # The control socket directory is shared by every network namespace on the host:
            # a live socket with our name belongs to an interface in another namespace.
            if self._uapi_alive():
                raise TunnelError(Text(
                    f"{sock} はこのホストの別の wireguard-go インターフェースが使っています"
                    f"(制御ソケットはネットワーク名前空間をまたいで共有されます): 重ならない tunnel.interface にしてください",
                    f"{sock} is in use by another wireguard-go interface on this host "
                    f"(control sockets are shared across network namespaces): choose a unique tunnel.interface"))
            sock.unlink()
        env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
        # wireguard-go daemonizes once the interface exists; it lives until the link is deleted.
        proc = subprocess.run([binary, self.name], env=env, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout.strip()
            raise TunnelError(Text(f"wireguard-go {self.name} が失敗しました: {detail}", f"wireguard-go {self.name} failed: {detail}"))
        for _ in range(100):
            if self._uapi_alive():
                break
            time.sleep(0.05)
        else:
            raise TunnelError(Text(f"wireguard-go は起動しましたが {sock} ができません", f"wireguard-go started but {sock} did not appear"))
        log.info("created %s with wireguard-go (userspace)", self.name)
        return "wireguard-go"

    def _set_device(self, private_key: WireguardKey, listen_port: int) -> None:
        if self.kind == "kernel":
            from pyroute2 import WireGuard
            with WireGuard() as wg:
                wg.set(self.name, private_key=str(private_key), listen_port=listen_port)
        else:
            self._uapi_set([f"private_key={private_key.hex}", f"listen_port={listen_port}"])

    def _set_link(self, mtu: int, addresses) -> None:
        for addr in addresses:
            if addr.version == 6:
                # No duplicate-address detection on a point-to-multipoint L3 tunnel: the
                # address must be usable at once, or the DNS/proxy listeners cannot bind to it.
                _write_sysctl(f"net/ipv6/conf/{self.name}/disable_ipv6", "0")
                _write_sysctl(f"net/ipv6/conf/{self.name}/accept_dad", "0")
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            ipr.link("set", index=index, mtu=mtu)
            for addr in addresses:
                try:
                    ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen,
                             **({"flags": IFA_F_NODAD} if addr.version == 6 else {}))
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
            ipr.link("set", index=index, state="up")

    def destroy(self) -> None:
        self._delete_link()
        self.kind = None

    def _delete_link(self) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if idx:
                ipr.link("del", index=idx[0])
        sock = self._uapi_path()
        for _ in range(40):  # wireguard-go removes its socket when its tun device goes away
            if not sock.exists():
                break
            time.sleep(0.05)

    # -- peers ---------------------------------------------------------------------------
    def public_key(self) -> str:
        cfg = self._read_config()
        return str(cfg.private_key.public_key()) if cfg.private_key else ""

    def _read_config(self):
        dev = WireguardDevice.get(self.name)
        try:
            return dev.get_config()
        finally:
            dev.close()

    def peers(self) -> dict[str, PeerState]:
        cfg = self._read_config()
        out = {}
        for key, peer in cfg.peers.items():
            host = peer.endpoint_host
            # IPv6 in brackets ("[2001:db8::7]:51820"): unbracketed, the port reads as part of the address
            endpoint = (f"[{host}]:{peer.endpoint_port}" if ":" in str(host) else f"{host}:{peer.endpoint_port}") \
                if host else None
            out[str(key)] = PeerState(
                public_key=str(key),
                allowed_ips=tuple(sorted(str(a) for a in peer.allowed_ips)),
                endpoint=endpoint,
                last_handshake=peer.last_handshake or None,
            )
        return out

    def sync_peers(self, desired: Mapping[str, PeerSpec]) -> PeerSyncResult:
        """Make the interface's peer set equal `desired`, touching only what differs, in
        one transaction (one UAPI message / one netlink call per changed peer)."""
        current = self.peers()
        removed = [k for k in current if k not in desired]
        added = [k for k in desired if k not in current]
        updated = [k for k in desired if k in current and tuple(sorted(desired[k].allowed_ips)) != current[k].allowed_ips]
        self._apply(remove=removed, upsert=[desired[k] for k in added + updated])
        return PeerSyncResult(tuple(added), tuple(removed), tuple(updated))

    def remove_peers(self, keys: Iterable[str]) -> None:
        self._apply(remove=list(keys), upsert=[])

    def upsert_peers(self, peers: Iterable[PeerSpec]) -> None:
        self._apply(remove=[], upsert=list(peers))

    def _apply(self, remove: list[str], upsert: list[PeerSpec]) -> None:
        if not remove and not upsert:
            return
        if self.kind == "kernel":
            from pyroute2 import WireGuard
            with WireGuard() as wg:
                for key in remove:
                    wg.set(self.name, peer={"public_key": key, "remove": True})
                for p in upsert:
                    wg.set(self.name, peer={"public_key": p.public_key, "allowed_ips": list(p.allowed_ips)})
            return
        lines: list[str] = []
        for key in remove:
            lines += [f"public_key={_key_hex(key)}", "remove=true"]
        for p in upsert:
            lines += [f"public_key={_key_hex(p.public_key)}", "replace_allowed_ips=true"]
            lines += [f"allowed_ip={a}" for a in p.allowed_ips]
        self._uapi_set(lines)

    def _uapi_set(self, lines: list[str]) -> None:
        message = "set=1\n" + "".join(line + "\n" for line in lines) + "\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self._uapi_path()))
            s.sendall(message.encode())
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        fields = dict(line.split("=", 1) for line in reply.decode().split("\n") if "=" in line)
        if fields.get("errno") != "0":
            raise TunnelError(Text(f"wireguard-go が {self.name} の設定を受け付けません: errno={fields.get('errno')}",
                                   f"wireguard-go refused configuration on {self.name}: errno={fields.get('errno')}"))


def _write_sysctl(name: str, value: str) -> None:
    try:
        Path("/proc/sys", name).write_text(value)
    except OSError as exc:
        log.warning("could not set %s=%s: %s", name, value, exc)
