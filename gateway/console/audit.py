"""The console's audit trail: every change carries the operator's IdP identity.

Device changes are audited by gateway/runtime/lifecycle.py (the same entry the CLI writes,
in the same transaction as the change) with ``actor()`` as the actor. Everything else the
console does that matters (sign-ins, refusals, sign-outs, and the pages other helpers add:
policy applied, report downloaded) goes through ``audit()``: an entry in the registry's audit
outbox, which the gateway ships into the tamper-evident ``audit`` log stream like the CLI's.
The console never writes the log files itself (one writer per stream: the gateway).
"""

from __future__ import annotations

import logging

from flask import current_app, g

from gateway.registry.model import AuditEntry

log = logging.getLogger("kanmon.console.audit")
# The process log reaches the journal line by line: control characters of an IdP user name or a
# typed reason are shown escaped, so no value starts a line of its own (a forged entry).
_ONE_LINE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, 0x85)} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def actor() -> str:
    session = g.get("console_session")
    return session.operator.actor if session is not None else "console:anonymous"


def audit(action: str, *, reason: str = "", device_id: str | None = None, who: str | None = None) -> None:
    """Write one audit entry. ``action``: ``console-...`` (e.g. ``console-policy-applied``).
    Raises when the registry refuses: a change whose audit entry cannot be written must not
    be reported as done (the caller's request fails with 500)."""
    entry = AuditEntry(who or actor(), action, reason[:1000], device_id=device_id)
    current_app.extensions["kanmon_console"].registry.append_audit(entry)
    shown = (str(v).translate(_ONE_LINE) for v in (entry.actor, action, device_id or "-", reason))
    log.info("audit %s %s %s %s", *shown)
