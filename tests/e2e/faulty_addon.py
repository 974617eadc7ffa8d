"""An extra addon that raises on purpose (loaded through `addons.extra` in the config):
proves that an exception in any addon blocks the connection instead of passing it."""

from mitmproxy import http


class ExplodeOnMarkedRequest:
    name = "test-explode"

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if "/explode" in flow.request.path:
            raise RuntimeError("deliberate failure for the fail-closed test")
