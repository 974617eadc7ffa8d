"""The device tunnel as one or more WireGuard interfaces: one per shard of the pool (issue #22).

wireguard-go holds at most 65,536 peers on one interface. `gateway/devices/shards.py` says which
interface serves which addresses (a block of the pool per interface, a port per interface); this
module keeps one `WireGuardInterface` per shard in use and offers the same methods as a single
interface, so the reconciler, the underlay/tunnel-log reads and the start-up do not care how many
there are:

- shard 0 is the configured interface with the gateway's addresses and the whole pool's route;
  shard i (made only once a device of block i is admitted, or taken over when a previous run left
  it) gets the gateway's addresses as /32 and /128 (nftables' `redirect` needs an address on the
  incoming interface) and the routes of its block, which are more specific than shard 0's;
- every interface has the same private key: a device's configuration names one gateway key;
- a peer goes to the shard of its IPv4 AllowedIP (its IPv6 one is in the same shard);
- peer syncs and reads run on every shard at once (each wireguard-go is its own process, so a
  100,000-device start-up loads both halves in parallel); a shard that fails does not stop the
  others' removals, and the first failure is raised after all of them ran (fail closed).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from pyroute2 import IPRoute, NetlinkError
from wireguard_tools import WireguardKey

from gateway.devices.shards import ShardLayout
from gateway.i18n import Text
from gateway.net.tunnel import PeerSpec, PeerState, PeerSyncResult, TunnelError, WireGuardInterface

log = logging.getLogger("kanmon.tunnel")


class ShardedTunnel:
    def __init__(self, layout: ShardLayout, implementation: str = "auto",
                 build: Callable[[int], WireGuardInterface] | None = None):
        self.layout = layout
        # build(shard) -> its interface, up: tests give one without netlink; None makes it (below)
        self._build = build if build is not None else self._bring_up
        self.implementation = implementation
        self.shards: dict[int, WireGuardInterface] = {}
        self._key_shard: dict[str, int] = {}     # public key -> shard it was put on / read from
        self._setup: tuple[WireguardKey, int, list] | None = None
        self._lock = threading.Lock()             # shard creation, _key_shard updates

    @classmethod
    def existing(cls, layout: ShardLayout, implementation: str = "auto") -> "ShardedTunnel":
        """The interfaces a running gateway made, for reading their peers from another process
        (the console's live view); nothing is created or changed."""
        tunnel = cls(layout, implementation)
        with IPRoute() as ipr:
            present = [i for i in range(layout.count) if ipr.link_lookup(ifname=layout.interface_of(i))]
        for shard in present:
            iface = WireGuardInterface(layout.interface_of(shard), implementation)
            iface.kind = iface._existing_kind()
            tunnel.shards[shard] = iface
        return tunnel

    @property
    def name(self) -> str:
        return self.layout.interface

    @property
    def kind(self) -> str | None:
        first = self.shards.get(0)
        return first.kind if first is not None else None

    @property
    def interfaces(self) -> tuple[str, ...]:
        return tuple(self.layout.interface_of(i) for i in sorted(self.shards))

    # -- lifecycle -----------------------------------------------------------------------
    def ensure(self, private_key: WireguardKey, listen_port: int, mtu: int, addresses: Iterable) -> str:
        """Shard 0 (the configured interface, `listen_port`), and every other shard interface a
        previous run left (its peers are then checked by the first full pass like shard 0's)."""
        if listen_port != self.layout.listen_port:
            raise TunnelError(Text(f"ポート {listen_port} が設定 ({self.layout.listen_port}) と違います",
                                   f"port {listen_port} differs from the layout's {self.layout.listen_port}"))
        self._setup = (private_key, mtu, list(addresses))
        kind = self._make(0).kind
        with IPRoute() as ipr:
            leftovers = [i for i in range(1, self.layout.count) if ipr.link_lookup(ifname=self.layout.interface_of(i))]
        for shard in leftovers:
            self._make(shard)
        return kind

    def _make(self, shard: int) -> WireGuardInterface:
        with self._lock:
            if shard not in self.shards:
                self.shards[shard] = self._build(shard)
            return self.shards[shard]

    def _bring_up(self, shard: int) -> WireGuardInterface:
        if self._setup is None:
            raise TunnelError(Text("トンネルがまだ作られていません", "the tunnel is not up yet"))
        key, mtu, addresses = self._setup
        iface = WireGuardInterface(self.layout.interface_of(shard), self.implementation)
        if shard == 0:
            iface.ensure(key, self.layout.port_of(0), mtu, addresses)
            return iface
        own = [ipaddress.ip_interface(f"{a.ip}/{a.max_prefixlen}") for a in addresses]
        iface.ensure(key, self.layout.port_of(shard), mtu, own)
        _route(iface.name, [b for b in (self.layout.block_v4(shard), self.layout.block_v6(shard)) if b is not None])
        log.info("tunnel shard %d: %s on port %d for %s", shard, iface.name, self.layout.port_of(shard),
                 self.layout.block_v4(shard))
        return iface

    def destroy(self) -> None:
        for shard in sorted(self.shards, reverse=True):
            self.shards[shard].destroy()
        self.shards.clear()

    # -- peers ---------------------------------------------------------------------------
    def public_key(self) -> str:
        """From the private key given to ensure() (every shard has it): reading it back from
        wireguard-go would parse every peer of the interface too."""
        if self._setup is not None:
            return str(self._setup[0].public_key())
        return WireGuardInterface(self.name).public_key()

    def shard_of_spec(self, spec: PeerSpec) -> int:
        v4 = next((a for a in spec.allowed_ips if ":" not in a), None)
        if v4 is None:
            raise TunnelError(Text(f"ピア {spec.public_key} に IPv4 アドレスがありません",
                                   f"peer {spec.public_key} has no IPv4 address"))
        return self.layout.shard_of(v4.split("/")[0])

    def _each(self, shards: Iterable[int], work) -> dict[int, object]:
        """work(shard) on every shard at once; all run to the end, then the first error is raised."""
        shards = sorted(shards)
        if len(shards) <= 1:
            return {s: work(s) for s in shards}
        results, errors = {}, []
        with ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="wg-shard") as pool:
            futures = {s: pool.submit(work, s) for s in shards}
            for s, future in futures.items():
                try:
                    results[s] = future.result()
                except Exception as exc:
                    errors.append(exc)
        if errors:
            for extra in errors[1:]:
                log.error("tunnel shard: also failed: %s", extra)
            raise errors[0]
        return results

    def peers(self) -> dict[str, PeerState]:
        read = self._each(list(self.shards), lambda s: self.shards[s].peers())
        out: dict[str, PeerState] = {}
        key_shard = {}
        for shard, peers in read.items():
            out.update(peers)
            key_shard.update(dict.fromkeys(peers, shard))
        with self._lock:
            self._key_shard.update(key_shard)
        return out

    def _split(self, specs: Iterable[PeerSpec]) -> dict[int, list[PeerSpec]]:
        by_shard: dict[int, list[PeerSpec]] = {}
        for spec in specs:
            by_shard.setdefault(self.shard_of_spec(spec), []).append(spec)
        return by_shard

    def sync_peers(self, desired: Mapping[str, PeerSpec], add: bool = True) -> PeerSyncResult:
        """Every shard's peer set equal to its part of `desired` (see WireGuardInterface.sync_peers);
        shards without any desired peer are emptied, a missing shard with desired peers is made."""
        by_shard = self._split(desired.values())
        if add:
            for shard in sorted(by_shard):
                if shard not in self.shards:
                    self._make(shard)
        work_on = set(self.shards)

        def sync(shard: int) -> PeerSyncResult:
            return self.shards[shard].sync_peers({p.public_key: p for p in by_shard.get(shard, ())}, add=add)

        results = self._each(work_on, sync)
        with self._lock:
            for shard, specs in by_shard.items():
                if shard in work_on:
                    self._key_shard.update(dict.fromkeys((p.public_key for p in specs), shard))
        return PeerSyncResult(*(tuple(k for r in results.values() for k in getattr(r, field))
                                for field in ("added", "removed", "updated")))

    def remove_peers(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        with self._lock:
            unknown = [k for k in keys if k not in self._key_shard]
        if unknown:
            self.peers()   # learn where they are (a key on no interface is not sent anywhere)
        by_shard: dict[int, list[str]] = {}
        with self._lock:
            for k in keys:
                if (shard := self._key_shard.get(k)) is not None and shard in self.shards:
                    by_shard.setdefault(shard, []).append(k)
        self._each(by_shard, lambda s: self.shards[s].remove_peers(by_shard[s]))
        with self._lock:
            for k in keys:
                self._key_shard.pop(k, None)

    def upsert_peers(self, peers: Iterable[PeerSpec]) -> None:
        by_shard = self._split(peers)
        # A peer that moved to another shard (its address changed) leaves the old one first.
        with self._lock:
            moved = [(old, p.public_key) for shard, specs in by_shard.items() for p in specs
                     if (old := self._key_shard.get(p.public_key)) is not None and old != shard]
        for old, key in moved:
            if old in self.shards:
                self.shards[old].remove_peers([key])
        for shard in sorted(by_shard):
            if shard not in self.shards:
                self._make(shard)
        self._each(by_shard, lambda s: self.shards[s].upsert_peers(by_shard[s]))
        with self._lock:
            for shard, specs in by_shard.items():
                self._key_shard.update(dict.fromkeys((p.public_key for p in specs), shard))


def _route(ifname: str, blocks: list) -> None:
    """The routes of a shard's address blocks through its interface (replaced if present)."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for block in blocks:
            try:
                ipr.route("replace", dst=str(block), oif=index,
                          family=socket.AF_INET6 if block.version == 6 else socket.AF_INET)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise TunnelError(Text(f"{ifname} に {block} の経路を設定できません: {exc}",
                                           f"cannot route {block} through {ifname}: {exc}")) from None
