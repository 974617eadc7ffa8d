"""Live blocked traffic (issue #21): blocked and denied decisions as the gateway logs them,
pushed to the browser as server-sent events, filtered by device and category.

Source: the gateway's tamper-evident log store (``<state>/logs``), followed read-only from
this process by one ``LiveBlocks`` (gateway/logstore/live.py) shared by every viewer: the
console is a separate process from the proxy, and the log files are the record the gateway
already writes, in order and with a gap-free sequence per stream. Each event's id is the
viewer's cursor (``proxy:120.dns:33``): a browser that reconnects sends it back as
``Last-Event-ID`` and gets every event after it exactly once (from the ring, or from the
files when it was away longer than the ring lasts).

Bounds: the ring (``RING``) is the only memory shared by viewers; at most ``MAX_STREAMS``
event streams at once (503 beyond: the browser retries); a stream ends after
``STREAM_SECONDS`` and the browser reconnects at once with its cursor, so a session that ended
or lost its role stops receiving within that time (the reconnect passes ``requires_role``).

The page's script (``/live/live.js``, served by this module; the CSP of the live page only
adds ``script-src 'self'`` and ``connect-src 'self'``) renders each event as a table row.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from flask import Blueprint, Response, current_app, request

from gateway.console import auth
from gateway.console.opscatalog import TEMPLATES, install, page
from gateway.logstore.live import LiveBlocks, format_cursor, parse_cursor
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK

bp = Blueprint("blocks", __name__, template_folder=TEMPLATES)
bp.record_once(lambda state: install())   # this catalog behind the core's

RING = 2000
MAX_STREAMS = 64
STREAM_SECONDS = 60.0
HEARTBEAT_SECONDS = 15.0
BATCH = 200
MAX_FILTER = 200
EXTENSION = "kanmon_console_live"
LIVE_CSP_EXTRA = "; script-src 'self'; connect-src 'self'"


class LiveState:
    """The app's one follower of the log store and its open event streams."""

    def __init__(self, log_dir, poll_seconds: float = 0.2, ring: int = RING, max_streams: int = MAX_STREAMS,
                 stream_seconds: float = STREAM_SECONDS):
        self.log_dir = log_dir
        self.poll_seconds = poll_seconds
        self.ring = ring
        self.max_streams = max_streams
        self.stream_seconds = stream_seconds
        self._hub: LiveBlocks | None = None
        self._lock = threading.Lock()
        self.streams = 0

    @property
    def hub(self) -> LiveBlocks:
        with self._lock:
            if self._hub is None:
                self._hub = LiveBlocks(self.log_dir, capacity=self.ring)
                self._hub.start(self.poll_seconds)
            return self._hub

    def enter(self) -> bool:
        with self._lock:
            if self.streams >= self.max_streams:
                return False
            self.streams += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.streams -= 1

    def stop(self) -> None:
        with self._lock:
            if self._hub is not None:
                self._hub.stop()


def live_state() -> LiveState:
    app = current_app._get_current_object()   # type: ignore[attr-defined]
    state = app.extensions.get(EXTENSION)
    if state is None:
        state = app.extensions.setdefault(EXTENSION, LiveState(auth.services().cfg.log_dir))
    return state


def _filters() -> tuple[str, str]:
    device = request.args.get("device", "").strip()[:MAX_FILTER]
    category = request.args.get("category", "").strip()[:MAX_FILTER]
    return device, category


@bp.get("/live")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def live_page():
    device, category = _filters()
    return page("ops_live.html", device=device, category=category)


@bp.after_app_request
def live_page_csp(response):
    """Runs after the core's header hook: the live page alone may run its own script and
    open its own event stream (every other page keeps the core's script-free policy)."""
    if request.endpoint == "blocks.live_page" and "Content-Security-Policy" in response.headers:
        response.headers["Content-Security-Policy"] += LIVE_CSP_EXTRA
    return response


def sse(fields: dict[str, str]) -> str:
    """One server-sent event; values are single lines (ids are our cursors, data is JSON)."""
    return "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n"


