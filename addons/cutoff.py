"""Cut live proxy connections: a revoked device's downloads, a failed raw TCP flow.

`flow.kill()` does not close raw TCP flows in mitmproxy (upstream issue 8045), so we cancel
the connection's I/O tasks through the proxy server's connection handlers, the same way
mitmproxy closes a connection on inactivity.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

log = logging.getLogger("kanmon.cutoff")


class ConnectionCutter:
    name = "kanmon-cutoff"

    def cut(self, client_id: str, reason: str = "cut by kanmon") -> bool:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(client_id) if proxyserver else None
        if handler is None:
            return False
        for io in list(handler.transports.values()):
            if io.handler is not None:
                io.handler.cancel(reason)
        log.info("cut connection %s: %s", client_id, reason)
        return True
