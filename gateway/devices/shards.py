"""Which WireGuard interface (and port) serves a device: its tunnel address decides (issue #22).

wireguard-go holds at most 65,536 peers on one interface, so a pool larger than that is split
into *shards*: shard i is the i-th block of ``size`` addresses of the IPv4 pool (and the same
host numbers of the IPv6 pool: the registry gives a device the IPv6 address with its IPv4 host
number, so both addresses of one device are always in the same shard). Shard 0 is the
configured interface on the configured port; shard i is the interface ``<interface>-<i>`` on
``listen_port + i``, and the port in a device's exported configuration is the endpoint's port
+ i (a NAT in front must forward the same range).

The shard is a function of the address alone (fixed at enrollment) and of the block size, not of
how many shards exist: adding devices never moves one, and a deployment whose pool fits one
block (every pool up to a /16) has exactly one interface and today's port. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.i18n import Text

# wireguard-go's MaxPeers (1 << 16 in its device package): one block never holds more.
MAX_PEERS_PER_INTERFACE = 1 << 16
MIN_PEERS_PER_INTERFACE = 4
# Bound on the number of shard interfaces (the steering table lists every possible name).
MAX_SHARDS = 256
IFNAMSIZ = 15

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ShardError(ValueError):
    """An address outside the pool, or a layout that cannot be built. ``text``: Japanese and English."""

    def __init__(self, text: Text) -> None:
        self.text = text
        super().__init__(text.en)


@dataclass(frozen=True)
class ShardLayout:
    interface: str
    listen_port: int
    ipv4_prefix: ipaddress.IPv4Network
    ipv6_prefix: ipaddress.IPv6Network | None = None
    size: int = MAX_PEERS_PER_INTERFACE   # addresses per block (a power of two)

    @property
    def count(self) -> int:
        """How many shards the pool can ever need (interfaces are made only for those in use)."""
        return max(1, -(-self.ipv4_prefix.num_addresses // self.size))

    def shard_of(self, address: Address | str) -> int:
        addr = ipaddress.ip_address(address)
        prefix = self.ipv4_prefix if addr.version == 4 else self.ipv6_prefix
        if prefix is None or addr not in prefix:
            raise ShardError(Text(f"{addr} はトンネルのアドレス範囲にありません", f"{addr} is not in the tunnel pool"))
        shard = (int(addr) - int(prefix.network_address)) // self.size
        if shard >= self.count:   # an IPv6 host number beyond the IPv4 pool: no device has it
            raise ShardError(Text(f"{addr} に対応する IPv4 アドレスがプールにありません",
                                  f"{addr} has no IPv4 counterpart in the pool"))
        return shard

    def interface_of(self, shard: int) -> str:
        return self.interface if shard == 0 else f"{self.interface}-{shard}"

    def port_of(self, shard: int) -> int:
        return self.listen_port + shard

    @property
    def interfaces(self) -> tuple[str, ...]:
        """Every interface name the pool may use, shard 0 first."""
        return tuple(self.interface_of(i) for i in range(self.count))

    def block_v4(self, shard: int) -> ipaddress.IPv4Network:
        if self.count == 1:
            return self.ipv4_prefix
        return ipaddress.IPv4Network((int(self.ipv4_prefix.network_address) + shard * self.size,
                                      32 - (self.size.bit_length() - 1)))

    def block_v6(self, shard: int) -> ipaddress.IPv6Network | None:
        if self.ipv6_prefix is None:
            return None
        if self.count == 1:
            return self.ipv6_prefix
        return ipaddress.IPv6Network((int(self.ipv6_prefix.network_address) + shard * self.size,
                                      128 - (self.size.bit_length() - 1)))

    def endpoint_for(self, endpoint: str, address: Address | str) -> str:
        """The ``host:port`` a device with this tunnel address must use: the endpoint's port
        + its shard. Shard 0 gets the endpoint unchanged; an endpoint that is not host:port is
        returned as it is, for the client-config builder to refuse with its own message."""
        shard = self.shard_of(address)
        host, sep, port = endpoint.rpartition(":")
        if shard == 0 or not sep or not port.isdigit():
            return endpoint
        if int(port) + shard > 65535:
            raise ShardError(Text(f"エンドポイントのポート {port} + {shard} が 65535 を超えます",
                                  f"endpoint port {port} + {shard} exceeds 65535"))
        return f"{host}:{int(port) + shard}"


def layout_problems(layout: ShardLayout, endpoint: str | None = None) -> list[tuple[str, Text]]:
    """Pure: what is wrong with a layout (and the devices' endpoint), as (setting, message)
    pairs for the config loader."""
    problems: list[tuple[str, Text]] = []
    size = layout.size
    if size & (size - 1) or not MIN_PEERS_PER_INTERFACE <= size <= MAX_PEERS_PER_INTERFACE:
        problems.append(("peers_per_interface", Text(
            f"{MIN_PEERS_PER_INTERFACE} から {MAX_PEERS_PER_INTERFACE:,} までの 2 のべき乗にしてください",
            f"must be a power of two from {MIN_PEERS_PER_INTERFACE} to {MAX_PEERS_PER_INTERFACE:,}")))
        return problems
    if layout.count > MAX_SHARDS:
        problems.append(("ipv4_prefix", Text(
            f"プールが大きすぎます: {layout.count} 個のインターフェースが要ります(上限 {MAX_SHARDS})",
            f"pool too large: it needs {layout.count} interfaces (at most {MAX_SHARDS})")))
    if layout.count > 1:
        last = layout.interface_of(layout.count - 1)
        if len(last) > IFNAMSIZ:
            problems.append(("interface", Text(
                f"プールが複数のインターフェースに分かれるので、名前を短くしてください({last!r} は {IFNAMSIZ} 文字を超えます)",
                f"the pool is split over several interfaces: use a shorter name ({last!r} is longer than {IFNAMSIZ})")))
        if layout.port_of(layout.count - 1) > 65535:
            problems.append(("listen_port", Text(
                f"プールが {layout.count} 個のインターフェースに分かれ、ポート {layout.listen_port} から順に使います: 65535 を超えます",
                f"the pool is split over {layout.count} interfaces on consecutive ports from {layout.listen_port}: beyond 65535")))
        port = (endpoint or "").rpartition(":")[2]
        if port.isdigit() and int(port) + layout.count - 1 > 65535:
            problems.append(("endpoint", Text(
                f"プールが {layout.count} 個のインターフェースに分かれ、端末はポート {port} から順に使います: 65535 を超えます",
                f"the pool is split over {layout.count} interfaces: devices use consecutive ports from {port}, beyond 65535")))
    return problems