def event_stream(state: LiveState, cursor: dict[str, int], device: str, category: str,
                 clock=time.monotonic) -> Any:
    """The body of one event stream: matching events, each with the cursor after it as its
    id; an id-only message when the cursor moved past events that did not match (so a resume
    does not read them again); a comment as heartbeat. Ends after ``stream_seconds``."""
    hub = state.hub
    started = clock()
    last_sent = format_cursor(cursor)
    last_beat = started
    reported: str | None = None
    yield "retry: 1000\n" + sse({"id": last_sent, "event": "ready", "data": json.dumps({"cursor": last_sent})})
    while clock() - started < state.stream_seconds:
        generation = hub.generation
        events, after = hub.read(cursor, limit=BATCH)
        running = dict(cursor)
        for event in events:
            running[event.stream] = event.seq
            if event.matches(device or None, category or None):
                last_sent = format_cursor(running)
                yield sse({"id": last_sent, "event": "block",
                           "data": json.dumps({"stream": event.stream, "seq": event.seq, **event.fields},
                                              ensure_ascii=False, default=str)})
        cursor = after
        if format_cursor(cursor) != last_sent:
            last_sent = format_cursor(cursor)
            yield sse({"id": last_sent})
        if hub.last_error is not None and hub.last_error != reported:
            reported = hub.last_error           # the store cannot be read: say so, never a silent page
            yield sse({"event": "problem", "data": json.dumps({"error": reported}, ensure_ascii=False)})
        if len(events) >= BATCH:
            continue
        if clock() - last_beat >= HEARTBEAT_SECONDS:
            last_beat = clock()
            yield ": keep-alive\n\n"
        hub.wait(generation, min(1.0, max(0.05, state.stream_seconds - (clock() - started))))


@bp.get("/live/events")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def live_events():
    state = live_state()
    device, category = _filters()
    cursor = parse_cursor(request.headers.get("Last-Event-ID") or request.args.get("after"))
    hub = state.hub
    if cursor is None:
        cursor = hub.head()
    else:
        cursor = {**hub.head(), **cursor} if set(cursor) != set(hub.streams) else cursor
    if not state.enter():
        return Response("too many live viewers\n", status=503, headers={"Retry-After": "5"},
                        mimetype="text/plain")
    response = Response(event_stream(state, cursor, device, category), mimetype="text/event-stream")
    response.call_on_close(state.leave)     # also when the browser went away before the first event
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"
    return response


LIVE_JS = r"""'use strict';
(function () {
  var table = document.getElementById('live-rows');
  var state = document.getElementById('live-state');
  var form = document.getElementById('live-filters');
  var maxRows = 500;
  var url = form.getAttribute('data-events') + '?' + new URLSearchParams(new FormData(form)).toString();
  var source = new EventSource(url);
  function cell(label, text, cls) {
    var td = document.createElement('td');
    td.setAttribute('data-label', label);
    if (cls) { td.className = cls; }
    td.textContent = text == null || text === '' ? '-' : String(text);
    return td;
  }
  source.addEventListener('ready', function () {
    state.textContent = state.getAttribute('data-connected');
    state.setAttribute('data-state', 'connected');
  });
  source.addEventListener('block', function (e) {
    var ev = JSON.parse(e.data);
    var labels = JSON.parse(table.getAttribute('data-labels'));
    var tr = document.createElement('tr');
    tr.setAttribute('data-device', ev['device.id'] || '');
    tr.setAttribute('data-category', ev['rule.category'] || '');
    tr.setAttribute('data-event-id', e.lastEventId);
    var what = ev['url.full'] || ev['dns.question.name'] || ev['tls.client.server_name'] || ev['destination.domain'] ||
      ((ev['destination.ip'] || '') + (ev['destination.port'] ? ':' + ev['destination.port'] : ''));
    tr.appendChild(cell(labels.time, (ev['@timestamp'] || '').replace('T', ' ').replace(/\.\d+Z$/, 'Z')));
    tr.appendChild(cell(labels.device, ev['device.id']));
    tr.appendChild(cell(labels.user, ev['user.name']));
    tr.appendChild(cell(labels.what, what, 'what'));
    tr.appendChild(cell(labels.rule, ev['rule.id']));
    tr.appendChild(cell(labels.category, ev['rule.category']));
    tr.appendChild(cell(labels.stage, ev['kanmon.stage'] || ev.stream));
    table.insertBefore(tr, table.firstChild);
    while (table.children.length > maxRows) { table.removeChild(table.lastChild); }
    document.getElementById('live-count').textContent = String(table.children.length);
  });
  source.addEventListener('problem', function (e) {
    state.textContent = state.getAttribute('data-problem') + ' ' + JSON.parse(e.data).error;
    state.setAttribute('data-state', 'problem');
  });
  source.onerror = function () {
    state.textContent = state.getAttribute('data-reconnecting');
    state.setAttribute('data-state', 'reconnecting');
  };
})();
"""


@bp.get("/live/live.js")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def live_js():
    return Response(LIVE_JS, mimetype="text/javascript", headers={"Cache-Control": "no-cache"})
