"""Self-service: a staff member's own devices, and the loss report (issue #21; NISC smartphone
guide 6.2(5): the user reports the loss, the device is locked at once).

Anyone signed in (with MFA) sees only the devices whose registered owner is them (the rule
of the device sign-in: gateway.signin.sessions.owner_matches, user name or mail address).
Reporting one lost suspends it at once through the CLI's code path (gateway/runtime/
lifecycle.py) and waits for the running gateway to cut its live connections; the audit entry
``device-reported-lost`` carries the owner's IdP identity and alerts the helpdesk (webhook,
gateway/reports/alerting.py, and the Prometheus rule KanmonDeviceReportedLost). Only an
operator can end the suspension (the device's page). A device id of someone else, posted by
hand, is refused with 403 and nothing changes.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, abort, redirect, request, url_for

from gateway.console import auth
from gateway.console.app import render_page
from gateway.console.audit import actor
from gateway.console.catalog import M_
from gateway.console.devices import _notice, _take_notices
from gateway.registry.model import DeviceRecord, DeviceStatus
from gateway.runtime import lifecycle
from gateway.signin.operators import ROLE_USER
from gateway.signin.sessions import owner_matches

bp = Blueprint("selfservice", __name__)
LOSS_ACTION = "device-reported-lost"
MAX_NOTE = 300


def _mine(rec: DeviceRecord, op: auth.Operator) -> bool:
    return owner_matches(rec.owner, op.user, op.email)


@bp.get("/me/devices")
@auth.requires_role(ROLE_USER)
def my_devices():
    svc = auth.services()
    op = auth.current_operator()
    now = datetime.now(UTC)
    devices = [(rec, str(rec.effective_status(now))) for rec in svc.registry.all() if _mine(rec, op)]
    return render_page("my_devices.html", devices=devices, messages=_take_notices())


@bp.post("/me/devices/lost")
@auth.requires_role(ROLE_USER)
def report_lost():
    svc = auth.services()
    op = auth.current_operator()
    device_id = request.form.get("device_id", "")
    note = " ".join(request.form.get("note", "").split())[:MAX_NOTE]
    rec = svc.registry.get(device_id) if device_id else None
    if rec is None or not _mine(rec, op):
        # the same answer for "not yours" and "no such device": no probing of device ids
        auth.refuse("not-owner", f"loss report for {device_id[:80]!r}")
    if rec.status in (DeviceStatus.REVOKED, DeviceStatus.SUSPENDED):
        _notice(("ok", M_("%(device)s is already locked."), {"device": rec.device_id}))
        return redirect(url_for("selfservice.my_devices"), code=303)
    reason = "lost (reported by the owner)" + (f": {note}" if note else "")
    change = lifecycle.change_status(svc.registry, rec.device_id, DeviceStatus.SUSPENDED, actor=actor(), reason=reason,
                                     action=LOSS_ACTION)
    if not change.ok:
        abort(409)
    applied = svc.apply_now(svc.cfg, svc.registry)
    _notice(("ok", M_("%(device)s is locked. The helpdesk has been told; they will contact you."),
             {"device": rec.device_id}))
    if applied.warning is not None:
        _notice(("warning", applied.warning.render(), {}))
    return redirect(url_for("selfservice.my_devices"), code=303)
