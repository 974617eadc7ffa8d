"""Sign-ins under way: what the gateway sent a device to the IdP with (state, nonce, PKCE
verifier) until the IdP sends the browser back to the callback.

Each entry is bound to the device and tunnel address that started it and can be redeemed
once: a replayed or foreign ``state`` is refused. Entries lapse after ``lifetime`` seconds.
Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class PendingSignIn:
    state: str
    nonce: str
    code_verifier: str
    device_id: str
    tunnel_ip: str
    next_url: str | None
    started: float  # monotonic seconds
    # The IdP was asked to authenticate the user again (shared device): the wall-clock time
    # the ID token's auth_time must not be older than (less the clock skew). None: not asked.
    fresh_since: datetime | None = None


class PendingRefused(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PendingSignIns:
    def __init__(self, lifetime: float, max_entries: int = 10_000, remember_used: int = 10_000):
        self.lifetime = lifetime
        self.max_entries = max_entries
        self._open: OrderedDict[str, PendingSignIn] = OrderedDict()
        self._used: OrderedDict[str, float] = OrderedDict()  # redeemed states: a replay is named as such
        self._remember_used = remember_used

    def add(self, entry: PendingSignIn) -> None:
        self._open[entry.state] = entry
        while len(self._open) > self.max_entries:
            self._open.popitem(last=False)

    def redeem(self, state: str | None, *, device_id: str, tunnel_ip: str, now: float) -> PendingSignIn:
        """The sign-in this callback finishes; it cannot be redeemed again."""
        if not state:
            raise PendingRefused("state-missing", "the callback has no state parameter")
        if state in self._used:
            raise PendingRefused("state-replayed", "this sign-in was already completed or refused")
        entry = self._open.pop(state, None)
        if entry is None:
            raise PendingRefused("state-unknown", "no sign-in was started with this state")
        self._used[state] = now
        while len(self._used) > self._remember_used:
            self._used.popitem(last=False)
        if now - entry.started > self.lifetime:
            raise PendingRefused("state-expired", f"the sign-in took longer than {int(self.lifetime)} s")
        if entry.device_id != device_id or entry.tunnel_ip != tunnel_ip:
            raise PendingRefused("state-other-device", f"started by device {entry.device_id}, finished by {device_id}")
        return entry

    def __len__(self) -> int:
        return len(self._open)
