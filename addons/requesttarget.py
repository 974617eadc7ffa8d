"""What a request is for: its host (from the Host header / :authority, as mitmproxy's
``pretty_host``) and its full URL (``pretty_url``), worked out once per request.

Several addons ask for both (the policy decision, the quarantine gate, the block page, the
access log), and mitmproxy parses the authority again on every access: that was about 4 %
of the gateway's time under load (py-spy, bench/proxy.py). The answer is kept in the flow's
metadata together with the request fields it came from, and recomputed as soon as any of
them is a different object (an addon rewrote the Host header, the path, the scheme ...), so
a changed request is never judged or logged under its old URL.
"""

from __future__ import annotations

from mitmproxy import http

METADATA_TARGET = "kanmon.request_target"


def _fields(request: http.Request) -> tuple:
    data = request.data
    return (data.headers.fields, data.host, data.port, data.path, data.scheme, data.authority,
            data.http_version, data.method)


def request_target(flow: http.HTTPFlow) -> tuple[str, str]:
    """``(flow.request.pretty_host, flow.request.pretty_url)``, computed once while the
    request is unchanged."""
    request = flow.request
    fields = _fields(request)
    held = flow.metadata.get(METADATA_TARGET)
    if held is not None:
        seen = held[0]
        # Identity, not equality: a setter stores a new object, so "the same objects" means
        # "not touched since"; an equal new object merely costs a recomputation.
        if all(a is b for a, b in zip(seen, fields)):
            return held[1], held[2]
    host, url = request.pretty_host, request.pretty_url
    flow.metadata[METADATA_TARGET] = (fields, host, url)
    return host, url
