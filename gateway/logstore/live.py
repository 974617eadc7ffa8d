"""Blocked and denied decisions as they are written, for many viewers at once (the console's
live view, issue #21). One ``LiveBlocks`` per process follows the policy streams
(follow.py) in one thread and keeps the newest ``capacity`` blocked events in a ring; each
viewer holds only a cursor.

Cursor: the last ``event.sequence`` a viewer has seen per stream, written
``proxy:120.conn:7.dns:33`` (the id of each server-sent event, so a browser's
``Last-Event-ID`` is a complete resume point). Every event of a stream with a sequence
above the cursor is delivered exactly once, in the stream's order: from the ring when the
ring still holds everything after the cursor (``floor``: the ring has every blocked event
of the stream above it), otherwise from the files first (a viewer that was away longer than
the ring lasts, or a console restarted meanwhile), in bounded batches.

Memory: the ring (``capacity`` trimmed events) is shared; a viewer costs its cursor, and
while it catches up from the files one follower reading one line at a time."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chain import ChainedRecord, is_recovery, is_seal
from .follow import StreamFollower

LIVE_STREAMS: tuple[str, ...] = ("proxy", "conn", "dns", "mail")
DEFAULT_CAPACITY = 2000
CATCHUP_FOLLOWERS = 64

# What a viewer is shown of a record (the rest stays in the log store).
SHOWN_FIELDS: tuple[str, ...] = (
    "@timestamp", "device.id", "user.name", "source.ip", "kanmon.verdict", "rule.id", "rule.category",
    "event.reason", "kanmon.stage", "event.action", "url.full", "url.domain", "http.request.method",
    "dns.question.name", "destination.domain", "destination.ip", "destination.port", "tls.client.server_name",
    "kanmon.device.group",
)

_CURSOR_PART = re.compile(r"^([a-z]+):(\d{1,18})$")


def may_be_blocked(raw: bytes) -> bool:
    """A cheap test of a raw line: False only when the record cannot be a block (the writer
    serializes with no spaces, and a value's quotes are escaped, so a block's line always
    holds one of these byte strings). True lines are parsed and checked by ``is_blocked``."""
    return b'"kanmon.verdict":"block"' in raw or b'"denied"' in raw


def is_blocked(record: Mapping[str, Any]) -> bool:
    """A decision that stopped something: verdict ``block``, or ``event.type`` ``denied``."""
    if is_seal(record) or is_recovery(record):
        return False
    if record.get("kanmon.verdict") == "block":
        return True
    kinds = record.get("event.type")
    return isinstance(kinds, list) and "denied" in kinds


@dataclass(frozen=True, slots=True)
class LiveEvent:
    stream: str
    seq: int
    fields: dict[str, Any]

    def matches(self, device: str | None, category: str | None) -> bool:
        if device and self.fields.get("device.id") != device:
            return False
        return not category or self.fields.get("rule.category") == category


def event_of(stream: str, record: ChainedRecord) -> LiveEvent:
    fields = {k: record.record[k] for k in SHOWN_FIELDS if record.record.get(k) is not None}
    return LiveEvent(stream, record.seq, fields)


def format_cursor(cursor: Mapping[str, int]) -> str:
    return ".".join(f"{s}:{cursor[s]}" for s in sorted(cursor))


def parse_cursor(text: str | None, streams: Iterable[str] = LIVE_STREAMS) -> dict[str, int] | None:
    """The cursor of a ``Last-Event-ID``; None when absent or not one of ours (a fresh start)."""
    if not text or len(text) > 256:
        return None
    known = set(streams)
    cursor: dict[str, int] = {}
    for part in text.strip().split("."):
        m = _CURSOR_PART.match(part)
        if not m or m[1] not in known or m[1] in cursor:
            return None
        cursor[m[1]] = int(m[2])
    return cursor or None


class LiveBlocks:
    """The shared follower and ring. ``poll_once`` is the unit the thread repeats (tests call
    it directly); ``read`` is what each viewer calls with its cursor."""

    def __init__(self, directory: Path, streams: tuple[str, ...] = LIVE_STREAMS, capacity: int = DEFAULT_CAPACITY,
                 batch: int = 2000):
        self.directory = Path(directory)
        self.streams = streams
        self.capacity = capacity
        self.batch = batch
        self._followers = {s: StreamFollower(self.directory, s) for s in streams}
        self._ring: deque[LiveEvent] = deque()
        # stream -> every blocked event above this sequence is in the ring
        self._floor = {s: f.position for s, f in self._followers.items()}
        self._scanned = dict(self._floor)          # stream -> last sequence the follower read
        self._changed = threading.Condition()
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.evicted = 0
        self.errors = 0
        self.last_error: str | None = None    # the last poll's failure (unreadable log directory ...)
        # followers of viewers catching up from the files, by (stream, position): a few
        # offsets each, the oldest dropped first
        self._catchup: OrderedDict[tuple[str, int], StreamFollower] = OrderedDict()
        self._catchup_lock = threading.Lock()

    # -- the one follower -----------------------------------------------------------------

    def poll_once(self) -> int:
        """Read what the gateway wrote since the last poll; returns the blocked events added."""
        added = 0
        for stream, follower in self._followers.items():
            while True:
                records = follower.poll(self.batch, may_be_blocked)
                events = [event_of(stream, r) for r in records if is_blocked(r.record)]
                with self._changed:
                    for event in events:
                        self._ring.append(event)
                        while len(self._ring) > self.capacity:
                            old = self._ring.popleft()
                            self._floor[old.stream] = max(self._floor[old.stream], old.seq)
                            self.evicted += 1
                    self._scanned[stream] = follower.position
                    if events:
                        self._generation += 1
                        self._changed.notify_all()
                added += len(events)
                if len(records) < self.batch:
                    break
        return added

    def start(self, interval: float = 0.2) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.poll_once()
                    self.last_error = None
                except Exception as exc:   # must not end the live view: said to the viewers, retried
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]

        self._thread = threading.Thread(target=loop, name="kanmon-console-live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- viewers --------------------------------------------------------------------------

    def _catchup_follower(self, stream: str, after: int) -> StreamFollower:
        """A follower positioned after ``after``: the one a previous read left there (no
        rescan of the file from its start), else a new one."""
        with self._catchup_lock:
            kept = self._catchup.pop((stream, after), None)
        return kept if kept is not None else StreamFollower(self.directory, stream, after=after)

    def _keep_follower(self, follower: StreamFollower) -> None:
        with self._catchup_lock:
            self._catchup[(follower.stream, follower.position)] = follower
            while len(self._catchup) > CATCHUP_FOLLOWERS:
                self._catchup.popitem(last=False)

    def head(self) -> dict[str, int]:
        """The cursor of a viewer that starts now: only events written from now on."""
        with self._changed:
            return dict(self._scanned)

    def wait(self, generation: int, timeout: float) -> int:
        """Block until events newer than ``generation`` arrived (or timeout); the new generation."""
        with self._changed:
            if self._generation == generation:
                self._changed.wait(timeout)
            return self._generation

    @property
    def generation(self) -> int:
        return self._generation

    def read(self, cursor: Mapping[str, int], limit: int = 500) -> tuple[list[LiveEvent], dict[str, int]]:
        """Events after ``cursor`` (at most ``limit``) and the cursor after them. A stream the
        cursor does not name is read from the ring's floor (where this process started)."""
        cursor = {s: int(cursor.get(s, self._floor[s])) for s in self.streams}
        out: list[LiveEvent] = []
        with self._changed:
            behind = [s for s in self.streams if cursor[s] < self._floor[s]]
            floors = dict(self._floor)
        for stream in behind:                      # from the files, up to where the ring starts
            follower = self._catchup_follower(stream, cursor[stream])
            done = False
            while not done and len(out) < limit:
                wanted = min(self.batch, limit - len(out))
                records = follower.poll(wanted, may_be_blocked)
                for r in records:
                    if r.seq > floors[stream]:
                        done = True
                        break
                    if is_blocked(r.record):
                        out.append(event_of(stream, r))
                # Every line the follower passed is read or cannot be a block.
                done = done or len(records) < wanted or follower.position >= floors[stream]
                cursor[stream] = floors[stream] if done else follower.position
            if not done:
                self._keep_follower(follower)     # the next read of this viewer goes on from here
                return out, cursor
        if len(out) >= limit:
            return out, cursor
        with self._changed:
            if any(cursor[s] < self._floor[s] for s in self.streams):
                return out, cursor                 # the ring moved on meanwhile: next read catches up
            for event in self._ring:
                if event.seq > cursor[event.stream]:
                    out.append(event)
                    cursor[event.stream] = event.seq
                    if len(out) >= limit:
                        break
            else:
                for s in self.streams:             # everything scanned so far has been seen
                    cursor[s] = max(cursor[s], self._scanned[s])
        return out, cursor
