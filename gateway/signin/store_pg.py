"""User sessions in the shared PostgreSQL registry, so that every node of a cluster sees every
sign-in and every sign-out (`kanmon user signout` on one node ends the user's sessions on all of
them; NISC smartphone guide 5.4 user authentication), and an operator's sign-out lands in the
registry's audit outbox like any device change (gateway/registry/postgres.py: one node claims and
ships each entry into its tamper-evident audit stream).

Same interface and semantics as `gateway.signin.store.SessionStore` (the SQLite store of a
single node); tests/unit/test_signin_store_contract.py runs one suite against both.

``revision()`` is polled by every node on every reconcile tick (50 ms): it reads one row, the
counter every session write bumps in its own transaction (gateway/registry/schema.py
SESSION_MIGRATIONS says why a counter row and not a sequence).

While the server is unreachable (gateway/registry/outbox.py: "nodes keep enforcing the last known
state"), a store that has read the sessions once keeps answering from that copy instead of
failing every tick: ``revision()`` keeps its last value, ``active()``/``get()`` answer from the
sessions last read (expiry still applies on time), the server is asked again at most every
RETRY_SECONDS (a blackholed server costs a connect timeout per attempt), and the gateway's own
ends (a device revoked from the local outbox, a user's sign-out at the portal) take effect here
at once and are written to the server when it answers. Sign-ins and operators' sign-outs (which
need their audit entry) are refused with ``RegistryUnavailable``, like every registry change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import psycopg
from psycopg.types.json import Jsonb

from gateway.registry.schema import SESSION_MIGRATIONS
# The registry's connection handling (reconnect, liveness, every failure as RegistryUnavailable)
# and its migration lock are reused, not copied: the sessions live in the same database.
from gateway.registry.postgres import _MIGRATION_LOCK, RegistryUnavailable, _Connected, migrate
from gateway.signin.sessions import UserSession

log = logging.getLogger("kanmon.signin.store_pg")

RETRY_SECONDS = 2.0

_INSERT = ("INSERT INTO user_sessions (session_id, device_id, tunnel_ip, user_name, subject, issuer, email, groups,"
           " amr, acr, mfa, auth_time, created_at, expires_at, ended_at, end_reason, rev)"
           " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,NULL,'',%s)")


def migrate_sessions(conn: psycopg.Connection) -> int:
    """Apply the pending session migrations (after the registry's: the sign-out audit goes to
    its `audit` table). Several nodes starting at once serialize on the registry's migration
    lock. Returns the session schema version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS kanmon_schema_sessions"
                     " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)")
        current = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM kanmon_schema_sessions").fetchone()["v"]
        for number, script in enumerate(SESSION_MIGRATIONS[current:], start=current + 1):
            conn.execute(script)
            conn.execute("INSERT INTO kanmon_schema_sessions VALUES (%s, now())", (number,))
            log.info("session schema migrated to version %d", number)
    return max(current, len(SESSION_MIGRATIONS))


def _row(row: dict) -> UserSession:
    return UserSession(
        session_id=row["session_id"], device_id=row["device_id"], tunnel_ip=row["tunnel_ip"], user=row["user_name"],
        subject=row["subject"], issuer=row["issuer"], email=row["email"], groups=frozenset(row["groups"]),
        amr=frozenset(row["amr"]), acr=row["acr"], mfa=row["mfa"], auth_time=row["auth_time"],
        created_at=row["created_at"], expires_at=row["expires_at"], ended_at=row["ended_at"],
        end_reason=row["end_reason"])


def _bump(conn: psycopg.Connection) -> int:
    return conn.execute("UPDATE user_sessions_revision SET value = value + 1 RETURNING value").fetchone()["value"]


def _matches(s: UserSession, user: str | None, device_id: str | None, session_id: str | None) -> bool:
    return ((user is None or s.user == user) and (device_id is None or s.device_id == device_id)
            and (session_id is None or s.session_id == session_id))


