"""Logs and audit trail (issue #21): the auditor's read-only view of the gateway's log store.

``/logs`` searches one stream as ``kanmon logs search`` does -- the same search
(gateway/logstore/search.py) with the same input rules (gateway/logstore/query.py: ISO 8601
times, taken in the page's zone when they have no offset; an IANA zone for the times shown) --
and shows the newest ``LIMIT`` matches, newest first, saying so when there were more.

``/audit`` is the same over the ``audit`` stream: every registry audit entry (device changes
by the CLI and the console, console sign-ins and refusals) as the gateway ships it into the
tamper-evident log, filtered by device, operator and action -- the records the reports read.

Read roles only (no POST route). Every value is shown through the autoescaping templates;
long values wrap (``overflow-wrap``) and are cut at ``MAX_CELL`` characters.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import Blueprint, request

from gateway.console import auth
from gateway.console.opscatalog import O_, TEMPLATES, install, page, text, tr
from gateway.logstore.layout import STREAMS
from gateway.logstore.query import BAD_RANGE, local_time, newest, parse_time, target_of, zone_of
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK

bp = Blueprint("logs", __name__, template_folder=TEMPLATES)
bp.record_once(lambda state: install())   # this catalog behind the core's

LIMIT = 500             # rows shown, newest first
MAX_FILTER = 200        # characters of one filter value
MAX_CELL = 300          # characters of one shown value
DEFAULT_ZONE = "Asia/Tokyo"
DEFAULT_HOURS = 24      # the window when no "since" is given (the search reads every file in it)
LOG_STREAMS = tuple(s for s in STREAMS if s != "audit")
# Shown by value (the navigation of app.PAGES, the kinds of log): marked for extraction.
VALUE_MESSAGES = (O_("Logs"), O_("Audit trail"), O_("auth"))


class BadInput(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _arg(name: str) -> str:
    value = request.args.get(name, "").strip()
    if len(value) > MAX_FILTER:
        raise BadInput(text(O_("A filter is longer than %(n)s characters."), n=MAX_FILTER))
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadInput(text(O_("A filter contains control characters.")))
    return value


def _cell(value: object) -> str:
    shown = "-" if value is None or value == "" else str(value)
    shown = "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in shown)
    return shown if len(shown) <= MAX_CELL else shown[:MAX_CELL] + "…"


def _window(form: dict[str, str]):
    zone = zone_of(form["tz"] or DEFAULT_ZONE)
    if zone is None:
        raise BadInput(text(O_("No such time zone (an IANA name, e.g. Asia/Tokyo).")))
    try:
        since = parse_time("since", form["since"] or None, zone)
        until = parse_time("until", form["until"] or None, zone)
    except ValueError as exc:
        raise BadInput(tr(exc.args[0])) from None
    if since is None:
        since = (until or datetime.now(UTC)) - timedelta(hours=DEFAULT_HOURS)
    if until is not None and since >= until:
        raise BadInput(tr(BAD_RANGE))
    return zone, since, until


def show(stream: str, form: dict[str, str], template: str, **filters):
    """Search ``stream``; the page with its rows, or the page with the bilingual error and 400."""
    try:
        zone, since, until = _window(form)
    except BadInput as exc:
        return refuse(template, form, exc)
    directory = auth.services().cfg.log_dir
    result = newest(directory, stream, since, until, limit=LIMIT, **filters) if directory.is_dir() else None
    rows = [] if result is None else [
        {"time": local_time(r.get("@timestamp"), zone), "record": {k: _cell(v) for k, v in r.items()},
         "target": _cell(target_of(r))} for r in result.records]
    return page(template, form=form, error=None, rows=rows, result=result, limit=LIMIT, streams=LOG_STREAMS,
                since=since.astimezone(zone).isoformat(timespec="seconds"))


def form_of(*names: str) -> dict[str, str]:
    """The filters as typed (cut to ``MAX_FILTER`` for showing them back in the form)."""
    form = {name: request.args.get(name, "").strip()[:MAX_FILTER] for name in names}
    form["tz"] = form.get("tz") or DEFAULT_ZONE
    return form


def checked(*names: str) -> None:
    for name in names:
        _arg(name)


def refuse(template: str, form: dict[str, str], exc: BadInput):
    return page(template, 400, form=form, error=exc.message, rows=[], result=None, limit=LIMIT, streams=LOG_STREAMS,
                since=None)


LOG_FILTERS = ("stream", "device", "verdict", "rule", "text", "since", "until", "tz")
AUDIT_FILTERS = ("device", "operator", "action", "since", "until", "tz")


@bp.get("/logs")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def logs_page():
    form = form_of(*LOG_FILTERS)
    form["stream"] = form["stream"] or "proxy"
    try:
        checked(*LOG_FILTERS)
        if form["stream"] not in LOG_STREAMS:
            raise BadInput(text(O_("No such log kind.")))
    except BadInput as exc:
        return refuse("ops_logs.html", form, exc)
    return show(form["stream"], form, "ops_logs.html", device=form["device"] or None,
                verdict=form["verdict"] or None, rule=form["rule"] or None, text=form["text"] or None)
