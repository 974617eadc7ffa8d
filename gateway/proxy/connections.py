"""Live client connections of the proxy, keyed by mitmproxy's client connection id.

Each entry records which device owns the connection and what was decided on it, so the
enforcer can refuse an upstream connection that no allow verdict covers, and revocation
can find every live connection of a device.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.registry.model import DeviceRecord
from gateway.verdict import CONNECTION_STAGES, Verdict

# What a connection was identified as (addons/protocol.py); None until it was.
PROTOCOL_UNIDENTIFIED = "unidentified"
PROTOCOL_MAIL = "mail"


@dataclass
class ConnectionState:
    client_id: str
    peer_ip: str
    peer_port: int
    device: DeviceRecord | None
    failed: str | None = None          # an addon raised on this connection: block everything
    blocked: Verdict | None = None     # a connection-level block (raw TCP): no upstream connection
    passing_verdicts: int = 0
    # The connection's ClientHello verdict (addons/flowverdict.py record_tls_verdict): read by
    # the access log, the DNS guards and the HTTP stage of the host rules.
    tls_verdict: Verdict | None = None
    unidentified_why: str | None = None   # why the first bytes were not TLS or HTTP (addons/protocol.py)
    # "tls", "http", "mail", "unidentified" (addons/protocol.py): an unidentified connection
    # reaches upstream only if a policy rule naming its destination allowed it, and then
    # ``unidentified_allowed_by`` holds that rule's id.
    protocol: str | None = None
    unidentified_allowed_by: str | None = None
    # The first block reached at a connection-level stage (TLS ClientHello, raw TCP): no
    # later stage of the same connection may pass anything (the strictest verdict wins).
    connection_block: Verdict | None = None
    # The connection-level block already reported to automatic quarantine (addons/autoquarantine.py).
    reported_block: Verdict | None = None

    def record(self, verdict: Verdict) -> None:
        if verdict.passes:
            self.passing_verdicts += 1
        elif self.connection_block is None and verdict.stage in CONNECTION_STAGES:
            self.connection_block = verdict

    @property
    def may_connect_upstream(self) -> bool:
        return self.failed is None and self.blocked is None and self.passing_verdicts > 0


class LiveConnections:
    def __init__(self) -> None:
        self._by_client: dict[str, ConnectionState] = {}

    def open(self, client_id: str, peer_ip: str, peer_port: int, device: DeviceRecord | None) -> ConnectionState:
        state = ConnectionState(client_id, peer_ip, peer_port, device)
        self._by_client[client_id] = state
        return state

    def get(self, client_id: str) -> ConnectionState | None:
        return self._by_client.get(client_id)

    def close(self, client_id: str) -> None:
        self._by_client.pop(client_id, None)

    def of_device(self, device_id: str) -> list[ConnectionState]:
        return [s for s in self._by_client.values() if s.device is not None and s.device.device_id == device_id]

    def all(self) -> list[ConnectionState]:
        return list(self._by_client.values())

    def of_address(self, ip: str) -> list[ConnectionState]:
        return [s for s in self._by_client.values() if s.peer_ip == ip]

    def __len__(self) -> int:
        return len(self._by_client)