class PgSessionStore:
    """Thread-safe (one connection, one lock), like SessionStore; one per process."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 connect_timeout: float = 3, monotonic: Callable[[], float] = time.monotonic):
        self.url = url
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self._db = _Connected(url, connect_timeout)
        self._db.run(migrate)
        self.schema_version = self._db.run(migrate_sessions)
        # what the server said last, answered from while it is unreachable
        self._known_revision: int | None = None
        self._known_active: dict[str, UserSession] | None = None
        self._retry_at: float | None = None          # None: the server answers
        self._last_error: RegistryUnavailable | None = None
        self._ends_to_write: list[tuple[str, str, datetime]] = []   # (session id, reason, when)

    def close(self) -> None:
        self._db.close()

    # -- reads ---------------------------------------------------------------------------------
    def revision(self) -> int:
        with self._lock:
            return self._read(lambda c: c.execute("SELECT value FROM user_sessions_revision").fetchone()["value"],
                              remember="revision", fallback=lambda: self._known_revision)

    def active(self, now: datetime | None = None) -> list[UserSession]:
        now = now or self._clock()
        with self._lock:
            def query(c):
                return [_row(r) for r in c.execute(
                    "SELECT * FROM user_sessions WHERE ended_at IS NULL AND expires_at > %s"
                    " ORDER BY created_at, session_id", (now,)).fetchall()]
            return self._read(query, remember="active",
                              fallback=lambda: sorted((s for s in self._known_active.values() if s.valid(now)),
                                                      key=lambda s: (s.created_at, s.session_id)))

    def get(self, session_id: str) -> UserSession | None:
        def from_memory():
            held = self._known_active.get(session_id)
            if held is None:          # not among the live ones read last: unknown while unreachable
                raise self._last_error
            return held
        with self._lock:
            row = self._read(lambda c: c.execute("SELECT * FROM user_sessions WHERE session_id=%s",
                                                 (session_id,)).fetchone(), fallback=from_memory)
        return row if isinstance(row, UserSession) or row is None else _row(row)

    def of_user(self, user: str) -> list[UserSession]:
        with self._lock:
            rows = self._read(lambda c: c.execute("SELECT * FROM user_sessions WHERE user_name=%s"
                                                  " ORDER BY created_at, session_id", (user,)).fetchall())
        return [_row(r) for r in rows]

    # -- writes --------------------------------------------------------------------------------
    def start(self, session: UserSession) -> UserSession:
        """Record a new session; any earlier live session of the same device ends with it
        (one user per device at a time)."""
        now = self._clock()

        def tx(conn: psycopg.Connection) -> None:
            with conn.transaction():
                rev = _bump(conn)
                conn.execute("UPDATE user_sessions SET ended_at=%s, end_reason='replaced by a new sign-in', rev=%s"
                             " WHERE device_id=%s AND ended_at IS NULL", (now, rev, session.device_id))
                conn.execute(_INSERT, (
                    session.session_id, session.device_id, session.tunnel_ip, session.user, session.subject,
                    session.issuer, session.email, sorted(session.groups), sorted(session.amr), session.acr,
                    session.mfa, session.auth_time, session.created_at or now, session.expires_at, rev))
        with self._lock:
            self._online(tx, read=False)
            if self._known_active is not None:
                for held in [s for s in self._known_active.values() if s.device_id == session.device_id]:
                    del self._known_active[held.session_id]
                self._known_active[session.session_id] = replace(session, created_at=session.created_at or now)
        return session

    def end(self, *, user: str | None = None, device_id: str | None = None, session_id: str | None = None,
            reason: str, actor: str | None = None) -> list[UserSession]:
        """End every live session of a user, a device or one session; returns them. With an
        ``actor`` (an operator), the sign-out is also written to the audit outbox."""
        if (user, device_id, session_id) == (None, None, None):
            raise ValueError("name a user, a device or a session")
        now = self._clock()
        with self._lock:
            if self._retry_at is None or self._monotonic() >= self._retry_at or self._known_active is None:
                try:
                    ended = self._online(lambda c: self._end(c, user, device_id, session_id, reason, actor, now),
                                         read=False)
                except RegistryUnavailable:
                    if actor is not None or self._known_active is None:
                        raise
                else:
                    if self._known_active is not None:
                        for s in ended:
                            self._known_active.pop(s.session_id, None)
                    return ended
            elif actor is not None:
                raise self._last_error
            # the gateway's own end while the server is unreachable: here now, there later
            ended = sorted((s for s in self._known_active.values() if _matches(s, user, device_id, session_id)),
                           key=lambda s: (s.created_at, s.session_id))
            for s in ended:
                del self._known_active[s.session_id]
                self._ends_to_write.append((s.session_id, reason, now))
            if ended:
                log.warning("registry unreachable: %d session(s) ended on this node only for now (%s); written to "
                            "the registry when it answers", len(ended), reason)
            return ended

    def _end(self, conn: psycopg.Connection, user: str | None, device_id: str | None, session_id: str | None,
             reason: str, actor: str | None, now: datetime) -> list[UserSession]:
        where, params = [], []
        for column, value in (("user_name", user), ("device_id", device_id), ("session_id", session_id)):
            if value is not None:
                where.append(f"{column}=%s")
                params.append(value)
        with conn.transaction():
            # the counter first, as in start(): every writer locks in the same order (no deadlock)
            conn.execute("SELECT value FROM user_sessions_revision FOR UPDATE")
            rows = conn.execute(f"SELECT * FROM user_sessions WHERE ended_at IS NULL AND {' AND '.join(where)}"
                                " ORDER BY created_at, session_id", params).fetchall()
            ended = [_row(r) for r in rows]
            if not ended:
                return []
            rev = _bump(conn)
            conn.execute("UPDATE user_sessions SET ended_at=%s, end_reason=%s, rev=%s WHERE session_id = ANY(%s)",
                         (now, reason, rev, [s.session_id for s in ended]))
            if actor is not None:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO audit (at, actor, action, device_id, reason, before_json, after_json)"
                        " VALUES (%s,%s,%s,%s,%s,%s,NULL)",
                        [(now, actor, "user.signout", s.device_id, reason,
                          Jsonb({"session_id": s.session_id, "user": s.user})) for s in ended])
        return ended

    # -- the server, or what it said last --------------------------------------------------------
    def _online(self, fn: Callable[[psycopg.Connection], object], *, read: bool):
        """fn on the server; first the ends made while it was unreachable. Raises
        RegistryUnavailable (and remembers the outage) when it does not answer."""
        try:
            while self._ends_to_write:
                sid, reason, at = self._ends_to_write[0]
                self._db.run(lambda c: self._end(c, None, None, sid, reason, None, at))
                self._ends_to_write.pop(0)
            result = self._db.run(fn, read=read)
        except RegistryUnavailable as exc:
            if self._retry_at is None:
                log.error("session store unreachable; answering from the sessions last read: %s", exc.detail)
            self._last_error = exc
            self._retry_at = self._monotonic() + RETRY_SECONDS
            raise
        if self._retry_at is not None:
            log.warning("session store reachable again")
            self._retry_at = None
        return result

    def _read(self, fn: Callable[[psycopg.Connection], object], *, remember: str | None = None,
              fallback: Callable[[], object] | None = None):
        remembered = self._known_revision is not None and self._known_active is not None
        if self._retry_at is not None and self._monotonic() < self._retry_at and remembered and fallback:
            return fallback()
        try:
            result = self._online(fn, read=True)
        except RegistryUnavailable:
            if not remembered or fallback is None:
                raise
            return fallback()
        if remember == "revision":
            self._known_revision = result
        elif remember == "active":
            self._known_active = {s.session_id: s for s in result}
        return result
