"""mitmproxy inside the gateway process, configured in code.

Only the mitmproxy addons the data path needs are loaded (no web UI, no scripting, no
replay, no flow storage). Kanmon's own addons sit between mitmproxy's connection machinery
and its DNS resolver, so every DNS query is decided before it is resolved.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import dns as mitm_dns
from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, dns_resolver, next_layer, proxyserver, strip_dns_https_records
from mitmproxy.master import Master

from gateway.proxy import dnslistener, interceptca
from gateway.proxy.certcache import DEFAULT_LEAF_CERT_CACHE, CachingTlsConfig
from gateway.proxy.dispatch import IndexedAddonManager
from gateway.config import GatewayConfig

log = logging.getLogger("kanmon.proxy")


class ProxyStartError(Exception):
    pass


@dataclass(frozen=True)
class ProxySettings:
    """The mitmproxy options Kanmon sets, derived from the gateway config."""

    modes: tuple[str, ...]
    confdir: str
    connection_strategy: str
    dns_name_servers: tuple[str, ...]
    upstream_ca: str | None
    tcp_timeout: int
    # Bodies up to this many bytes are held whole before they are sent; above, they stream.
    # With download scanning (issue #18, addons/scan.py) at least scan.max_bytes, so a file is
    # scanned before any of it reaches the device.
    stream_large_bodies: int = 2 * 1024 * 1024
    # The interception CA's key type when it is created (an existing CA is kept) and how many
    # leaf certificates are kept (gateway/proxy/interceptca.py, gateway/proxy/certcache.py).
    ca_key: str = interceptca.DEFAULT_CA_KEY
    leaf_cert_cache: int = DEFAULT_LEAF_CERT_CACHE

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> "ProxySettings":
        return cls(
            # Listen on every address (both stacks); nftables admits only redirected tunnel
            # traffic to these ports.
            modes=(f"transparent@{cfg.transparent_port}", f"dns@{cfg.dns_port}"),
            confdir=str(cfg.mitmproxy_confdir),
            # lazy: no upstream connection is opened before the request has been decided, so
            # a blocked request never reaches (or even touches) the server. The price: the
            # interception certificate is made from SNI alone, without the upstream's.
            connection_strategy=cfg.connection_strategy,
            dns_name_servers=cfg.upstream_dns,
            upstream_ca=str(cfg.upstream_ca_bundle) if cfg.upstream_ca_bundle else None,
            tcp_timeout=cfg.tcp_timeout,
            stream_large_bodies=max(2 * 1024 * 1024, cfg.scan.max_bytes if getattr(cfg, "scan", None) else 0),
            ca_key=cfg.proxy_ca_key,
            leaf_cert_cache=cfg.leaf_cert_cache,
        )

    def option_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "mode": list(self.modes),
            "confdir": self.confdir,
            "connection_strategy": self.connection_strategy,
            "dns_name_servers": list(self.dns_name_servers),
            # The gateway's own /etc/hosts is not the devices' business.
            "dns_use_hosts_file": not self.dns_name_servers,
            "tcp_timeout": self.tcp_timeout,
            "http3": False,           # QUIC is rejected at the firewall; clients use TCP
            "stream_large_bodies": str(self.stream_large_bodies),  # bigger bodies stream instead of filling memory
            "strip_ech": True,
        }
        if self.upstream_ca:
            values["ssl_verify_upstream_trusted_ca"] = self.upstream_ca
        return values


# Kernel accept queue of the TCP listeners. asyncio listens with 100: in the lab, while one
# device opened connections faster than the loop accepted them, the queue overflowed and the
# other device's SYNs were dropped and retried only 1-3 s later (issue #14). A single device's
# flood is kept out of the queue by the kernel backstop (gateway/net/limitsnft.py); the longer queue
# (the kernel caps it at net.core.somaxconn) absorbs bursts of many devices at once, e.g. all of
# them reconnecting after a restart. asyncio still accepts at most 100 per loop pass.
LISTEN_BACKLOG = 4096


def deepen_accept_queues(servers, backlog: int = LISTEN_BACKLOG) -> int:
    """listen() again with a longer queue on every TCP listening socket of `servers`
    (mitmproxy server instances); returns how many sockets were changed."""
    changed = 0
    for instance in servers:
        for server in getattr(instance, "_servers", ()):
            for sock in getattr(server, "sockets", ()) or ():
                if sock.type != socket.SOCK_STREAM:
                    continue
                with sock.dup() as dup:   # asyncio hands out a wrapper without listen()
                    dup.listen(backlog)
                changed += 1
    return changed


UPSTREAM_DNS_TIMEOUT = 3.0   # seconds; a device's stub resolver gives up after ~5 s per try


class BoundedDnsResolver(dns_resolver.DnsResolver):
    """mitmproxy's resolver with a deadline on each A/AAAA answer.

    With the upstream resolver down, mitmproxy's resolver (hickory, no timeout option)
    answered SERVFAIL only after about 15 s, so devices saw their own timeouts and retried
    (found by tests/e2e/test_faults.py). Now they get SERVFAIL within UPSTREAM_DNS_TIMEOUT,
    and the operator gets a warning (at most one per LOG_EVERY seconds)."""

    name = "dnsresolver"
    LOG_EVERY = 10.0

    def __init__(self) -> None:
        self._last_warning = float("-inf")

    async def resolve(self, message):  # type: ignore[override]
        try:
            return await asyncio.wait_for(super().resolve(message), UPSTREAM_DNS_TIMEOUT)
        except TimeoutError:
            now = asyncio.get_running_loop().time()
            if now - self._last_warning >= self.LOG_EVERY:
                self._last_warning = now
                log.warning("upstream DNS did not answer within %.0f s (e.g. %s): devices get SERVFAIL",
                            UPSTREAM_DNS_TIMEOUT, message.question.name if message.question else "?")
            return message.fail(mitm_dns.response_codes.SERVFAIL)


def build_master(settings: ProxySettings, chain: Sequence[Any], layer_decision: Any | None = None) -> Master:
    """A mitmproxy master with our addon chain; call from inside the running event loop.

    ``layer_decision`` replaces mitmproxy's NextLayer addon: the gateway passes its
    protocol identification (addons/protocol.py), which denies what it cannot identify."""
    dnslistener.install()  # see gateway/proxy/dnslistener.py: DNS over UDP must survive idle pauses
    # Before mitmproxy loads its confdir, which would make an RSA CA when there is none.
    in_use, created = interceptca.ensure_ca(Path(settings.confdir), settings.ca_key)
    if created:
        log.info("interception CA created (%s) in %s", in_use, settings.confdir)
    elif in_use != settings.ca_key:
        log.warning("the interception CA in %s is %s, proxy.ca_key asks for %s: the existing CA is kept "
                    "(the devices trust it); to change it, move the mitmproxy-ca* files away and give the "
                    "devices the new CA", settings.confdir, in_use, settings.ca_key)
    master = Master(options.Options(), event_loop=asyncio.get_running_loop(), with_termlog=False)
    master.addons = IndexedAddonManager(master)   # only the addons that implement a hook are visited
    master.addons.add(core.Core(), proxyserver.Proxyserver(), layer_decision or next_layer.NextLayer(),
                      CachingTlsConfig(settings.leaf_cert_cache), disable_h2c.DisableH2C())
    master.addons.add(*chain)
    master.addons.add(strip_dns_https_records.StripDnsHttpsRecords(), BoundedDnsResolver())
    master.options.update(**settings.option_values())
    return master


async def wait_for_listeners(master: Master, run_task: asyncio.Task, timeout: float = 15.0) -> None:
    """mitmproxy logs a listen failure and keeps running without that server; a gateway
    must not run half-bound, so wait until every configured server is up, or fail."""
    ps = master.addons.get("proxyserver")
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if run_task.done():
            exc = run_task.exception()
            raise ProxyStartError(f"proxy stopped during start-up: {exc!r}")
        servers = list(ps.servers)
        if servers and all(s.is_running for s in servers) and len(servers) == len(master.options.mode):
            for s in servers:
                log.info("proxy listening: %s on %s", s.mode.description, s.listen_addrs)
            deepen_accept_queues(servers)
            return
        await asyncio.sleep(0.05)
    states = {s.mode.full_spec: s.is_running for s in ps.servers}
    raise ProxyStartError(f"proxy listeners did not start: {states}")
