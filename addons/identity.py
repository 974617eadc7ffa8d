"""Tunnel identity -> device record.

The tunnel source address is authenticated by WireGuard's cryptokey routing (each peer may
only send from its own /32 and /128), so the proxy client's address names the device.
A connection from an address that belongs to no admitted device is refused outright.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from mitmproxy import connection, dns, http, tcp, udp

from gateway.hostname import canonical_address
from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.proxy.flowstate import METADATA_DEVICE
from gateway.registry.model import DeviceRecord

log = logging.getLogger("kanmon.identity")



class DeviceDirectory:
    """Admitted devices by tunnel address. Replaced as a whole by the reconciler, so a
    lookup never sees a half-updated table."""

    def __init__(self) -> None:
        self._by_ip: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, DeviceRecord] = {}

    def replace(self, records: list[DeviceRecord]) -> None:
        table = {}
        for rec in records:
            for addr in rec.addresses:
                table[addr] = rec
        self._by_ip = table

    def update(self, admitted: list[DeviceRecord], removed: list[DeviceRecord]) -> None:
        """Apply a reconcile pass's changes. In place (issue #22: copying 200,000 entries per
        revocation cost ~100 ms of the event loop at 100,000 devices): this runs on the event
        loop, where the proxy's lookups are made, so none of them sees the table half-updated
        (the firewall-log thread's lookup, naming a dropped packet's device, is one dict read)."""
        table = self._by_ip
        for rec in removed:
            for addr in rec.addresses:  # a device's tunnel addresses never change
                if (held := table.get(addr)) is not None and held.device_id == rec.device_id:
                    del table[addr]
        for rec in admitted:
            for addr in rec.addresses:
                table[addr] = rec

    def by_ip(self, ip: str) -> DeviceRecord | None:
        addr = canonical_address(ip)
        return self._by_ip.get(addr) if addr is not None else None

    def __len__(self) -> int:
        return len(self._by_ip)


class DeviceIdentity:
    name = "kanmon-identity"

    def __init__(self, directory: DeviceDirectory, connections: LiveConnections, metrics: GatewayMetrics,
                 on_refused: Callable[[connection.Client, str], None] | None = None):
        self.directory = directory
        self.connections = connections
        self.metrics = metrics
        self.on_refused = on_refused

    def client_connected(self, client: connection.Client) -> None:
        ip, port = client.peername[0], client.peername[1]
        device = self.directory.by_ip(ip)
        self.connections.open(client.id, ip, port, device)
        if device is None:
            self.metrics.unknown_device_connections.inc()
            client.error = f"no admitted device has tunnel address {ip}"
            log.warning("refused connection from %s: no admitted device", ip)
            if self.on_refused:
                self.on_refused(client, client.error)

    def client_disconnected(self, client: connection.Client) -> None:
        self.connections.close(client.id)

    def _annotate(self, flow) -> None:
        state = self.connections.get(flow.client_conn.id)
        if state is not None and state.device is not None:
            flow.metadata[METADATA_DEVICE] = state.device

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._annotate(flow)

    def udp_start(self, flow: udp.UDPFlow) -> None:
        self._annotate(flow)

    def dns_request(self, flow: dns.DNSFlow) -> None:
        self._annotate(flow)
