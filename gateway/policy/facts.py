"""What is known at each stage, as bit flags, and the per-decision scratch the checks read.

A condition that needs a fact the stage does not have yet is *unknown*, not false: the
engine then defers the decision to the stage that knows (see LANGUAGE.md, "Stages").
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from gateway.verdict import Stage

DEVICE = 1  # device id, groups, ownership, user, posture, underlay address
HOST = 2  # DNS name / SNI / Host
DST = 4  # destination address, port, protocol
URL = 8  # URL, scheme, method, file extension of the path
REQUEST_BODY = 16  # request content type, body size
RESPONSE = 32  # response content type
TIME = 64  # the clock (time windows)

ALL = DEVICE | HOST | DST | URL | REQUEST_BODY | RESPONSE | TIME

KNOWN_AT: dict[Stage, int] = {
    Stage.CONNECT: DEVICE | TIME,
    Stage.DNS: DEVICE | HOST | TIME,
    Stage.TLS: DEVICE | HOST | DST | TIME,
    Stage.TCP: ALL,  # a raw TCP flow has no later stage: URL/content conditions are simply false
    Stage.UPSTREAM: DEVICE | HOST | DST | TIME,
    Stage.REQUEST: DEVICE | HOST | DST | URL | REQUEST_BODY | TIME,
    Stage.RESPONSE: ALL,
}

# The order the gateway sees a web connection in; a rule is "decided at" the first of these
# that knows everything the rule needs.
STAGE_ORDER = (Stage.CONNECT, Stage.DNS, Stage.TLS, Stage.REQUEST, Stage.RESPONSE)

# What a path-independent (connection-table) decision may use: device and host only.
HOST_ONLY = DEVICE | HOST


def earliest_stage(mask: int) -> Stage:
    for stage in STAGE_ORDER:
        if mask & ~KNOWN_AT[stage] == 0:
            return stage
    return Stage.RESPONSE


_NONE: frozenset[int] = frozenset()


class Facts:
    """Per-decision scratch: what the stage knows, the URL patterns that match (asked of
    the RE2 set at most once, and only if a rule needs it), the rules found through the
    host tables, and the local time (computed at most once)."""

    __slots__ = ("known", "host_hits", "now", "_url", "_url_set", "_matched", "_tz", "_local")

    def __init__(self, known: int, url: str | None, url_set: Any, host_hits: set[int], now: datetime, tz: tzinfo,
                 matched: frozenset[int] | set[int] | None = None):
        self.known = known
        self.host_hits = host_hits
        self.now = now
        self._url = url
        self._url_set = url_set
        self._matched = matched
        self._tz = tz
        self._local: datetime | None = None

    def matches(self) -> frozenset[int] | set[int]:
        """Ids of the URL patterns that match this URL (empty when the URL is unknown)."""
        if self._matched is None:
            # The RE2 wrapper's own Match only encodes and forwards; calling the extension
            # object directly saves a third of the call on this hot path.
            ids = self._url_set._set.Match(self._url.encode()) if (self._url and self._url_set is not None) else None
            self._matched = set(ids) if ids else _NONE
        return self._matched

    def local_now(self) -> datetime:
        if self._local is None:
            self._local = self.now.astimezone(self._tz)
        return self._local
