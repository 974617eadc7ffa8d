"""Sessions in the registry's SQLite file, so the operator CLI (`kanmon user signout`) and the
gateway process see the same sessions, and an operator's sign-out lands in the same audit
outbox the gateway ships into the tamper-evident audit stream (gateway/registry/sqlite.py). With a
PostgreSQL registry (several nodes) they live there instead (gateway/signin/store_pg.py, same
interface); `open_session_store` picks the one the config selects.

Its own table, created if missing, with a revision column: the gateway polls
``revision()`` on every reconcile tick and reloads only when it moved.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from gateway.registry.sqlite import open_registry_file
from gateway.signin.sessions import UserSession

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS user_sessions (
        session_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        tunnel_ip TEXT NOT NULL,
        user_name TEXT NOT NULL,
        subject TEXT NOT NULL,
        issuer TEXT NOT NULL,
        email TEXT,
        groups_json TEXT NOT NULL DEFAULT '[]',
        amr_json TEXT NOT NULL DEFAULT '[]',
        acr TEXT,
        mfa INTEGER NOT NULL DEFAULT 0,
        auth_time TEXT,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        ended_at TEXT,
        end_reason TEXT NOT NULL DEFAULT '',
        rev INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS user_sessions_user ON user_sessions (user_name, ended_at)",
    "CREATE INDEX IF NOT EXISTS user_sessions_device ON user_sessions (device_id, ended_at)",
    "CREATE INDEX IF NOT EXISTS user_sessions_rev ON user_sessions (rev)",
)


def _ts(v: datetime | None) -> str | None:
    return v.astimezone(UTC).isoformat(timespec="microseconds") if v is not None else None


def _parse(v: str | None) -> datetime | None:
    return datetime.fromisoformat(v) if v else None


def _row(row: sqlite3.Row) -> UserSession:
    return UserSession(
        session_id=row["session_id"], device_id=row["device_id"], tunnel_ip=row["tunnel_ip"], user=row["user_name"],
        subject=row["subject"], issuer=row["issuer"], email=row["email"],
        groups=frozenset(json.loads(row["groups_json"])), amr=frozenset(json.loads(row["amr_json"])),
        acr=row["acr"], mfa=bool(row["mfa"]), auth_time=_parse(row["auth_time"]), created_at=_parse(row["created_at"]),
        expires_at=_parse(row["expires_at"]), ended_at=_parse(row["ended_at"]), end_reason=row["end_reason"])


class SessionStore:
    def __init__(self, path: str | Path, *, clock=lambda: datetime.now(UTC)):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = open_registry_file(self.path)  # the same file the device registry uses
        with self._lock:
            for statement in _SCHEMA:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()

    def revision(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(rev), 0) FROM user_sessions").fetchone()[0]

    def start(self, session: UserSession) -> UserSession:
        """Record a new session; any earlier live session of the same device ends with it
        (one user per device at a time)."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rev = self._next_rev()
                self._db.execute(
                    "UPDATE user_sessions SET ended_at=?, end_reason='replaced by a new sign-in', rev=?"
                    " WHERE device_id=? AND ended_at IS NULL", (_ts(now), rev, session.device_id))
                self._db.execute(
                    "INSERT INTO user_sessions (session_id, device_id, tunnel_ip, user_name, subject, issuer, email,"
                    " groups_json, amr_json, acr, mfa, auth_time, created_at, expires_at, ended_at, end_reason, rev)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (session.session_id, session.device_id, session.tunnel_ip, session.user, session.subject,
                     session.issuer, session.email, json.dumps(sorted(session.groups), ensure_ascii=False),
                     json.dumps(sorted(session.amr)), session.acr, int(session.mfa), _ts(session.auth_time),
                     _ts(session.created_at or now), _ts(session.expires_at), None, "", rev))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return session

    def end(self, *, user: str | None = None, device_id: str | None = None, session_id: str | None = None,
            reason: str, actor: str | None = None) -> list[UserSession]:
        """End every live session of a user, a device or one session; returns them. With an
        ``actor`` (an operator), the sign-out is also written to the audit outbox."""
        if (user, device_id, session_id) == (None, None, None):
            raise ValueError("name a user, a device or a session")
        where, params = [], []
        for column, value in (("user_name", user), ("device_id", device_id), ("session_id", session_id)):
            if value is not None:
                where.append(f"{column}=?")
                params.append(value)
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    f"SELECT * FROM user_sessions WHERE ended_at IS NULL AND {' AND '.join(where)}", params).fetchall()
                ended = [_row(r) for r in rows]
                if ended:
                    rev = self._next_rev()
                    self._db.executemany(
                        "UPDATE user_sessions SET ended_at=?, end_reason=?, rev=? WHERE session_id=?",
                        [(_ts(now), reason, rev, s.session_id) for s in ended])
                    if actor is not None and self._has_audit_table():
                        self._db.executemany(
                            "INSERT INTO audit (at, actor, action, device_id, reason, before_json, after_json)"
                            " VALUES (?,?,?,?,?,?,?)",
                            [(_ts(now), actor, "user.signout", s.device_id, reason,
                              json.dumps({"session_id": s.session_id, "user": s.user}, ensure_ascii=False), None)
                             for s in ended])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ended

    def active(self, now: datetime | None = None) -> list[UserSession]:
        now = now or self._clock()
        with self._lock:
            rows = self._db.execute("SELECT * FROM user_sessions WHERE ended_at IS NULL AND expires_at > ?"
                                    " ORDER BY created_at, session_id", (_ts(now),)).fetchall()
        return [_row(r) for r in rows]

    def get(self, session_id: str) -> UserSession | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM user_sessions WHERE session_id=?", (session_id,)).fetchone()
        return _row(row) if row else None

    def of_user(self, user: str) -> list[UserSession]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM user_sessions WHERE user_name=? ORDER BY created_at, session_id",
                                    (user,)).fetchall()
        return [_row(r) for r in rows]

    def _next_rev(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(rev), 0) + 1 FROM user_sessions").fetchone()[0]

    def _has_audit_table(self) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit'").fetchone() is not None


def open_session_store(cfg):
    """The session store the config selects, beside the device registry: PostgreSQL when the
    registry is shared by several nodes (`registry: {url: ...}` or $KANMON_REGISTRY_URL, the
    same choice as gateway/registry/factory.py `open_registry`), so a sign-in or a sign-out on any node
    holds on every node; else the registry's SQLite file (one place to back up, one audit outbox).
    Raises RegistryUnavailable (a RegistryError) when PostgreSQL cannot be reached."""
    from gateway.registry.factory import registry_url_of

    url = registry_url_of(cfg)
    if url:
        from gateway.signin.store_pg import PgSessionStore
        return PgSessionStore(url)
    return SessionStore(cfg.registry_path)
