"""The WireGuard interface that terminates every device's tunnel.

Kernel WireGuard where the module exists, else Debian's `wireguard-go`. Peers carry
AllowedIPs = the device's own /32 and /128, so cryptokey routing makes a packet's tunnel
source address an authenticated device identity.

Reading state goes through the `wireguard-tools` package (`WireguardDevice.get`, which
picks UAPI for wireguard-go and netlink for the kernel), except the peer list of a
wireguard-go interface: that is read every second (underlay addresses, tunnel log) and at
every full reconcile, and with 100,000 peers the package's general parser (an attrs object,
a key object and an `ip_interface` per line) costs seconds. `parse_uapi_peers` reads the
UAPI reply block by block and re-parses only the peers whose block changed since the last
read (a peer without traffic yields the same text every time). Writing peers does not use its
`set_config`: over UAPI it always sends `replace_peers=true` (every device would lose its
session on each change) and writes `endpoint=None:None` for peers without an endpoint,
which wireguard-go rejects. So peer changes are sent as incremental operations: the UAPI
text protocol (documented by WireGuard's "cross-platform interface" page) for wireguard-go,
pyroute2's WireGuard netlink family for the kernel.
"""

from __future__ import annotations

import base64
import binascii
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
# wireguard-go refuses a peer beyond this many on one interface (MaxPeers = 1 << 16 in its
# device package; seen here: the 65,537th `public_key=` line closes the control socket). The
# kernel module holds 2^20.
WIREGUARD_GO_MAX_PEERS = 1 << 16
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
    """Base64 public key -> the hex form UAPI speaks. Plain base64 (not `WireguardKey`, which
    builds an attrs object per key: 100,000 of them at start-up); still refuses anything
    that is not exactly 32 bytes."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise TunnelError(Text(f"WireGuard の公開鍵ではありません: {b64!r}", f"not a WireGuard public key: {b64!r}"))
    return raw.hex()


def _key_b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


def _peer_from_block(block: str) -> PeerState:
    """One peer's lines of a UAPI `get` reply (from its public_key= line on)."""
    key = endpoint = None
    allowed: list[str] = []
    sec = nsec = 0
    for line in block.split("\n"):
        name, _, value = line.partition("=")
        if name == "allowed_ip":
            allowed.append(value)
        elif name == "public_key":
            key = _key_b64(value)
        elif name == "endpoint":
            endpoint = value or None   # "1.2.3.4:51820", "[2001:db8::7]:51820" as wireguard-go prints them
        elif name == "last_handshake_time_sec":
            sec = int(value)
        elif name == "last_handshake_time_nsec":
            nsec = int(value)
        elif name == "protocol_version" and value != "1":
            raise TunnelError(Text(f"想定外の WireGuard UAPI プロトコル版 {value}", f"unexpected WireGuard UAPI protocol version {value}"))
    handshake = sec + nsec * 1e-9
    return PeerState(key, tuple(sorted(allowed)), endpoint, handshake or None)


def parse_uapi_peers(reply: str, previous: Mapping[str, tuple[str, PeerState]] | None = None
                     ) -> tuple[dict[str, PeerState], dict[str, tuple[str, PeerState]]]:
    """Pure: a UAPI `get` reply -> ({base64 key: PeerState}, cache for the next call). A peer
    whose block is the same text as in `previous` keeps its parsed state (no re-parse).
    Raises TunnelError when the reply reports an error or is cut short."""
    previous = previous or {}
    body, sep, tail = reply.rpartition("errno=")
    if not sep or tail.strip() != "0":
        code = tail.strip() or "(none)"
        raise TunnelError(Text(f"wireguard-go がピア一覧の読み出しを拒否しました: errno={code}",
                               f"wireguard-go refused the peer read: errno={code}"))
    peers: dict[str, PeerState] = {}
    cache: dict[str, tuple[str, PeerState]] = {}
    for block in body.split("public_key=")[1:]:
        hex_key = block[:64]
        old = previous.get(hex_key)
        state = old[1] if old is not None and old[0] == block else _peer_from_block("public_key=" + block.rstrip("\n"))
        cache[hex_key] = (block, state)
        peers[state.public_key] = state
    return peers, cache


