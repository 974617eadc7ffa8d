"""What the console can see of a device right now, read-only, from the host it runs on:
its WireGuard peer (outer endpoint, last handshake) and its open TCP connections through the
gateway (the kernel's socket table). Both need the gateway's network namespace (the console
runs on the management host beside the gateway); elsewhere they are simply unknown ("-")."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gateway.registry.model import DeviceRecord

log = logging.getLogger("kanmon.console.live")
ESTABLISHED = "01"


@dataclass(frozen=True)
class DeviceLive:
    endpoint: str | None = None            # the device's outer address:port as WireGuard last saw it
    last_handshake: float | None = None    # seconds since the epoch
    connections: tuple[tuple[str, int, int], ...] = ()   # (device address, device port, local port)
    known: bool = False                    # False: the peer table could not be read here


@dataclass
class LiveView:
    peers: dict = field(default_factory=dict)
    sockets: list = field(default_factory=list)
    known: bool = False

    def get(self, rec: DeviceRecord) -> DeviceLive:
        peer = self.peers.get(rec.wg_public_key) if rec.wg_public_key else None
        mine = {str(a) for a in rec.addresses}
        conns = tuple(c for c in self.sockets if c[0] in mine)
        if peer is None:
            return DeviceLive(connections=conns, known=self.known)
        return DeviceLive(peer.endpoint, peer.last_handshake, conns, True)


def _hex_address(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(words)
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


def parse_proc_tcp(text: str) -> list[tuple[str, int, int]]:
    """Established sockets of /proc/net/tcp{,6} as (remote address, remote port, local port)."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4 or parts[3] != ESTABLISHED:
            continue
        try:
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote, remote_port = parts[2].rsplit(":", 1)
            out.append((_hex_address(remote), int(remote_port, 16), local_port))
        except (ValueError, IndexError):
            continue
    return out


def live_of(cfg) -> LiveView:
    view = LiveView()
    try:
        from gateway.net.tunnelshards import ShardedTunnel
        view.peers = ShardedTunnel.existing(cfg.tunnel_shards).peers()   # issue #22: every interface of the pool
        view.known = True
    except Exception as exc:   # no such interface here, no permission: unknown, never an error page
        log.debug("peer table not readable: %s", exc)
    for name in ("tcp", "tcp6"):
        try:
            view.sockets += parse_proc_tcp(Path(f"/proc/net/{name}").read_text())
        except OSError:
            pass
    return view
