"""The bilingual block page: rule id, reason, time, request id, helpdesk contact.
Self-contained HTML (no external resources: nothing loads from a blocked network)."""

from __future__ import annotations

import html
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from mitmproxy import http

from gateway.verdict import Verdict

JST = timezone(timedelta(hours=9), "JST")

_PAGE = """<!DOCTYPE html>
<html lang="ja">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>アクセスがブロックされました / Access blocked</title>
<style>
body {{ font-family: sans-serif; margin: 0; background: #f4f4f4; color: #222; }}
main {{ max-width: 40rem; margin: 2rem auto; background: #fff; padding: 1.5rem 2rem; border-top: 6px solid #b00020; }}
h1 {{ font-size: 1.4rem; margin: 0 0 .5rem; }}
h2 {{ font-size: 1.1rem; margin: 1.5rem 0 .5rem; color: #555; }}
dl {{ display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; }}
dt {{ font-weight: bold; }}
dd {{ margin: 0; word-break: break-all; }}
</style>
</head>
<body>
<main>
<section lang="ja" id="ja">
<h1>このアクセスは組織のセキュリティポリシーによりブロックされました</h1>
<p>{url_line_ja}業務上必要な場合は、下記の情報を添えて{helpdesk_ja}へ連絡してください。</p>
</section>
<section lang="en" id="en">
<h2>This access was blocked by your organization's security policy</h2>
<p>{url_line_en}If you need it for your work, contact {helpdesk_en} with the details below.</p>
</section>
<dl>
<dt>ルール / Rule</dt><dd id="rule-id">{rule}</dd>
<dt>理由 / Reason</dt><dd id="reason">{reason}</dd>
<dt>日時 / Time</dt><dd id="time">{time_jst} ({time_utc})</dd>
<dt>端末 / Device</dt><dd id="device">{device}</dd>
<dt>要求ID / Request ID</dt><dd id="request-id">{request_id}</dd>
<dt>連絡先 / Contact</dt><dd id="contact">{contact}</dd>
</dl>
</main>
</body>
</html>
"""


@dataclass(frozen=True)
class Helpdesk:
    name_ja: str
    name_en: str
    contact: str


def new_request_id() -> str:
    return secrets.token_hex(8)


def render_block_page(verdict: Verdict, *, url: str | None, device_id: str | None, helpdesk: Helpdesk,
                      request_id: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    e = html.escape
    url_ja = f"<code>{e(url)}</code> へのアクセスはできません。" if url else ""
    url_en = f"<code>{e(url)}</code> cannot be opened. " if url else ""
    return _PAGE.format(
        url_line_ja=url_ja, url_line_en=url_en,
        helpdesk_ja=e(helpdesk.name_ja), helpdesk_en=e(helpdesk.name_en),
        rule=e(verdict.rule_id or "default"), reason=e(verdict.explain),
        time_jst=now.astimezone(JST).strftime("%Y-%m-%d %H:%M:%S JST"),
        time_utc=now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=e(device_id or "-"), request_id=e(request_id), contact=e(helpdesk.contact or "-"),
    )


def block_response(verdict: Verdict, *, url: str | None, device_id: str | None, helpdesk: Helpdesk,
                   request_id: str) -> http.Response:
    body = render_block_page(verdict, url=url, device_id=device_id, helpdesk=helpdesk, request_id=request_id)
    return http.Response.make(
        403,
        body.encode("utf-8"),
        {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Kanmon-Rule": verdict.rule_id or "default",
            "X-Kanmon-Request-Id": request_id,
        },
    )