class WireGuardInterface:
    """One WireGuard interface in the current network namespace."""

    # Bytes of one UAPI `set` message at most (about 2,000 peers): wireguard-go applies a
    # message line by line while the sender waits, so a start-up with 100,000 peers is sent as
    # a series of bounded messages, each answered well within the socket timeout.
    UAPI_SET_BYTES = 256 * 1024
    UAPI_TIMEOUT_SECONDS = 30.0

    def __init__(self, name: str, implementation: str = "auto"):
        self.name = name
        self.implementation = implementation
        self.kind: str | None = None  # "kernel" | "wireguard-go" once up
        self._peer_cache: dict[str, tuple[str, PeerState]] = {}   # parse_uapi_peers' cache

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
        if self.kind == "wireguard-go":
            peers, self._peer_cache = parse_uapi_peers(self._uapi_get(), self._peer_cache)
            return peers
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

    def sync_peers(self, desired: Mapping[str, PeerSpec], add: bool = True) -> PeerSyncResult:
        """Make the interface's peer set equal `desired`, touching only what differs (set
        differences; UAPI messages of about 2,000 peers, removals first / one netlink call
        per changed peer). `add=False` only removes the peers `desired` does not hold (the
        fail-closed half, when the rest of a pass failed)."""
        current = self.peers()
        removed = [k for k in current if k not in desired]
        if not add:
            self._apply(remove=removed, upsert=[])
            return PeerSyncResult((), tuple(removed), ())
        if self.kind == "wireguard-go" and len(desired) > WIREGUARD_GO_MAX_PEERS:
            # Removals still happen (fail closed); no device is added beyond what fits.
            self._apply(remove=removed, upsert=[])
            raise TunnelError(Text(
                f"{len(desired):,} 台の端末が接続を許可されていますが、wireguard-go は 1 つのインターフェースに "
                f"{WIREGUARD_GO_MAX_PEERS:,} 台までしか登録できません。カーネルの WireGuard を使ってください "
                "(tunnel.implementation: kernel)。追加分の端末は接続できません。",
                f"{len(desired):,} devices are admitted, but wireguard-go holds at most {WIREGUARD_GO_MAX_PEERS:,} peers "
                "on one interface: use kernel WireGuard (tunnel.implementation: kernel). The devices beyond "
                "that are not connected."))
        added = [k for k in desired if k not in current]
        updated = [k for k in desired if k in current and differs(desired[k].allowed_ips, current[k].allowed_ips)]
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
        # Removals first (a revoked key never outlives a failed later message), then the
        # upserts; each peer's lines stay in one message.
        for message in uapi_set_messages(remove, upsert, self.UAPI_SET_BYTES):
            self._uapi_set_message(message)

    def _uapi_set(self, lines: list[str]) -> None:
        self._uapi_set_message("set=1\n" + "".join(line + "\n" for line in lines) + "\n")

    def _uapi_exchange(self, message: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.UAPI_TIMEOUT_SECONDS)
            s.connect(str(self._uapi_path()))
            try:
                s.sendall(message.encode())
            except (BrokenPipeError, ConnectionResetError):
                # wireguard-go answers an error and closes before reading the rest: report its errno
                pass
            chunks: list[bytes] = []
            tail = b""
            while not tail.endswith(b"\n\n"):
                try:
                    chunk = s.recv(1 << 20)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                chunks.append(chunk)
                tail = (tail + chunk)[-2:]
        return b"".join(chunks).decode()

    def _uapi_get(self) -> str:
        reply = self._uapi_exchange("get=1\n\n")
        if not reply.endswith("\n\n"):
            raise TunnelError(Text(f"wireguard-go が {self.name} のピア一覧を途中で閉じました",
                                   f"wireguard-go closed the peer read on {self.name} early"))
        return reply

    def _uapi_set_message(self, message: str) -> None:
        reply = self._uapi_exchange(message)
        fields = dict(line.split("=", 1) for line in reply.split("\n") if "=" in line)
        if fields.get("errno") != "0":
            raise TunnelError(Text(f"wireguard-go が {self.name} の設定を受け付けません: errno={fields.get('errno')}",
                                   f"wireguard-go refused configuration on {self.name}: errno={fields.get('errno')}"))


def differs(desired: Iterable[str], current: tuple[str, ...]) -> bool:
    """Do two AllowedIPs lists name different networks? Text first (both sides print the
    canonical form, so this is the common answer), parsed only when the texts differ."""
    if tuple(sorted(desired)) == current:
        return False
    try:
        return sorted(str(ipaddress.ip_network(a, strict=False)) for a in desired) != \
            sorted(str(ipaddress.ip_network(a, strict=False)) for a in current)
    except ValueError:
        return True


def uapi_set_messages(remove: Iterable[str], upsert: Iterable[PeerSpec], max_bytes: int) -> list[str]:
    """Pure: the UAPI `set` messages for these changes, removals first, each message holding
    whole peers and at most about `max_bytes` (one peer's lines are never split)."""
    messages: list[str] = []
    lines: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal lines, size
        if lines:
            messages.append("set=1\n" + "".join(line + "\n" for line in lines) + "\n")
        lines, size = [], 0

    def add(peer_lines: list[str]) -> None:
        nonlocal size
        length = sum(len(line) + 1 for line in peer_lines)
        if lines and size + length > max_bytes:
            flush()
        lines.extend(peer_lines)
        size += length

    for key in remove:
        add([f"public_key={_key_hex(key)}", "remove=true"])
    for p in upsert:
        add([f"public_key={_key_hex(p.public_key)}", "replace_allowed_ips=true", *(f"allowed_ip={a}" for a in p.allowed_ips)])
    flush()
    return messages


def _write_sysctl(name: str, value: str) -> None:
    try:
        Path("/proc/sys", name).write_text(value)
    except OSError as exc:
        log.warning("could not set %s=%s: %s", name, value, exc)
