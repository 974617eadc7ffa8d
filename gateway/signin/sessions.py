"""User sessions: who signed in on which device, how, and until when.

``UserSession`` is what the registry stores (one row per sign-in). ``SessionDirectory`` is
the gateway's in-memory view of the active ones, by device, replaced as a whole when the
registry changes so a lookup never sees a half-updated table. A session counts only for the
device *and* tunnel address it was made on, and only until it expires or is ended.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway.hostname import canonical_address
from gateway.signin.settings import SignInSettings


@dataclass(frozen=True)
class UserSession:
    session_id: str
    device_id: str
    tunnel_ip: str
    user: str
    subject: str                      # the IdP's stable `sub`
    issuer: str
    email: str | None = None
    groups: frozenset[str] = frozenset()
    amr: frozenset[str] = frozenset()
    acr: str | None = None
    mfa: bool = False
    auth_time: datetime | None = None
    created_at: datetime | None = None
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str = ""

    def valid(self, now: datetime) -> bool:
        return self.ended_at is None and self.expires_at is not None and now < self.expires_at


def new_session_id() -> str:
    return secrets.token_urlsafe(18)


def canonical_ip(ip: str) -> str:
    """A tunnel address as the registry spells it: without an IPv6 zone, and an IPv4-mapped
    IPv6 address (how a dual-stack listener sees an IPv4 peer) as plain IPv4 -- the same
    normalisation the identity addon applies before it finds the device. Text that is not an
    address is kept as it is (it then matches nothing)."""
    addr = canonical_address(ip)
    return str(addr) if addr is not None else str(ip)


def _as_strings(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, (list, tuple)):
        return frozenset(str(v) for v in value if isinstance(v, (str, int)))
    return frozenset()


def claims_show_mfa(amr: frozenset[str], acr: str | None, settings: SignInSettings) -> bool:
    """The one MFA decision (device sign-in and the operator console): an ``amr`` value that
    is a second factor, or an ``acr`` the configuration names."""
    return bool(amr & set(settings.mfa_amr)) or (acr is not None and acr in settings.mfa_acr)


def mfa_of_claims(claims: Mapping[str, Any], settings: SignInSettings) -> tuple[frozenset[str], str | None, bool]:
    """``(amr, acr, mfa)`` of validated ID-token claims."""
    amr = _as_strings(claims.get("amr"))
    acr = claims.get("acr") if isinstance(claims.get("acr"), str) else None
    return amr, acr, claims_show_mfa(amr, acr, settings)


def session_from_claims(claims: Mapping[str, Any], *, device_id: str, tunnel_ip: str, settings: SignInSettings,
                        now: datetime, auth_time: datetime | None) -> UserSession:
    """A new session from validated ID-token claims. Pure: no I/O, the clock is passed in."""
    user = claims.get(settings.user_claim) or claims.get("email") or claims["sub"]
    amr = _as_strings(claims.get("amr"))
    acr = claims.get("acr") if isinstance(claims.get("acr"), str) else None
    mfa = claims_show_mfa(amr, acr, settings)
    return UserSession(
        session_id=new_session_id(), device_id=device_id, tunnel_ip=canonical_ip(tunnel_ip), user=str(user),
        subject=str(claims["sub"]), issuer=str(claims.get("iss", settings.issuer)),
        email=claims.get("email") if isinstance(claims.get("email"), str) else None,
        groups=_as_strings(claims.get(settings.groups_claim)), amr=amr, acr=acr, mfa=mfa,
        auth_time=auth_time or now, created_at=now,
        expires_at=now + timedelta(seconds=settings.session_lifetime_seconds))


def owner_matches(owner: str, session_user: str, email: str | None) -> bool:
    """The device's registered owner is the signed-in user: the same user name, or the same
    mail address (case-insensitive), or the owner is the local part of the user's address."""
    o = owner.strip().lower()
    if not o:
        return False
    candidates = {session_user.strip().lower()}
    if email:
        e = email.strip().lower()
        candidates |= {e, e.split("@", 1)[0]}
    return o in candidates


@dataclass
class SessionDirectory:
    """Active sessions by device id (at most one per device: a new sign-in replaces the old)."""

    _by_device: dict[str, UserSession] = field(default_factory=dict)

    def replace(self, sessions: Iterable[UserSession]) -> None:
        table: dict[str, UserSession] = {}
        for s in sessions:
            held = table.get(s.device_id)
            if held is None or (s.created_at or datetime.min) > (held.created_at or datetime.min):
                table[s.device_id] = s
        self._by_device = table

    def put(self, session: UserSession) -> None:
        table = dict(self._by_device)
        table[session.device_id] = session
        self._by_device = table

    def remove(self, device_id: str) -> UserSession | None:
        table = dict(self._by_device)
        gone = table.pop(device_id, None)
        self._by_device = table
        return gone

    def for_device(self, device_id: str, tunnel_ips: Iterable[str], now: datetime) -> UserSession | None:
        """The device's valid session, if it was made from one of the device's own tunnel
        addresses (cryptokey routing makes those the device's authenticated identity)."""
        s = self._by_device.get(device_id)
        if s is None or not s.valid(now):
            return None
        if canonical_ip(s.tunnel_ip) not in {canonical_ip(ip) for ip in tunnel_ips}:
            return None
        return s

    def all(self) -> list[UserSession]:
        return list(self._by_device.values())

    def __len__(self) -> int:
        return len(self._by_device)
