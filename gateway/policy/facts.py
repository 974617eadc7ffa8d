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

# The two RE2 sets of a snapshot (compiler.py): patterns of rules bucketed by their hosts, and
# every other URL pattern. A check asks the set that holds its patterns.
FREE_SET = 0
KEYED_SET = 1


class Facts:
    """Per-decision scratch: what the stage knows, the URL patterns that match (asked of
    the RE2 set at most once, and only if a rule needs it), the rules found through the
    host tables, and the local time (computed at most once)."""

    __slots__ = ("known", "host_hits", "now", "_url", "_url_sets", "_matched", "_tz", "_local")

    def __init__(self, known: int, url: str | None, url_sets: Any, host_hits: Any, now: datetime, tz: tzinfo,
                 matched: frozenset[int] | set[int] | None = None):
        self.known = known
        self.host_hits = host_hits  # rule ordinals found through the host tables (supports ``in``)
        self.now = now
        self._url = url
        self._url_sets = url_sets  # (FREE_SET, KEYED_SET) of the snapshot, or None
        self._matched: list[Any] = [matched, None]  # per set, asked at most once
        self._tz = tz
        self._local: datetime | None = None

    def matches(self, which: int = FREE_SET) -> frozenset[int] | set[int]:
        """Ids of the URL patterns of set ``which`` that match this URL (empty when the URL
        is unknown)."""
        found = self._matched[which]
        if found is None:
            entry = self._url_sets[which] if (self._url and self._url_sets is not None) else None
            if entry is None:
                found = _NONE
            else:
                url_set, pids = entry
                local = url_set.Match(self._url.encode())
                found = {pids[i] for i in local} if local else _NONE
            self._matched[which] = found
        return found

    def local_now(self) -> datetime:
        if self._local is None:
            self._local = self.now.astimezone(self._tz)
        return self._local
