"""The alerts firing now (issue #21), from the Prometheus the configuration names
(``alerts.prometheus.url``; gateway/reports/firing.py). No Prometheus configured: the page
says so. Prometheus down or answering an error: the page shows the error (status 502), never
"no alerts". Read roles only."""

from __future__ import annotations

from flask import Blueprint

from gateway.console import auth
from gateway.console.opscatalog import TEMPLATES, install, page, tr
from gateway.reports.firing import AlertsUnavailable, PrometheusSettings, fetch_alerts
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK

bp = Blueprint("alerts", __name__, template_folder=TEMPLATES)
bp.record_once(lambda state: install())   # this catalog behind the core's


@bp.get("/alerts")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def alerts_page():
    settings = PrometheusSettings.from_alerts_section(auth.services().cfg.alerts)
    if settings is None:
        return page("ops_alerts.html", configured=False, alerts=None, error=None, url=None)
    try:
        alerts = fetch_alerts(settings)
    except AlertsUnavailable as exc:
        return page("ops_alerts.html", 502, configured=True, alerts=None, error=tr(exc.text), url=settings.url)
    return page("ops_alerts.html", configured=True, alerts=alerts, error=None, url=settings.url,
                firing=[a for a in alerts if a.state == "firing"], pending=[a for a in alerts if a.state != "firing"])
