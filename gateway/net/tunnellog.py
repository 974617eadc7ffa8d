"""Tunnel log, pure part: WireGuard session events for the `auth` stream.

WireGuard itself logs nothing: a peer's state is its endpoint (the outer address its last
authenticated packet came from) and the time of its latest handshake. Reading that state
every second (gateway/net/underlay.py already does, for `underlay_network` rules) and comparing
it with the previous reading gives the events the guidelines ask to keep (IPA 技術的対策
3.8.3 authentication log: time, source, user, success; NISC smartphone guide 7.3.1(4)-1 e:
the VPN's own authentication log):

* ``wireguard-handshake`` with ``kanmon.tunnel.event``: ``session-start`` (first handshake
  seen for the peer) or ``resumed`` (a handshake after more than ``gap`` seconds without one:
  WireGuard re-keys every 2 minutes while traffic flows, so a longer gap means the session
  had gone idle);
* ``wireguard-endpoint-changed``: the peer's outer address or port changed (roaming);
* ``wireguard-peer-added`` / ``wireguard-peer-removed``: the reconciler gave a device a
  peer or took it away (revoked, suspended, usage period over).

A failed handshake (unknown key, bad MAC) is dropped silently by WireGuard and never
reaches its state, so every event here has ``event.outcome: success``; refused devices show
in the firewall log once their packets arrive (`blocked-device`) and in `audit`.

Nothing here does I/O; the wall clock is passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.net.underlay import endpoint_address

SESSION_GAP_SECONDS = 180.0   # > 3 minutes without a handshake: the next one starts a new session


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    user: str
    tunnel_ip: str
    groups: tuple[str, ...] = ()


def split_endpoint(endpoint: str | None) -> tuple[str | None, int | None]:
    """``"203.0.113.7:51820"`` / ``"[2001:db8::7]:51820"`` -> (address, port)."""
    address = endpoint_address(endpoint)
    if address is None:
        return None, None
    try:
        port = int(endpoint.rsplit(":", 1)[1])
    except (ValueError, IndexError):
        port = None
    return str(address), port


@dataclass
class _Seen:
    handshake: float | None
    endpoint: str | None


class TunnelEvents:
    """Turns successive peer-list readings into auth records. ``observe`` is called from the
    underlay refresh (a worker thread, and sometimes the event loop): a lock keeps one
    reading's comparison whole. ``device_of(public_key)`` gives the device's DeviceInfo or
    None (an unknown key: logged with a null device.id)."""

    def __init__(self, device_of: Callable[[str], DeviceInfo | None], gap: float = SESSION_GAP_SECONDS):
        self.device_of = device_of
        self.gap = gap
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def observe(self, peers: Mapping[str, Any], now: datetime) -> list[dict[str, Any]]:
        """``peers``: {public key: object with ``endpoint`` and ``last_handshake`` (Unix time
        or None)}, as ``WireGuardInterface.peers()`` returns."""
        records = []
        with self._lock:
            for key, peer in peers.items():
                handshake = getattr(peer, "last_handshake", None) or None   # 0 = never
                endpoint = getattr(peer, "endpoint", None) or None
                seen = self._seen.get(key)
                if seen is None:
                    seen = self._seen[key] = _Seen(None, None)
                if handshake is not None and (seen.handshake is None or handshake > seen.handshake):
                    if seen.handshake is None:
                        records.append(self._record(key, "wireguard-handshake", endpoint, _at(handshake),
                                                    event="session-start", reason="first handshake of the session"))
                    elif handshake - seen.handshake > self.gap:
                        records.append(self._record(
                            key, "wireguard-handshake", endpoint, _at(handshake), event="resumed",
                            reason=f"handshake after {handshake - seen.handshake:.0f} s without one",
                            gap=round(handshake - seen.handshake, 3)))
                    seen.handshake = handshake
                if endpoint is not None and seen.endpoint is not None and endpoint != seen.endpoint:
                    records.append(self._record(key, "wireguard-endpoint-changed", endpoint, now,
                                                event="roamed", reason="outer address changed (roaming)",
                                                previous=seen.endpoint))
                if endpoint is not None:
                    seen.endpoint = endpoint
            for key in set(self._seen) - set(peers):
                del self._seen[key]   # the peer is gone: a later peer with this key starts afresh
        return records

    def _record(self, key: str, action: str, endpoint: str | None, at: datetime, *, event: str, reason: str,
                previous: str | None = None, gap: float | None = None) -> dict[str, Any]:
        device = self.device_of(key)
        outer, port = split_endpoint(endpoint)
        record = {
            "@timestamp": at,
            "event.dataset": "kanmon.tunnel",
            "event.action": action,
            "event.outcome": "success",
            "event.reason": reason,
            "kanmon.tunnel.event": event,
            "device.id": device.device_id if device else None,
            "user.name": device.user if device else None,
            "source.ip": outer,
            "source.port": port,
            "client.ip": outer,
            "client.port": port,
            "kanmon.tunnel.ip": device.tunnel_ip if device else None,
            "kanmon.peer.public_key": key,
        }
        if device is not None and device.groups:
            record["device.groups"] = sorted(device.groups)
        if previous is not None:
            record["kanmon.tunnel.previous_ip"], record["kanmon.tunnel.previous_port"] = split_endpoint(previous)
        if gap is not None:
            record["kanmon.tunnel.gap_seconds"] = gap
        return record


def peer_change_records(added: Iterable[DeviceInfo], removed: Iterable[tuple[DeviceInfo, str]],
                        keys: Mapping[str, str], now: datetime) -> list[dict[str, Any]]:
    """Records for peers the reconciler added or removed; ``removed`` carries the reason
    (the device's status), ``keys`` maps device id -> public key."""
    records = []
    for device, action, reason in [(d, "wireguard-peer-added", "device admitted") for d in added] + \
            [(d, "wireguard-peer-removed", f"device no longer admitted ({why})") for d, why in removed]:
        record = {
            "@timestamp": now,
            "event.dataset": "kanmon.tunnel",
            "event.action": action,
            "event.outcome": "success",
            "event.reason": reason,
            "kanmon.tunnel.event": "peer-added" if action.endswith("added") else "peer-removed",
            "device.id": device.device_id,
            "user.name": device.user,
            "source.ip": device.tunnel_ip,
            "kanmon.tunnel.ip": device.tunnel_ip,
            "kanmon.peer.public_key": keys.get(device.device_id),
        }
        if device.groups:
            record["device.groups"] = sorted(device.groups)
        records.append(record)
    return records


def _at(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)
