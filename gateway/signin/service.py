"""The gateway side of user sign-in: starts and finishes OIDC sign-ins for devices, keeps the
active sessions (``SessionDirectory``) in step with the registry, and writes the auth log.

I/O lives here (the registry file, the IdP via ``OidcRelyingParty``, the log store); the
decisions it relies on (``PendingSignIns``, ``session_from_claims``, ``owner_matches``) are
pure and tested alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from gateway.registry.model import DeviceRecord
from gateway.signin.oidc import OidcRelyingParty, SignInRefused
from gateway.signin.pending import PendingRefused, PendingSignIn, PendingSignIns
from gateway.signin.sessions import (SessionDirectory, UserSession, canonical_ip, owner_matches,
                                     session_from_claims)
from gateway.signin.settings import SignInSettings
from gateway.signin.store import SessionStore

log = logging.getLogger("kanmon.signin")


class RecordSink(Protocol):
    def append(self, stream: str, record: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SignInOutcome:
    session: UserSession | None
    reason: str = ""           # refusal code when session is None
    detail: str = ""
    next_url: str | None = None


class SignInService:
    def __init__(self, settings: SignInSettings, store: SessionStore, logstore: RecordSink | None, *,
                 rp: OidcRelyingParty | None = None, metrics=None,
                 on_sessions_changed: Callable[[set[str]], None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.store = store
        self.logstore = logstore
        self.rp = rp or OidcRelyingParty(settings)
        self.metrics = metrics
        self.pending = PendingSignIns(settings.pending_lifetime_seconds)
        self.directory = SessionDirectory()
        self.on_sessions_changed = on_sessions_changed
        self._clock = clock
        self._monotonic = monotonic
        self._revision = -1
        self._ends_pending: dict[str, str] = {}   # device id -> reason: ends the store refused

    # -- who is signed in ---------------------------------------------------------------------
    def required_for(self, device: DeviceRecord) -> bool:
        return not (device.groups & set(self.settings.exempt_groups))

    def is_shared(self, device: DeviceRecord) -> bool:
        """A pool device (``shared_groups``): any user may sign in on it, one after another."""
        return bool(device.groups & set(self.settings.shared_groups))

    def session_for(self, device: DeviceRecord, now: datetime | None = None) -> UserSession | None:
        return self.directory.for_device(device.device_id, _addresses(device), now or self._clock())

    def refresh(self) -> set[str]:
        """Reload the active sessions when the registry's session table moved (a sign-out
        from the CLI, a sign-in on another node) or a session expired; returns the ids of the
        devices whose session ended, so their live connections can be cut."""
        now = self._clock()
        if self._ends_pending:
            self._retry_pending_ends()
        rev = self.store.revision()
        held = {s.device_id: s for s in self.directory.all()}
        expired = [s for s in held.values() if not s.valid(now)]
        if rev == self._revision and not expired:
            return set()
        self._revision = rev
        self.directory.replace(s for s in self.store.active(now) if s.device_id not in self._ends_pending)
        after = {s.device_id: s.session_id for s in self.directory.all()}
        ended = {d for d, s in held.items() if after.get(d) != s.session_id}
        for s in held.values():
            if s.device_id not in ended:
                continue
            if not s.valid(now) and s.ended_at is None and (stored := self.store.get(s.session_id)) is not None \
                    and stored.ended_at is None:
                self._auth("session-expired", "success", device_id=s.device_id, source_ip=s.tunnel_ip, user=s.user,
                           reason="the session's lifetime ended")
            else:
                stored = self.store.get(s.session_id)
                self._auth("session-ended", "success", device_id=s.device_id, source_ip=s.tunnel_ip, user=s.user,
                           reason=stored.end_reason if stored is not None and stored.end_reason else "ended")
        changed = ended | {d for d, sid in after.items() if (held[d].session_id if d in held else None) != sid}
        if changed and self.on_sessions_changed is not None:
            self.on_sessions_changed(changed)
        return ended

    def follow_store(self) -> set[str]:
        """issue #22: an inspection worker's reload of the active sessions, when the gateway
        process saw sessions end (gateway/runtime/workers.py). That process's ``refresh`` wrote
        the auth records, so none here; returns the devices whose session this copy held and
        the store no longer has (their connections are cut)."""
        now = self._clock()
        held = {s.device_id: s.session_id for s in self.directory.all()}
        self.directory.replace(self.store.active(now))
        self._revision = -1
        after = {s.device_id: s.session_id for s in self.directory.all()}
        ended = {d for d, sid in held.items() if after.get(d) != sid}
        changed = ended | {d for d, sid in after.items() if held.get(d) != sid}
        if changed and self.on_sessions_changed is not None:
            self.on_sessions_changed(changed)
        return ended

    # -- sign-in ------------------------------------------------------------------------------
    async def begin(self, device: DeviceRecord, tunnel_ip: str, next_url: str | None) -> str:
        """The IdP URL to send this device's browser to. Raises ``SignInRefused`` when the
        IdP cannot be reached (discovery)."""
        tunnel_ip = canonical_ip(tunnel_ip)  # the peer address as the proxy saw it (maybe ::ffff:a.b.c.d)
        force_login = self.settings.reauthenticate_shared and self.is_shared(device)
        request = await asyncio.to_thread(self.rp.begin, force_login=force_login)
        self.pending.add(PendingSignIn(request.state, request.nonce, request.code_verifier, device.device_id,
                                       tunnel_ip, next_url, self._monotonic(),
                                       fresh_since=self._clock() if force_login else None))
        self._auth("signin-start", "success", device_id=device.device_id, source_ip=tunnel_ip,
                   reason="sent to the identity provider")
        return request.url

    async def finish(self, device: DeviceRecord, tunnel_ip: str, params: dict[str, str]) -> SignInOutcome:
        """The callback: check state, exchange the code, validate the ID token, check the
        device owner, start the session. Every outcome is written to the auth log."""
        tunnel_ip = canonical_ip(tunnel_ip)
        try:
            pending = self.pending.redeem(params.get("state"), device_id=device.device_id, tunnel_ip=tunnel_ip,
                                          now=self._monotonic())
        except PendingRefused as exc:
            return self.refuse(device, tunnel_ip, exc.reason, exc.detail)
        if "error" in params:
            return self.refuse(device, tunnel_ip, "idp-error", f"{params['error']}: {params.get('error_description', '')}",
                                pending.next_url)
        code = params.get("code")
        if not code:
            return self.refuse(device, tunnel_ip, "code-missing", "the callback has no code", pending.next_url)
        try:
            claims, auth_time = await asyncio.to_thread(self.rp.complete, code, nonce=pending.nonce,
                                                        code_verifier=pending.code_verifier)
        except SignInRefused as exc:
            return self.refuse(device, tunnel_ip, exc.reason, exc.detail, pending.next_url)
        except Exception as exc:
            # an IdP answer or a library error nobody foresaw: still a logged refusal with a
            # reason, never an exception out of the portal with nothing in the auth log
            log.exception("sign-in for device %s failed unexpectedly", device.device_id)
            return self.refuse(device, tunnel_ip, "signin-error", f"{type(exc).__name__}: {exc}", pending.next_url)
        now = self._clock()
        session = session_from_claims(claims, device_id=device.device_id, tunnel_ip=tunnel_ip,
                                      settings=self.settings, now=now, auth_time=auth_time)
        if pending.fresh_since is not None and (
                auth_time is None or auth_time < pending.fresh_since - timedelta(seconds=self.settings.clock_skew_seconds)):
            # asked for a new login (shared device), got an old IdP session's token
            return self.refuse(device, tunnel_ip, "reauthentication-missing",
                               f"auth_time {auth_time.isoformat() if auth_time else 'absent'} is before the sign-in "
                               f"started ({pending.fresh_since.isoformat()})", pending.next_url, user=session.user)
        shared = self.is_shared(device)
        if self.settings.require_owner_match and not shared and not owner_matches(device.owner, session.user,
                                                                                    session.email):
            return self.refuse(device, tunnel_ip, "owner-mismatch",
                                f"device owner {device.owner!r}, signed in as {session.user!r}", pending.next_url,
                                user=session.user)
        try:
            await asyncio.to_thread(self.store.start, session)
        except Exception as exc:  # the session store (SQLite locked, PostgreSQL down): no session, say why
            log.exception("could not record the session of device %s", device.device_id)
            return self.refuse(device, tunnel_ip, "session-store-unavailable", f"{type(exc).__name__}: {exc}",
                               pending.next_url, user=session.user)
        self.directory.put(session)
        self._revision = -1  # our own write moved the revision: reload at the next tick
        self._auth("signin", "success", device_id=device.device_id, source_ip=tunnel_ip, user=session.user,
                   reason="signed in", extra={
                       "kanmon.auth.session": session.session_id, "kanmon.auth.amr": sorted(session.amr),
                       "kanmon.auth.acr": session.acr, "kanmon.auth.mfa": session.mfa,
                       "kanmon.auth.groups": sorted(session.groups), "kanmon.auth.issuer": session.issuer,
                       "kanmon.auth.expires": session.expires_at.isoformat() if session.expires_at else None})
        if self.metrics is not None:
            self.metrics.signins.labels("success", "signed-in").inc()
        if self.on_sessions_changed is not None:
            self.on_sessions_changed({device.device_id})
        return SignInOutcome(session, next_url=pending.next_url)

    def sign_out_device(self, device: DeviceRecord, tunnel_ip: str) -> UserSession | None:
        """The user's own sign-out from the portal."""
        ended = self.store.end(device_id=device.device_id, reason="signed out by the user")
        self.directory.remove(device.device_id)
        for s in ended:
            self._auth("signout", "success", device_id=s.device_id, source_ip=tunnel_ip, user=s.user,
                       reason="signed out by the user")
        if ended and self.on_sessions_changed is not None:
            self.on_sessions_changed({device.device_id})
        return ended[0] if ended else None

    def end_for_devices(self, device_ids: Iterable[str], reason: str) -> list[UserSession]:
        """Sessions end with their device's admission (revocation, suspension, expiry).

        The device leaves the directory at once (in memory: its traffic no longer counts as
        signed in), whether or not the session store can be written. An end the store
        refuses (PostgreSQL down, SQLite locked) is kept and retried at every ``refresh``
        until it is written; meanwhile ``refresh`` keeps the device out of the directory
        even though the store still lists its session. Never raises for the store: the
        caller (the reconcile pass) must go on to cut the device's connections."""
        ended: list[UserSession] = []
        for device_id in device_ids:
            self.directory.remove(device_id)
            try:
                gone = self.store.end(device_id=device_id, reason=reason)
            except Exception as exc:  # the store's own errors vary by backend (sqlite3, psycopg)
                log.warning("session of device %s not ended in the session store (retried): %s", device_id, exc)
                self._ends_pending[device_id] = reason
                continue
            self._ends_pending.pop(device_id, None)
            for s in gone:
                ended.append(s)
                self._auth("session-ended", "success", device_id=device_id, user=s.user, reason=reason)
        return ended

    def _retry_pending_ends(self) -> None:
        for device_id, reason in list(self._ends_pending.items()):
            self.end_for_devices([device_id], reason)

    # -- log ------------------------------------------------------------------------------------
    def refuse(self, device: DeviceRecord, tunnel_ip: str, reason: str, detail: str, next_url: str | None = None,
                user: str | None = None) -> SignInOutcome:
        log.warning("sign-in refused for device %s: %s %s", device.device_id, reason, detail)
        self._auth("signin", "failure", device_id=device.device_id, source_ip=tunnel_ip, user=user,
                   reason=f"{reason}: {detail}" if detail else reason, extra={"kanmon.auth.reason": reason})
        if self.metrics is not None:
            self.metrics.signins.labels("failure", reason).inc()
        return SignInOutcome(None, reason, detail, next_url)

    def _auth(self, action: str, outcome: str, *, device_id: str | None, source_ip: str | None = None,
              user: str | None = None, reason: str = "", extra: dict | None = None) -> None:
        if self.logstore is None:
            return
        record = {"event.dataset": "kanmon.auth", "event.category": "authentication",
                  "event.action": f"user-{action}", "event.outcome": outcome, "event.reason": reason,
                  "device.id": device_id, "source.ip": source_ip, "user.name": user}
        if extra:
            record.update(extra)
        self.logstore.append("auth", record)


def _addresses(device: DeviceRecord) -> frozenset[str]:
    return frozenset(str(a) for a in device.addresses)
