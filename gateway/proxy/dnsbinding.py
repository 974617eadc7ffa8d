"""Which addresses the gateway's own resolver gave each device for each name: the binding
that lets a ``no-inspect`` connection through (issue #14). Pure data, no I/O.

A ``no-inspect`` rule passes a TLS connection untouched on the strength of its SNI alone,
and the SNI is the client's word: a device could name an exempted bank in the ClientHello
and connect anywhere (a server or relay that routes by something else then serves it). So a
no-inspect connection is let through only to an address the gateway's resolver returned for
that name to that device, within the answer's lifetime (at least ``MIN_SECONDS``, since
devices keep answers a little longer than their TTL). After a gateway restart bindings are
empty until the device asks again: its no-inspect connections are then intercepted (and so
refused by pinned apps) for at most one TTL.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict


Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MIN_SECONDS = 300.0
MAX_SECONDS = 3600.0
PER_DEVICE = 4096        # bindings kept per device; the oldest go first
MAX_DEVICES = 100_000


class DnsBindings:
    def __init__(self, clock=time.monotonic, min_seconds: float = MIN_SECONDS, max_seconds: float = MAX_SECONDS,
                 per_device: int = PER_DEVICE):
        self.clock = clock
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.per_device = per_device
        self._by_device: OrderedDict[Address, OrderedDict[tuple[Address, str], float]] = OrderedDict()

    def bind(self, device: Address, name: str, address: Address, ttl: int) -> None:
        table = self._by_device.get(device)
        if table is None:
            if len(self._by_device) >= MAX_DEVICES:
                self._by_device.popitem(last=False)
            table = self._by_device[device] = OrderedDict()
        key = (address, name)
        table.pop(key, None)
        table[key] = self.clock() + min(max(float(ttl), self.min_seconds), self.max_seconds)
        while len(table) > self.per_device:
            table.popitem(last=False)

    def resolved(self, device: Address, name: str, address: Address) -> bool:
        """Did the resolver give ``address`` for ``name`` to this device, recently enough?"""
        table = self._by_device.get(device)
        if table is None:
            return False
        until = table.get((address, name))
        if until is None:
            return False
        if until < self.clock():
            del table[(address, name)]
            return False
        return True

    def forget_device(self, device: Address) -> None:
        self._by_device.pop(device, None)

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_device.values())
