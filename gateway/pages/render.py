"""Jinja2 rendering of the staff pages (autoescaped: every value is escaped unless a
template says otherwise, and none does)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from gateway.pages.catalog import LANGS, both
from gateway.pages.kinds import PageKind, StaffMessage
from gateway.pages.organization import Organization

JST = timezone(timedelta(hours=9), "JST")
TEMPLATES = Path(__file__).resolve().parent / "templates"

ENV = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,   # a misspelt variable fails the render (and the tests), never prints ""
    trim_blocks=True,
    lstrip_blocks=True,
)


def times(now: datetime) -> tuple[str, str]:
    return (now.astimezone(JST).strftime("%Y-%m-%d %H:%M:%S JST"),
            now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def render(template: str, *, organization: Organization | None, **context: object) -> str:
    return ENV.get_template(template).render(langs=LANGS, both=both, org=organization or Organization(),
                                             **context)


def render_block(kind: PageKind, *, organization: Organization | None, url: str | None, device_id: str | None,
                 rule_id: str, category: str | None, explain: str, request_id: str, staff: StaffMessage,
                 signature: str | None = None, portal_url: str | None = None, now: datetime | None = None) -> str:
    org = organization or Organization()
    time_jst, time_utc = times(now or datetime.now(UTC))
    desk = org.helpdesk
    subject = both("About a blocked access (request id %(id)s)", id=request_id)
    body = "\n".join([
        f"{both('Request ID')}: {request_id}",
        f"{both('Address')}: {(url or '-')[:500]}",
        f"{both('Rule')}: {rule_id}",
        f"{both('Time')}: {time_jst} ({time_utc})",
        f"{both('Device')}: {device_id or '-'}",
        "", both("What I was doing:"), "",
    ])
    return render("block.html", organization=org, kind=str(kind), url=url, device=device_id or "-",
                  rule_id=rule_id, category=category, explain=explain, request_id=request_id, staff=staff,
                  signature=signature, portal_url=portal_url, time_jst=time_jst, time_utc=time_utc,
                  helpdesk=desk, mailto=desk.mailto_href(subject, body), tel=desk.tel_href)
