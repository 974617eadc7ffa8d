"""The block pages (issue #19): one per kind — policy block, quarantine, sign-in required,
gateway fault (HTTP 503, "temporarily unavailable, try again"), infected download and bad
request — rendered from the Jinja2 templates and message catalogs of gateway/pages, with the
rule's staff message, the approved alternative and the helpdesk's mailto:/tel: links
carrying the request id. Self-contained HTML: nothing loads from elsewhere except the
organization's logo when the config gives it as an https URL."""

from __future__ import annotations

import secrets
from datetime import datetime

from mitmproxy import http

from gateway.pages.kinds import STATUS, PageKind, StaffMessage, page_kind, staff_message
from gateway.pages.organization import Helpdesk, Organization
from gateway.pages.render import render_block
from gateway.verdict import Verdict

__all__ = ["Helpdesk", "Organization", "block_response", "new_request_id", "render_block_page"]

RETRY_AFTER_SECONDS = 30   # a fault page's Retry-After
# The page is served on the blocked site's origin: no script runs on it, it loads nothing but
# the organization's logo (an inline data: image or an https one) and it cannot be framed.
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; img-src data: https:; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def new_request_id() -> str:
    return secrets.token_hex(8)


def render_block_page(verdict: Verdict, *, url: str | None, device_id: str | None, helpdesk: Helpdesk,
                      request_id: str, now: datetime | None = None, organization: Organization | None = None,
                      staff: StaffMessage | None = None, kind: PageKind | None = None, signature: str | None = None,
                      portal_url: str | None = None) -> str:
    org = organization or Organization(helpdesk=helpdesk)
    return render_block(kind or page_kind(verdict, signature), organization=org, url=url, device_id=device_id,
                        rule_id=verdict.rule_id or "default", category=verdict.category, explain=verdict.explain,
                        request_id=request_id, staff=staff or staff_message(verdict), signature=signature,
                        portal_url=portal_url, now=now)


def block_response(verdict: Verdict, *, url: str | None, device_id: str | None, helpdesk: Helpdesk,
                   request_id: str, organization: Organization | None = None, staff: StaffMessage | None = None,
                   signature: str | None = None, portal_url: str | None = None) -> http.Response:
    kind = page_kind(verdict, signature)
    body = render_block_page(verdict, url=url, device_id=device_id, helpdesk=helpdesk, request_id=request_id,
                             organization=organization, staff=staff, kind=kind, signature=signature,
                             portal_url=portal_url)
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Kanmon-Rule": verdict.rule_id or "default",
        "X-Kanmon-Request-Id": request_id,
        "X-Kanmon-Page": str(kind),
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    }
    if kind is PageKind.FAULT:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return http.Response.make(STATUS[kind], body.encode("utf-8"), headers)
