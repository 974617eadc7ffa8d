"""Where a flow's verdict is kept, and the one rule by which verdicts combine.

Several addons decide on the same flow (the request's authority, the policy, DNS-bypass
and no-inspect guards, quarantine, mail, sign-in); the enforcer acts on the result. Each of
them records its verdict here, and ``strictest`` decides what stands: a block already
reached is never loosened by an addon that runs later (issue #14, "identify or deny"). The
connection's state keeps the first connection-level block (TLS ClientHello, raw TCP), which
the enforcer applies to every later request of the connection.
"""

from __future__ import annotations

from gateway.proxy.connections import ConnectionState, LiveConnections
from gateway.proxy.flowstate import METADATA_VERDICT
from gateway.verdict import Verdict, strictest



def record_verdict(flow, verdict: Verdict, connections: LiveConnections | None, *,
                   served_by_gateway: bool = False) -> Verdict:
    """Combine ``verdict`` with what the flow holds, store and return the result.

    ``served_by_gateway``: the gateway answers the request itself (its sign-in portal);
    nothing goes upstream, so an earlier block of the name does not apply."""
    held = flow.metadata.get(METADATA_VERDICT)
    if served_by_gateway:
        flow.metadata[METADATA_VERDICT] = verdict
        return verdict
    verdict = strictest(held if isinstance(held, Verdict) else None, verdict)
    state = connections.get(flow.client_conn.id) if connections is not None else None
    if state is not None:
        verdict = strictest(state.connection_block, verdict)
    flow.metadata[METADATA_VERDICT] = verdict
    if state is not None:
        state.record(verdict)
    return verdict


def record_tls_verdict(state: ConnectionState, verdict: Verdict) -> Verdict:
    """The connection's ClientHello verdict (read by the access log and later stages)."""
    verdict = strictest(state.tls_verdict, verdict)
    state.tls_verdict = verdict
    state.record(verdict)
    return verdict
