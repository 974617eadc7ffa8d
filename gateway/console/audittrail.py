"""The audit trail page (issue #21): the ``audit`` log stream through the Logs page's search
(gateway/console/logs.py), filtered by device, operator and action. Its own module because
the console's navigation is one entry per page module (app.PAGES)."""

from __future__ import annotations

from flask import Blueprint

from gateway.console import auth
from gateway.console.logs import AUDIT_FILTERS, BadInput, checked, form_of, refuse, show
from gateway.console.opscatalog import TEMPLATES, install
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK

bp = Blueprint("audittrail", __name__, template_folder=TEMPLATES)
bp.record_once(lambda state: install())   # this catalog behind the core's


@bp.get("/audit")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def audit_page():
    form = form_of(*AUDIT_FILTERS)
    try:
        checked(*AUDIT_FILTERS)
    except BadInput as exc:
        return refuse("ops_audit.html", form, exc)
    return show("audit", form, "ops_audit.html", device=form["device"] or None,
                fields={"user.name": form["operator"] or None, "event.action": form["action"] or None})
