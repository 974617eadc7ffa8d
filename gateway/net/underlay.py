"""Tunnel address -> the device's current outer (underlay) address.

WireGuard learns each peer's endpoint from its authenticated packets, so the endpoint is
where the device's tunnel really comes from right now (home router, hotel Wi-Fi, carrier).
Policy rules use it (`underlay_network`) to limit groups to approved lines. The table is
rebuilt from the interface's peer list and replaced as a whole, so a lookup never sees a
half-updated table; ``underlay_table`` is pure.
"""

from __future__ import annotations
from gateway.hostname import canonical_address

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def endpoint_address(endpoint: str | None) -> IP | None:
    """``"203.0.113.7:51820"`` / ``"[2001:db8::7]:51820"`` -> the address; None if absent or bad."""
    if not endpoint:
        return None
    host = endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 or endpoint.startswith("[") else endpoint
    return canonical_address(host.strip("[]"))


def underlay_table(peers: Mapping[str, Any]) -> dict[str, IP]:
    """Peer list (``WireGuardInterface.peers()``: objects with ``allowed_ips`` and
    ``endpoint``) -> {tunnel address text: underlay address}. Only single-address allowed IPs
    (/32, /128) name a device; peers that have not shaken hands yet have no endpoint."""
    table: dict[str, IP] = {}
    for peer in peers.values():
        outer = endpoint_address(getattr(peer, "endpoint", None))
        if outer is None:
            continue
        for net in getattr(peer, "allowed_ips", ()):
            try:
                network = ipaddress.ip_network(net, strict=False)
            except ValueError:
                continue
            if network.num_addresses == 1:
                table[str(network.network_address)] = outer
    return table


class UnderlayAddresses:
    """The table, callable as ``underlay_of(tunnel_ip)``.

    A lookup that misses (a device that has just shaken hands: its endpoint is new) reads the
    peer list at once, so the device's first DNS query is already judged by its real line --
    once per address per ``retry_after`` seconds (an address with no endpoint must not cause a
    read per query), and only while a read has been affordable (under ``sync_budget`` seconds
    last time: on a very large interface it only asks the background refresh, ``on_miss``,
    instead of stalling the event loop)."""

    def __init__(self, read_peers: Callable[[], Mapping[str, Any]] | None = None,
                 on_change: Callable[[set[str]], None] | None = None, on_miss: Callable[[], None] | None = None,
                 sync_budget: float = 0.1, retry_after: float = 1.0, clock: Callable[[], float] | None = None):
        import time
        self._table: dict[str, IP] = {}
        self.read_peers = read_peers
        self.on_change = on_change
        self.on_miss = on_miss
        self.sync_budget = sync_budget
        self.retry_after = retry_after
        self._tried: dict[str, float] = {}   # address -> when a miss last read the peer list
        self._clock = clock or time.monotonic
        self._last_read = -1e9
        self._last_cost = 0.0

    def replace(self, table: dict[str, IP]) -> set[str]:
        """Install a new table; returns (and reports to ``on_change``) the tunnel addresses
        whose underlay changed."""
        old, self._table = self._table, table
        changed = {ip for ip in old.keys() | table.keys() if old.get(ip) != table.get(ip)}
        if changed and self.on_change is not None:
            self.on_change(changed)
        return changed

    def refresh(self) -> set[str]:
        """Read the peer list now (blocking I/O: call it from a worker thread, or where
        ``_affordable`` says it is cheap)."""
        if self.read_peers is None:
            return set()
        started = self._clock()
        table = underlay_table(self.read_peers())
        self._last_cost = self._clock() - started
        self._last_read = started
        return self.replace(table)

    @property
    def last_cost(self) -> float:
        """Seconds the last peer read took (the background refresh spaces its reads by it)."""
        return self._last_cost

    def _affordable(self, addr: str) -> bool:
        if self.read_peers is None or self._last_cost > self.sync_budget:
            return False
        now = self._clock()
        if now - self._tried.get(addr, -1e9) < self.retry_after:
            return False
        if len(self._tried) > 65536:
            self._tried.clear()
        self._tried[addr] = now
        return True

    def __call__(self, tunnel_ip: str) -> IP | None:
        addr = tunnel_ip.split("%", 1)[0]
        if addr.startswith("::ffff:"):
            addr = addr[7:]
        outer = self._table.get(addr)
        if outer is None:
            if self._affordable(addr):
                try:
                    self.refresh()
                except Exception:  # the background refresh retries and logs
                    self._last_read = self._clock()
                outer = self._table.get(addr)
            if outer is None and self.on_miss is not None:
                self.on_miss()
        return outer
