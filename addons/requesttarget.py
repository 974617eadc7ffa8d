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

from addons.flowverdict import record_verdict
from gateway.proxy.authority import MalformedAuthority, parse_authority
from gateway.proxy.connections import LiveConnections
from gateway.proxy.flowstate import METADATA_TARGET
from gateway.verdict import RULE_AUTHORITY_MISMATCH, RULE_MALFORMED_AUTHORITY, Action, Stage, Verdict



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


class RequestAuthority:
    """The authority a request is judged on is the one the upstream will see (issue #14).

    Runs before every decision addon. The Host header, an absolute-form target
    (``GET http://host/ HTTP/1.1``) and HTTP/2's ``:authority`` are parsed by the gateway's
    one strict parser (gateway/proxy/authority.py) and must name the same host and port: a
    malformed one is answered 400 (``kanmon:malformed-authority``), a disagreement 403
    (``kanmon:authority-mismatch``, the shape of a fronting attempt). An HTTP/1 absolute-form
    target is then rewritten to origin form with that authority in the Host header, so the
    upstream server cannot route by a URL host the policy never judged."""

    name = "kanmon-authority"

    def __init__(self, connections: LiveConnections | None = None):
        self.connections = connections

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        verdict = self.check(flow.request)
        if verdict is not None:
            record_verdict(flow, verdict, self.connections)

    @staticmethod
    def check(request: http.Request) -> Verdict | None:
        """None when the request's authority is sound (and now in origin form), else the
        blocking verdict."""
        hosts = request.headers.get_all("host")
        h2 = request.is_http2 or request.is_http3
        try:
            if len(hosts) > 1:
                raise MalformedAuthority(f"{len(hosts)} Host headers")
            header = parse_authority(hosts[0]) if hosts else None
            target = parse_authority(request.authority) if request.authority else None
        except MalformedAuthority as exc:
            return Verdict(Action.BLOCK, RULE_MALFORMED_AUTHORITY,
                           f"不正なホスト指定 / malformed request authority: {exc}", Stage.REQUEST)
        if header is not None and target is not None:
            scheme = request.scheme
            if header.host != target.host or header.effective_port(scheme) != target.effective_port(scheme):
                what = ":authority" if h2 else "the request target"
                return Verdict(Action.BLOCK, RULE_AUTHORITY_MISMATCH,
                               f"ホスト指定の不一致 / {what} names {target.host} but Host names {header.host}",
                               Stage.REQUEST)
        if target is not None and not h2:
            if header is None:
                request.headers["Host"] = request.authority
            request.authority = ""   # origin form towards the upstream
        return None
