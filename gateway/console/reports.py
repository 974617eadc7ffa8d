"""Reports (issue #21): the monthly review and the incident report, generated on request and
downloaded as the self-contained HTML `kanmon report review|incident` writes -- the same code
path (gateway/reports/generate.py) from the gateway's log directory (``<state>/logs``) and the
policy in force (rules that expire soon). GET forms: the read roles, the auditor included;
every download is written to the audit trail."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from flask import Blueprint, Response, request

from gateway.console import auth
from gateway.console.audit import audit
from gateway.console.opscatalog import TEMPLATES, install, page, tr
from gateway.reports.charts import ChartMaker
from gateway.reports.generate import (ReportInputError, charts, incident_html, incident_inputs, log_dir, review_html,
                                      review_inputs)
from gateway.runtime.policyapply import policy_in_force
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK
from gateway.yamlsource import SourceErrors

bp = Blueprint("reports", __name__, template_folder=TEMPLATES)
bp.record_once(lambda state: install())   # this catalog behind the core's

FACTS = ("category", "level", "phase", "reporter", "responsible", "cause", "background", "prevention", "detected")
MAX_FIELD = 500


def _form() -> dict:
    args = request.args
    now = datetime.now(UTC)
    last = (now.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    form = {"month": args.get("month", last), "tz": args.get("tz", "Asia/Tokyo"), "device": args.get("device", ""),
            "since": args.get("since", ""), "until": args.get("until", ""), "limit": args.get("limit", "200")}
    form.update({k: args.get(k, "") for k in FACTS})
    return {k: v.strip()[:MAX_FIELD] for k, v in form.items()}


def _chart_maker() -> ChartMaker:
    return charts()


def _download(html: str, name: str) -> Response:
    return Response(html, mimetype="text/html", headers={
        "Content-Disposition": f'attachment; filename="{name}"', "X-Content-Type-Options": "nosniff"})


@bp.get("/reports")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def reports_page():
    return page("ops_reports.html", form=_form(), error=None, errors=())


@bp.get("/reports/review")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def review_download():
    cfg = auth.services().cfg
    form = _form()
    now = datetime.now(UTC)
    try:
        inputs = review_inputs(form["month"], form["tz"] or "UTC", 30, cfg.log_dir)
        policy, _status = policy_in_force(cfg)
        html = review_html(inputs, now, _chart_maker, policy)
    except ReportInputError as exc:
        return page("ops_reports.html", 400, form=form, error=tr(exc.text), errors=())
    except SourceErrors as exc:
        return page("ops_reports.html", 400, form=form, error=None, errors=tuple(str(e) for e in exc.errors))
    audit("console-report-downloaded", reason=f"review {inputs.month} ({inputs.tz})")
    return _download(html, f"kanmon-review-{inputs.month}.html")


@bp.get("/reports/incident")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def incident_download():
    cfg = auth.services().cfg
    form = _form()
    now = datetime.now(UTC)
    try:
        try:
            limit = int(form["limit"] or "200")
        except ValueError:
            limit = 0                       # refused below as "--limit must be at least 1"
        facts = {k: (form[k] or None) for k in FACTS}
        inputs = incident_inputs(form["device"], form["since"] or None, form["until"] or None, form["tz"] or "UTC",
                                 limit, now, facts)
        html = incident_html(inputs, log_dir(cfg.log_dir), now, _chart_maker)
    except ReportInputError as exc:
        return page("ops_reports.html", 400, form=form, error=tr(exc.text), errors=())
    audit("console-report-downloaded", reason=f"incident {inputs.device} {inputs.since.isoformat()}", device_id=inputs.device)
    safe = re.sub(r"[^A-Za-z0-9._@-]", "_", inputs.device)[:64]
    return _download(html, f"kanmon-incident-{safe}-{inputs.since:%Y%m%d}.html")
