"""Operators sign in through the organization's IdP, with MFA (issue #21).

The OIDC work is the gateway's own relying party (gateway/signin/oidc.py: discovery, PKCE,
state, nonce, ID-token checks) with the console's redirect URI. The MFA decision is the one
the device sign-in makes (gateway.signin.sessions.mfa_of_claims: an ``amr`` second factor of
``signin.mfa_amr`` or an ``acr`` of ``signin.mfa_acr``); without it the person is refused
with a bilingual page and no session is made. Roles come from the ``groups`` claim
(gateway.signin.operators.roles_for).

The pending sign-in (state, nonce, PKCE verifier) is bound to the browser that started it
by a random value in a short-lived cookie (SameSite=Lax: the IdP's redirect back is a
cross-site navigation); a callback from another browser, a replayed or unknown state is
refused. The session cookie (SameSite=Strict) is set on a small page that then moves on
with a same-origin ``<meta http-equiv="refresh">``: a Strict cookie is not sent on the
redirect chain that started at the IdP.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from flask import Blueprint, abort, current_app, g, redirect, request, url_for

from gateway.console import auth
from gateway.console.app import render_page
from gateway.console.audit import audit
from gateway.signin.oidc import SignInRefused
from gateway.signin.operators import roles_for
from gateway.signin.pending import PendingRefused, PendingSignIn
from gateway.signin.sessions import _as_strings, mfa_of_claims

log = logging.getLogger("kanmon.console.signin")
bp = Blueprint("signin", __name__)
CALLBACK_SITE = "console"   # stands for the tunnel address in PendingSignIns (bound to a browser instead)


def _browser_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _local(next_url: str | None) -> str:
    """Only a path of this console (no scheme, no host, no "//" or "/\\"). Browsers drop tabs
    and newlines from a URL and treat "\\" as "/" ("/<TAB>/evil.example" is "//evil.example",
    another site), so any control character, space or backslash sends to "/" instead."""
    if not next_url or not next_url.startswith("/") or next_url.startswith("//"):
        return "/"
    if any(c <= " " or c in "\x7f\\" for c in next_url):
        return "/"
    return next_url


@bp.get("/signin")
def signin_page():
    return render_page("signin.html", next_url=_local(request.args.get("next")))


MAX_STARTS_PER_ADDRESS = 20   # open sign-ins one client address may have (see _too_many_starts)


def _too_many_starts(svc, address: str, now: float) -> bool:
    """A sign-in start needs no account, and the pending sign-ins are bounded (the oldest is
    dropped when full): one client could start a thousand and so drop every operator's sign-in
    in progress. Each address may have MAX_STARTS_PER_ADDRESS open (started within the pending
    lifetime and not come back yet); the rest get 429 with the bilingual refusal page."""
    lifetime = svc.signin.pending_lifetime_seconds
    starts = current_app.extensions.setdefault("kanmon_console_starts", {})
    with svc.pending_lock:
        recent = [t for t in starts.get(address, ()) if now - t < lifetime]
        if len(recent) >= MAX_STARTS_PER_ADDRESS:
            starts[address] = recent
            return True
        starts[address] = recent + [now]
        if len(starts) > auth.MAX_PENDING:   # bounded: forget addresses with nothing open
            for key in [k for k, v in starts.items() if not v or now - v[-1] >= lifetime]:
                del starts[key]
    return False


def _start_done(svc, address: str) -> None:
    """A sign-in of this address came back (completed or refused): one fewer open."""
    starts = current_app.extensions.setdefault("kanmon_console_starts", {})
    with svc.pending_lock:
        if starts.get(address):
            starts[address].pop(0)


@bp.get("/signin/start")
def signin_start():
    svc = auth.services()
    if request.headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
        # started by another site (an <img> or a link elsewhere): no pending sign-in is made, so a
        # page cannot use up the browser's address's open sign-ins; the person clicks here instead
        return redirect(url_for("signin.signin_page", next=_local(request.args.get("next"))))
    if _too_many_starts(svc, request.remote_addr or "", svc.clock()):
        audit("console-signin-refused", reason=f"too-many-starts from {request.remote_addr}", who="console:unknown")
        return render_page("refused.html", 429, reason="too-many-starts")
    try:
        req = svc.oidc.begin()
    except SignInRefused as exc:
        log.warning("console sign-in could not start: %s", exc)
        return render_page("refused.html", 503, reason="idp-unreachable")
    token = secrets.token_urlsafe(32)
    with svc.pending_lock:
        svc.pending.add(PendingSignIn(state=req.state, nonce=req.nonce, code_verifier=req.code_verifier,
                                      device_id=_browser_key(token), tunnel_ip=CALLBACK_SITE,
                                      next_url=_local(request.args.get("next")), started=svc.clock()))
    response = redirect(req.url)
    response.set_cookie(auth.SIGNIN_COOKIE, token, max_age=svc.signin.pending_lifetime_seconds, secure=True,
                        httponly=True, samesite="Lax", path="/")
    return response


@bp.get("/callback")
def callback():
    svc = auth.services()
    token = request.cookies.get(auth.SIGNIN_COOKIE, "")
    try:
        with svc.pending_lock:
            pending = svc.pending.redeem(request.args.get("state"), device_id=_browser_key(token),
                                         tunnel_ip=CALLBACK_SITE, now=svc.clock())
    except PendingRefused as exc:
        audit("console-signin-refused", reason=exc.reason, who="console:unknown")
        return _refused(exc.reason, 400)
    _start_done(svc, request.remote_addr or "")
    if "error" in request.args:
        reason = f"idp-error: {request.args.get('error', '')[:100]}"
        audit("console-signin-refused", reason=reason, who="console:unknown")
        return _refused("idp-error", 403)
    try:
        claims, _when = svc.oidc.complete(request.args.get("code", ""), nonce=pending.nonce,
                                          code_verifier=pending.code_verifier)
    except SignInRefused as exc:
        audit("console-signin-refused", reason=f"{exc.reason}: {exc.detail}", who="console:unknown")
        return _refused(exc.reason, 403)
    settings = svc.signin
    # An address the IdP says is not verified (Keycloak lets a user type any address into
    # their profile) is nobody's identity: not the user name, not proof of owning a device.
    email = claims.get("email") if isinstance(claims.get("email"), str) \
        and claims.get("email_verified") not in (False, "false") else None
    user = str(claims.get(settings.user_claim) or email or claims["sub"])
    who = f"console:{email or user} (sub={claims['sub']})"
    amr, acr, mfa = mfa_of_claims(claims, settings)
    if not mfa:
        audit("console-signin-refused", reason=f"mfa-missing: amr={sorted(amr)} acr={acr}", who=who)
        return _refused("mfa-missing", 403)
    groups = _as_strings(claims.get(settings.groups_claim))
    operator = auth.operator_from(user, subject=str(claims["sub"]), issuer=str(claims.get("iss", settings.issuer)),
                                  email=email, name=claims.get("name") if isinstance(claims.get("name"), str) else None,
                                  roles=roles_for(groups, svc.settings), groups=groups, amr=amr, acr=acr)
    # No fixation: whatever session cookie came with this request is ended, never adopted.
    svc.sessions.end(request.cookies.get(auth.SESSION_COOKIE))
    session_id, session = svc.sessions.create(operator)
    g.console_session = session
    audit("console-signin", reason=f"roles={','.join(sorted(operator.roles))} amr={','.join(sorted(amr))}", who=who)
    response = render_page("signed_in.html", next_url=pending.next_url or "/")
    response.set_cookie(auth.SESSION_COOKIE, session_id, secure=True, httponly=True, samesite="Strict", path="/")
    response.delete_cookie(auth.SIGNIN_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
    return response


@bp.post("/signout")
def signout():
    """Ends the session in the store: the old cookie, replayed, finds nothing."""
    svc = auth.services()
    if auth.current_operator() is None:
        abort(403)
    audit("console-signout")
    svc.sessions.end(request.cookies.get(auth.SESSION_COOKIE))
    response = redirect(url_for("signin.signin_page"), code=303)
    response.delete_cookie(auth.SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return response


def _refused(reason: str, status: int):
    response = render_page("refused.html", status, reason=reason)
    response.delete_cookie(auth.SIGNIN_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
    return response
