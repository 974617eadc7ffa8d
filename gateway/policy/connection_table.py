"""Per-connection cache of path-independent decisions, keyed by (device id, host).

Tied to one snapshot: a reload makes a new table (``for_snapshot``), so no verdict of an old
policy outlives the swap. ``invalidate(device_id)`` drops a device's entries when its record
changes (group, posture, quarantine). Entries also lapse when a rule expires.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from datetime import datetime
from threading import Lock

from gateway.policy.query import DeviceContext
from gateway.policy.snapshot import PolicySnapshot
from gateway.verdict import Stage, Verdict

_PATH_DEPENDENT = object()  # cached "the path matters here", so it is not recomputed


class ConnectionTable:
    def __init__(self, snapshot: PolicySnapshot, max_entries: int = 65536):
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.snapshot = snapshot
        self.version = snapshot.version
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = Lock()
        self._horizon: datetime | None = None
        self._horizon_set = False
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_snapshot(cls, snapshot: PolicySnapshot, max_entries: int = 65536) -> "ConnectionTable":
        return cls(snapshot, max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, device: DeviceContext, host: str, stage: Stage, now: datetime) -> Verdict | None:
        """The cached or freshly computed host verdict; ``None`` when the caller must run
        the full ``snapshot.decide`` because path or content can change the outcome."""
        key = (device.device_id, host)
        with self._lock:
            if not self._horizon_set or (self._horizon is not None and now >= self._horizon):
                self._entries.clear()
                self._horizon = self.snapshot.next_expiry(now)
                self._horizon_set = True
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                if cached is _PATH_DEPENDENT:
                    return None
                assert isinstance(cached, Verdict)
                return cached if cached.stage is stage else replace(cached, stage=stage)
        self.misses += 1
        verdict = self.snapshot.host_verdict(device, host, stage, now)
        with self._lock:
            self._entries[key] = verdict if verdict is not None else _PATH_DEPENDENT
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return verdict

    def invalidate(self, device_id: str) -> int:
        """Drop every entry of one device; returns how many were dropped."""
        with self._lock:
            doomed = [k for k in self._entries if k[0] == device_id]
            for k in doomed:
                del self._entries[k]
        return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
