"""Captive user sign-in (issue #9): a device with no signed-in user reaches only the
destinations the config lists as needed before sign-in (the IdP, MDM, OS updates); its first
web page is redirected to the gateway's sign-in page, other traffic is blocked
(``kanmon:signin-required``). The sign-in pages themselves are answered here, on
``signin.portal_host``, which the gateway's DNS answers with its sinkhole address so the
device's connection lands on the proxy.

Runs after the decision addons (and the mail filter) and before the enforcer, so it
overrides what the policy said for unsigned devices, like the quarantine gate.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import UTC, datetime
from urllib.parse import quote

from mitmproxy import dns, http, tcp, tls

from addons.flowverdict import record_verdict
from addons.requesttarget import request_target
from gateway.hostname import normalize_host
from gateway.proxy.connections import ConnectionState, LiveConnections
from gateway.proxy.flowstate import METADATA_SESSION
from gateway.registry.model import DeviceRecord
from gateway.signin import pages
from gateway.signin.oidc import SignInRefused
from gateway.signin.service import SignInService
from gateway.signin.sessions import UserSession
from gateway.verdict import RULE_SIGNIN_PORTAL, RULE_SIGNIN_REQUIRED, Action, Stage, Verdict

log = logging.getLogger("kanmon.signin")

EXPLAIN = "サインインが必要です / sign-in required: this device has no signed-in user"


def wants_html(request: http.Request) -> bool:
    """A browser navigating (a page load), not an app's API call: only those are redirected;
    everything else gets the block answer, which a program can recognise."""
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("accept", "")


def _page(status: int, body: str, extra: dict | None = None) -> http.Response:
    headers = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store",
               "X-Kanmon-Rule": RULE_SIGNIN_PORTAL,
               # issue #19: no script, nothing loaded but the logo, only its own sign-out form
               "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data: https:; "
                                          "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"}
    headers.update(extra or {})
    return http.Response.make(status, body.encode("utf-8"), headers)


def _redirect(location: str, rule: str) -> http.Response:
    return http.Response.make(302, b"", {"Location": location, "Cache-Control": "no-store", "X-Kanmon-Rule": rule})


def safe_next(url: str | None, portal_host: str) -> str | None:
    """Where to send the browser after sign-in: only an http(s) URL, never the portal."""
    if not url or not url.startswith(("http://", "https://")) or len(url) > 4096:
        return None
    host = url.split("://", 1)[1].split("/", 1)[0].split("@")[-1].split(":")[0].lower()
    return None if host == portal_host else url


class SignInGate:
    name = "kanmon-signin"

    def __init__(self, service: SignInService, connections: LiveConnections, contact: str = "",
                 portal_addresses: tuple[str, str] = ("198.18.0.1", "100::1"), organization=None):
        self.service = service
        self.settings = service.settings
        self.connections = connections
        self.contact = contact
        # issue #19: the portal pages name the organization and the identity provider's host
        self.branding = {"organization": organization, "idp_host": self.settings.issuer_host}
        self.portal = self.settings.portal_host
        self.portal_addresses = portal_addresses

    # -- helpers ------------------------------------------------------------------------------
    def _state(self, client) -> ConnectionState | None:
        state = self.connections.get(client.id)
        return state if state is not None and state.device is not None else None

    def _needs_signin(self, state: ConnectionState, now: datetime) -> tuple[bool, UserSession | None]:
        device = state.device
        assert device is not None
        if not self.service.required_for(device):
            return False, None
        session = self.service.session_for(device, now)
        return session is None, session

    def _set(self, flow, verdict: Verdict, state: ConnectionState | None) -> None:
        if state is None:   # the portal: the gateway answers itself, nothing goes upstream
            record_verdict(flow, verdict, None, served_by_gateway=True)
        else:
            record_verdict(flow, verdict, self.connections)

    # -- DNS: the portal name leads to the proxy --------------------------------------------------
    def dns_request(self, flow: dns.DNSFlow) -> None:
        q = flow.request.question
        if q is None or normalize_host(q.name) != self.portal or self._state(flow.client_conn) is None:
            return
        self._set(flow, Verdict(Action.ALLOW, RULE_SIGNIN_PORTAL, "the gateway's sign-in page", Stage.DNS), None)
        if q.type not in (dns.types.A, dns.types.AAAA):
            flow.response = flow.request.succeed([])
            return
        address = self.portal_addresses[0] if q.type == dns.types.A else self.portal_addresses[1]
        flow.response = flow.request.succeed([dns.ResourceRecord(q.name, q.type, dns.classes.IN, 60,
                                                                 ipaddress.ip_address(address).packed)])

    # -- TLS: intercept the portal, and unsigned devices' connections (to redirect them) --------
    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        state = self._state(data.context.client)
        if state is None:
            return
        host = normalize_host(data.client_hello.sni or "")
        if host == self.portal:
            data.ignore_connection = False
            return
        needs, _ = self._needs_signin(state, datetime.now(UTC))
        if needs and not self.settings.allowed_before_signin(host):
            data.ignore_connection = False  # a no-inspect rule must not let an unsigned device through

    # -- HTTP -------------------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self._state(flow.client_conn)
        if state is None or flow.response is not None:
            return
        host = normalize_host(request_target(flow)[0])
        if host == self.portal:
            self._set(flow, Verdict(Action.ALLOW, RULE_SIGNIN_PORTAL, "the gateway's sign-in page", Stage.REQUEST), None)
            flow.response = await self._portal(flow, state)
            return
        needs, session = self._needs_signin(state, datetime.now(UTC))
        if session is not None:
            flow.metadata[METADATA_SESSION] = session
        if not needs or self.settings.allowed_before_signin(host):
            return
        verdict = Verdict(Action.BLOCK, RULE_SIGNIN_REQUIRED, EXPLAIN, Stage.REQUEST)
        self._set(flow, verdict, state)
        if wants_html(flow.request):
            target = f"https://{self.portal}/?next={quote(request_target(flow)[1], safe='')}"
            flow.response = _redirect(target, RULE_SIGNIN_REQUIRED)
        # else: the enforcer answers with the block page (403, X-Kanmon-Rule: kanmon:signin-required)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        state = self._state(flow.client_conn)
        if state is None:
            return
        needs, _ = self._needs_signin(state, datetime.now(UTC))
        if needs and not self.settings.allowed_before_signin(normalize_host(flow.client_conn.sni or "")):
            self._set(flow, Verdict(Action.BLOCK, RULE_SIGNIN_REQUIRED, EXPLAIN, Stage.TCP), state)

    # -- the portal ---------------------------------------------------------------------------------
    async def _portal(self, flow: http.HTTPFlow, state: ConnectionState) -> http.Response:
        device: DeviceRecord = state.device  # type: ignore[assignment]
        path = flow.request.path.split("?", 1)[0]
        query = {k: v for k, v in flow.request.query.items()}
        now = datetime.now(UTC)
        if path == "/":
            session = self.service.session_for(device, now)
            next_url = safe_next(query.get("next"), self.portal)
            if session is not None:
                return _page(200, pages.signed_in_page(user=session.user, device_id=device.device_id,
                                                       expires_at=session.expires_at or now, mfa=session.mfa,
                                                       next_url=next_url, session_id=session.session_id, **self.branding))
            return _page(200, pages.signin_required_page(portal_host=self.portal, next_url=next_url,
                                                         device_id=device.device_id, contact=self.contact, **self.branding))
        if path == "/start":
            try:
                url = await self.service.begin(device, state.peer_ip, safe_next(query.get("next"), self.portal))
            except SignInRefused as exc:
                self.service.refuse(device, state.peer_ip, exc.reason, exc.detail)
                return _page(502, pages.refused_page(reason=exc.reason, device_id=device.device_id,
                                                     portal_host=self.portal, contact=self.contact, now=now, **self.branding))
            return _redirect(url, RULE_SIGNIN_PORTAL)
        if path == "/callback":
            outcome = await self.service.finish(device, state.peer_ip, query)
            if outcome.session is None:
                return _page(403, pages.refused_page(reason=outcome.reason, device_id=device.device_id,
                                                     portal_host=self.portal, contact=self.contact, now=now, **self.branding),
                             {"X-Kanmon-Signin-Refused": outcome.reason})
            if outcome.next_url:
                return _redirect(outcome.next_url, RULE_SIGNIN_PORTAL)
            s = outcome.session
            return _page(200, pages.signed_in_page(user=s.user, device_id=device.device_id,
                                                   expires_at=s.expires_at or now, mfa=s.mfa, next_url=None,
                                                   session_id=s.session_id, **self.branding))
        if path == "/signout":
            # Only the form on the device's own signed-in page signs out: a POST carrying that
            # session's token. A link or another site's form (GET, or no/wrong token) changes
            # nothing and gets the portal page.
            session = self.service.session_for(device, now)
            if flow.request.method == "POST" and session is not None \
                    and query.get("session") == pages.signout_token(session.session_id):
                self.service.sign_out_device(device, state.peer_ip)
                return _page(200, pages.signin_required_page(portal_host=self.portal, next_url=None,
                                                             device_id=device.device_id, contact=self.contact, **self.branding))
            return _redirect(f"https://{self.portal}/", RULE_SIGNIN_PORTAL)
        return _page(404, pages.signin_required_page(portal_host=self.portal, next_url=None,
                                                     device_id=device.device_id, contact=self.contact, **self.branding))
