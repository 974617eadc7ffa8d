"""The console's Flask application (see gateway/console/__init__.py for how to add a page)."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from flask import Blueprint, Flask, g, make_response, redirect, render_template, request, url_for
from markupsafe import Markup, escape
from jinja2 import StrictUndefined
from werkzeug.exceptions import HTTPException

from gateway.console import auth
from gateway.console.catalog import LANG_COOKIE, LANGUAGES, choose_lang, gettext_for, load_all
from gateway.runtime import lifecycle
from gateway.signin.operators import ROLE_ADMIN, ROLE_AUDITOR, ROLE_HELPDESK, ROLE_USER, ConsoleSettings
from gateway.signin.pending import PendingSignIns
from gateway.signin.settings import SignInSettings

CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")


@dataclass(frozen=True)
class NavItem:
    endpoint: str
    msgid: str                  # English label (a console catalog message)
    roles: tuple[str, ...]      # shown to these roles (admin sees all)


# The console's pages: (module with a ``bp`` Blueprint, its navigation entry or None).
# Add one line per page module (gateway/console/__init__.py).
PAGES: list[tuple[str, NavItem | None]] = [
    ("gateway.console.signin", None),
    ("gateway.console.devices", NavItem("devices.device_list", "Devices", (ROLE_HELPDESK, ROLE_AUDITOR))),
    ("gateway.console.selfservice", NavItem("selfservice.my_devices", "My devices", (ROLE_USER,))),
    ("gateway.console.blocks", NavItem("blocks.live_page", "Live blocks", (ROLE_HELPDESK, ROLE_AUDITOR))),
    ("gateway.console.policy", NavItem("policy.policy_page", "Policy", (ROLE_HELPDESK, ROLE_AUDITOR))),
    ("gateway.console.feeds", NavItem("feeds.feeds_page", "Feeds", (ROLE_HELPDESK, ROLE_AUDITOR))),
    ("gateway.console.reports", NavItem("reports.reports_page", "Reports", (ROLE_HELPDESK, ROLE_AUDITOR))),
    ("gateway.console.alerts", NavItem("alerts.alerts_page", "Alerts", (ROLE_HELPDESK, ROLE_AUDITOR))),
    ("gateway.console.logs", NavItem("logs.logs_page", "Logs", (ROLE_HELPDESK, ROLE_AUDITOR))),
    ("gateway.console.audittrail", NavItem("audittrail.audit_page", "Audit trail", (ROLE_HELPDESK, ROLE_AUDITOR))),
]


@dataclass(frozen=True)
class ConsoleSignIn(SignInSettings):
    """The console's IdP settings (``console.oidc:``, else the gateway's ``signin:`` with, when
    configured, the console's own OIDC client) with the console's redirect URI."""

    console_redirect_uri: str = ""

    @property
    def redirect_uri(self) -> str:
        return self.console_redirect_uri


def console_signin(cfg) -> ConsoleSignIn:
    settings: ConsoleSettings = cfg.console
    base: SignInSettings = settings.idp or cfg.signin
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    if settings.idp is None and settings.client_id:
        values.update(client_id=settings.client_id, client_secret=settings.client_secret)
    return ConsoleSignIn(**values, console_redirect_uri=settings.redirect_uri)


@dataclass
class Services:
    """What the views use; the tests hand in fakes (an OIDC client, a clock)."""

    cfg: Any
    settings: ConsoleSettings
    signin: ConsoleSignIn
    oidc: Any                                  # OidcRelyingParty: begin(), complete()
    registry: Any
    sessions: auth.SessionStore
    pending: PendingSignIns
    clock: Callable[[], float] = time.monotonic
    apply_now: Callable[..., lifecycle.Applied] = lifecycle.apply_now
    pending_lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(cfg, *, oidc=None, registry=None, clock: Callable[[], float] = time.monotonic,
               apply_now: Callable[..., lifecycle.Applied] | None = None) -> Flask:
    if cfg.console is None or (cfg.console.idp is None and cfg.signin is None):
        raise ValueError("the configuration has no console: section (with console.oidc: or a signin: section)")
    load_all()
    signin = console_signin(cfg)
    if oidc is None:
        from gateway.signin.oidc import OidcRelyingParty
        oidc = OidcRelyingParty(signin)
    if registry is None:
        from gateway.registry.factory import open_registry
        registry = open_registry(cfg)
    settings = cfg.console
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, SESSION_COOKIE_NAME="__Host-unused", TEMPLATES_AUTO_RELOAD=False)
    app.config["KANMON_PUBLIC_URL"] = settings.public_url   # error.html: "open the console at …"
    app.jinja_env.undefined = StrictUndefined
    app.jinja_env.trim_blocks = True
    app.jinja_env.lstrip_blocks = True
    app.extensions["kanmon_console"] = Services(
        cfg=cfg, settings=settings, signin=signin, oidc=oidc, registry=registry,
        sessions=auth.SessionStore(settings.idle_timeout_seconds, settings.absolute_timeout_seconds, clock),
        pending=PendingSignIns(signin.pending_lifetime_seconds, max_entries=auth.MAX_PENDING), clock=clock,
        apply_now=apply_now or lifecycle.apply_now)

    nav: list[NavItem] = []
    for module_name, item in PAGES:
        app.register_blueprint(importlib.import_module(module_name).bp)
        if item is not None:
            nav.append(item)
    app.register_blueprint(core)

    @app.before_request
    def before() -> None:
        g.lang = choose_lang(request.cookies.get(LANG_COOKIE), request.headers.get("Accept-Language"))
        auth.load_session(auth.services().sessions)
        auth.check_unsafe_request(settings.origin)

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.context_processor
    def page_context() -> dict:
        op = auth.current_operator()
        items = [i for i in nav if op is not None and (ROLE_USER in i.roles or op.has(*i.roles))]
        return {"_": gettext_for(g.get("lang", "ja")), "lang": g.get("lang", "ja"), "op": op, "nav": items,
                "csrf_field": csrf_field, "languages": LANGUAGES, "organization": cfg.organization}

    @app.errorhandler(HTTPException)
    def error_page(exc: HTTPException):
        code = exc.code or 500
        return render_template("error.html", code=code, langs=LANGUAGES), code

    return app


def csrf_field() -> Markup:
    return Markup('<input type="hidden" name="csrf_token" value="{}">').format(escape(auth.csrf_token()))


def render_page(template: str, http_status: int = 200, /, **context: Any):
    """A console template with the page context (``_``, ``op``, ``nav``, ``csrf_field``)."""
    return make_response(render_template(template, **context), http_status)


core = Blueprint("core", __name__)


@core.get("/")
def home():
    op = auth.current_operator()
    if op is None:
        return redirect(url_for("signin.signin_page"))
    if op.has(ROLE_HELPDESK, ROLE_AUDITOR):
        return redirect(url_for("devices.device_list"))
    return redirect(url_for("selfservice.my_devices"))


@core.get("/lang/<code>")
def switch_lang(code: str):
    """A plain preference (no state of the server changes): the page language."""
    response = redirect(url_for("core.home"))
    if code in LANGUAGES:
        response.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, secure=True, httponly=True, samesite="Strict")
    return response


UNGUARDED = frozenset({"static", "core.home", "core.switch_lang", "signin.signin_page", "signin.signin_start",
                       "signin.callback", "signin.signout"})   # sign-out checks its own session (POST + CSRF)
ROLES = (ROLE_ADMIN, ROLE_HELPDESK, ROLE_AUDITOR, ROLE_USER)
