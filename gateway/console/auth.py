"""Who is asking, and may they: server-side sessions, roles, CSRF (issue #21).

Sessions live in this process only (``SessionStore``): the browser holds a random id
(32 bytes, ``secrets``) in the ``__Host-kanmon-console`` cookie (Secure, HttpOnly,
SameSite=Strict, Path=/, no Domain); the store keeps only its SHA-256, so a memory dump or a
log line never holds a usable id. A session id is made only at a completed sign-in and never
taken from the browser (no fixation: whatever cookie came in is dropped and ended). A session
ends after ``idle_timeout`` without a request, ``absolute_timeout`` after the sign-in, or at
sign-out, and an ended id is unknown for good (a replayed cookie finds nothing). A restart of the
console ends every session (fail closed: operators sign in again).

Every POST is checked before any view runs, in this order, each refused with 403:
1. ``Sec-Fetch-Site`` (when the browser sends it) must be ``same-origin``;
2. ``Origin`` must be present and be the console's own (``console.public_url``);
3. a session must be signed in and the form's ``csrf_token`` must equal the session's
   (a per-session random token, compared in constant time);
4. an auditor (without admin or helpdesk) may post nothing but sign-out.
Then ``requires_role`` on the view decides by role (``admin`` passes every check).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from flask import abort, current_app, g, redirect, request, url_for

from gateway.console.audit import audit
from gateway.signin.operators import ROLE_ADMIN, ROLE_AUDITOR, ROLE_HELPDESK, ROLE_USER

SESSION_COOKIE = "__Host-kanmon-console"
SIGNIN_COOKIE = "__Host-kanmon-console-signin"   # binds a pending sign-in to the browser that started it
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_SESSIONS = 10_000
MAX_PENDING = 1_000


@dataclass(frozen=True)
class Operator:
    """The signed-in person of a request (from the IdP's ID token)."""

    subject: str               # the IdP's stable `sub`
    issuer: str
    user: str                  # preferred_username (signin.user_claim) or email or sub
    email: str | None
    name: str | None
    roles: frozenset[str]
    groups: frozenset[str] = frozenset()
    amr: frozenset[str] = frozenset()
    acr: str | None = None

    def has(self, *roles: str) -> bool:
        return ROLE_ADMIN in self.roles or bool(self.roles & set(roles))

    @property
    def read_only(self) -> bool:
        """An auditor without a role that changes anything."""
        return ROLE_AUDITOR in self.roles and not self.roles & {ROLE_ADMIN, ROLE_HELPDESK}

    @property
    def actor(self) -> str:
        """The name written into audit entries: readable and tied to the IdP account."""
        return f"console:{self.email or self.user} (sub={self.subject})"


@dataclass
class Session:
    key: str                   # SHA-256 of the cookie value
    operator: Operator
    csrf: str
    created: float
    last_seen: float
    notices: list = field(default_factory=list)   # (kind, msgid, values): shown once on the next page
    downloads: dict = field(default_factory=dict)  # token -> (file name, bytes): one download each


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()


@dataclass
class SessionStore:
    idle_seconds: float
    absolute_seconds: float
    clock: Callable[[], float] = time.monotonic
    _by_key: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, operator: Operator) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(_key(session_id), operator, secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._expire(now)
            if len(self._by_key) >= MAX_SESSIONS:   # bounded: the oldest goes first
                oldest = min(self._by_key.values(), key=lambda s: s.last_seen)
                self._by_key.pop(oldest.key, None)
            self._by_key[session.key] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id (and marks it used), or None: unknown, ended, idle too
        long, or past its absolute lifetime (then it is removed)."""
        if not session_id:
            return None
        now = self.clock()
        key = _key(session_id)
        with self._lock:
            session = self._by_key.get(key)
            if session is None:
                return None
            if now - session.last_seen > self.idle_seconds or now - session.created > self.absolute_seconds:
                del self._by_key[key]
                return None
            session.last_seen = now
            return session

    def end(self, session_id: str | None) -> bool:
        if not session_id:
            return False
        with self._lock:
            return self._by_key.pop(_key(session_id), None) is not None

    def __len__(self) -> int:
        return len(self._by_key)

    def _expire(self, now: float) -> None:
        dead = [k for k, s in self._by_key.items()
                if now - s.last_seen > self.idle_seconds or now - s.created > self.absolute_seconds]
        for k in dead:
            del self._by_key[k]


# -- the request's operator ------------------------------------------------------------------

def current_operator() -> Operator | None:
    session = g.get("console_session")
    return session.operator if session is not None else None


def csrf_token() -> str:
    session = g.get("console_session")
    return session.csrf if session is not None else ""


def requires_role(*roles: str):
    """The view needs a signed-in operator with one of ``roles`` (admin always passes;
    ``"user"``: anyone signed in). Not signed in: GET goes to the sign-in page, anything
    else is 403. Wrong role: 403 (and the refusal is audited)."""
    if not roles or any(r not in (ROLE_ADMIN, ROLE_HELPDESK, ROLE_AUDITOR, ROLE_USER) for r in roles):
        raise ValueError(f"requires_role: unknown roles {roles!r}")

    def decorate(view):
        @functools.wraps(view)
        def guarded(*args, **kwargs):
            op = current_operator()
            if op is None:
                if request.method in ("GET", "HEAD"):
                    return redirect(url_for("signin.signin_page", next=request.full_path.rstrip("?")))
                abort(403)
            if not (ROLE_USER in roles or op.has(*roles)):
                refuse("role", f"needs {'/'.join(roles)}")
            return view(*args, **kwargs)
        guarded.console_roles = frozenset(roles)   # checked by the tests: every view has one
        return guarded
    return decorate


def refuse(kind: str, detail: str) -> None:
    """403, recorded in the audit trail with who tried what."""
    if request.method in UNSAFE_METHODS:
        audit("console-refused", reason=f"{kind}: {detail}: {request.method} {request.path}")
    abort(403)


# -- checks before every request ---------------------------------------------------------------

def _origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL, or None when it is not one (a port out of range or
    not a number, a broken IPv6 literal: an Origin header is whatever the client sends)."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return None
    if ":" in host:
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def load_session(store: SessionStore) -> None:
    g.console_session = store.get(request.cookies.get(SESSION_COOKIE))


def check_unsafe_request(origin: str) -> None:
    """The CSRF and read-only checks of every state-changing request (see the module text)."""
    if request.method not in UNSAFE_METHODS:
        return
    if request.content_length is None and "Transfer-Encoding" in request.headers:
        # a chunked body is cut at MAX_CONTENT_LENGTH without an error (Werkzeug): the form would
        # be read short instead of refused. Browsers send forms with a Content-Length.
        abort(411)
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        refuse("csrf", f"Sec-Fetch-Site {site}")
    sent = request.headers.get("Origin")
    if not sent or sent == "null" or _origin_of(sent) is None or _origin_of(sent) != _origin_of(origin):
        refuse("csrf", f"Origin {sent!r}")
    session = g.get("console_session")
    if session is None:
        abort(403)
    token = request.form.get("csrf_token", "")
    if not hmac.compare_digest(token.encode("utf-8", "replace"), session.csrf.encode()):
        refuse("csrf", "token missing or wrong")
    if session.operator.read_only and request.endpoint != "signin.signout":
        refuse("read-only", "auditor")


def operator_from(claims_user: str, *, subject: str, issuer: str, email: str | None, name: str | None,
                  roles: Iterable[str], groups: Iterable[str], amr: Iterable[str], acr: str | None) -> Operator:
    return Operator(subject=subject, issuer=issuer, user=claims_user, email=email, name=name,
                    roles=frozenset(roles), groups=frozenset(groups), amr=frozenset(amr), acr=acr)


def with_roles(op: Operator, roles: Iterable[str]) -> Operator:
    return replace(op, roles=frozenset(roles))


def services():
    return current_app.extensions["kanmon_console"]
