"""Following the log store from another process (gateway/logstore/follow.py) and the live
view's shared ring with resumable cursors (gateway/logstore/live.py), issue #21: no event
lost or delivered twice across a resume, a rotation, a gzip, a torn line or a restart of the
reader; memory bounded by the ring whatever the number of viewers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.logstore import LogStore
from gateway.logstore.follow import StreamFollower
from gateway.logstore.live import LiveBlocks, format_cursor, is_blocked, parse_cursor


class Clock:
    def __init__(self):
        self.now = datetime(2026, 5, 1, 10, tzinfo=UTC)

    def __call__(self):
        return self.now


def write(store: LogStore, stream: str, n: int, start: int = 0, block_every: int = 3, device: str = "d1",
          category: str = "webmail") -> list[int]:
    """Append n records; returns the indexes that are blocks."""
    blocked = []
    for i in range(start, start + n):
        is_block = i % block_every == 0
        store.append(stream, {"device.id": device, "user.name": "u", "source.ip": "10.8.0.2",
                              "kanmon.verdict": "block" if is_block else "allow", "rule.id": f"r{i}",
                              "rule.category": category, "url.full": f"https://x.jp/{i}",
                              "http.request.method": "GET"})
        if is_block:
            blocked.append(i)
    return blocked


def urls(events) -> list[str]:
    return [e.fields["url.full"] for e in events]


def test_follower_starts_at_the_end_and_reads_only_new_records(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    write(store, "proxy", 5)
    follower = StreamFollower(tmp_path, "proxy")
    assert follower.position == 5 and follower.poll() == []
    write(store, "proxy", 3, start=5)
    got = follower.poll()
    assert [r.seq for r in got] == [6, 7, 8]
    assert follower.poll() == []


def test_follower_waits_for_a_line_being_written(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    write(store, "proxy", 2)
    follower = StreamFollower(tmp_path, "proxy", after=0)
    path = tmp_path / "proxy" / "proxy-2026-05-01.jsonl"
    whole = path.read_bytes()
    line = whole.splitlines(keepends=True)[-1]
    path.write_bytes(whole + line[:20])            # a third line, half written
    assert [r.seq for r in follower.poll()] == [1, 2]
    with open(path, "ab") as fh:
        fh.write(line[20:].replace(b'"event.sequence":2', b'"event.sequence":2'))
    # the completed line is a copy of record 2: same sequence, so never delivered twice
    assert follower.poll() == []


def test_follower_follows_rotation_and_gzip_without_loss(tmp_path):
    clock = Clock()
    store = LogStore(tmp_path, clock=clock)
    write(store, "proxy", 4)
    follower = StreamFollower(tmp_path, "proxy", after=0)
    assert [r.seq for r in follower.poll(limit=2)] == [1, 2]
    write(store, "proxy", 2, start=4)              # 5, 6 on day 1
    clock.now += timedelta(days=1)
    write(store, "proxy", 3, start=6)              # seal (7) of day 1, then 8, 9, 10 on day 2
    store.rotate_if_needed()                       # day 1 gzipped while we were at offset 2
    assert sorted(p.name for p in (tmp_path / "proxy").iterdir())[0].endswith(".gz")
    got = follower.poll()
    assert [r.seq for r in got] == [3, 4, 5, 6, 7, 8, 9, 10]
    assert got[4].record["event.action"] == "log-sealed"


@pytest.mark.parametrize("after", [0, 3, 6, 7, 9])
def test_resume_from_any_sequence_across_days(tmp_path, after):
    clock = Clock()
    store = LogStore(tmp_path, clock=clock)
    write(store, "proxy", 3)                       # 1..3, seal 4
    clock.now += timedelta(days=1)
    write(store, "proxy", 2, start=3)              # 5, 6, seal 7
    clock.now += timedelta(days=1)
    write(store, "proxy", 3, start=5)              # 8, 9, 10
    store.rotate_if_needed()
    follower = StreamFollower(tmp_path, "proxy", after=after)
    assert [r.seq for r in follower.poll()] == list(range(after + 1, 11))
    assert not follower.gap


def test_resume_before_purged_files_says_there_is_a_gap(tmp_path):
    clock = Clock()
    store = LogStore(tmp_path, clock=clock)
    write(store, "proxy", 3)
    clock.now += timedelta(days=1)
    write(store, "proxy", 2, start=3)
    store.close()
    (tmp_path / "proxy" / "proxy-2026-05-01.jsonl").unlink()
    follower = StreamFollower(tmp_path, "proxy", after=1)
    assert follower.gap
    assert [r.seq for r in follower.poll()] == [5, 6]


def test_damaged_line_is_skipped_not_fatal(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    write(store, "proxy", 1)
    store.close()
    path = tmp_path / "proxy" / "proxy-2026-05-01.jsonl"
    with open(path, "ab") as fh:
        fh.write(b'{"not": "chained"}\n')
    store = LogStore(tmp_path, clock=Clock())
    write(store, "proxy", 1, start=1)
    follower = StreamFollower(tmp_path, "proxy", after=0)
    assert [r.seq for r in follower.poll()] == [1, 2]
    assert follower.unreadable_lines == 1


def test_is_blocked():
    assert is_blocked({"kanmon.verdict": "block"})
    assert is_blocked({"kanmon.verdict": "monitor", "event.type": ["denied"]})
    assert not is_blocked({"kanmon.verdict": "allow", "event.type": ["allowed"]})
    assert not is_blocked({"event.dataset": "kanmon.log", "event.action": "log-sealed", "kanmon.verdict": "block"})


def test_cursor_round_trip_and_refusal_of_foreign_ids():
    assert parse_cursor(format_cursor({"proxy": 12, "dns": 3})) == {"proxy": 12, "dns": 3}
    for bad in (None, "", "x", "proxy:1.proxy:2", "evil:1", "proxy:-1", "proxy:1\nid: 2", "proxy:" + "9" * 40):
        assert parse_cursor(bad) is None


def test_hub_delivers_blocks_to_a_fresh_viewer_from_now_on(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    write(store, "proxy", 6)                       # written before the console started: not live
    hub = LiveBlocks(tmp_path, streams=("proxy", "dns"))
    cursor = hub.head()
    assert hub.read(cursor) == ([], cursor)
    blocked = write(store, "proxy", 6, start=6)
    write(store, "dns", 3, block_every=1)
    hub.poll_once()
    events, cursor = hub.read(cursor)
    assert sorted(urls(events)) == sorted([f"https://x.jp/{i}" for i in blocked] + ["https://x.jp/0", "https://x.jp/1", "https://x.jp/2"])
    assert all(e.fields["kanmon.verdict"] == "block" for e in events)
    assert cursor == {"proxy": 12, "dns": 3}
    assert hub.read(cursor)[0] == []


def test_resume_with_last_event_id_neither_loses_nor_repeats(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    hub = LiveBlocks(tmp_path, streams=("proxy",), capacity=1000)
    cursor = hub.head()
    write(store, "proxy", 30, block_every=1)
    hub.poll_once()
    first, _ = hub.read(cursor, limit=7)            # the connection drops after 7 events
    # the browser resumes with the id of the last event it got
    last_id = format_cursor({"proxy": first[-1].seq})
    write(store, "proxy", 10, start=30, block_every=1)
    hub.poll_once()
    rest, _ = hub.read(parse_cursor(last_id))
    assert urls(first) + urls(rest) == [f"https://x.jp/{i}" for i in range(40)]


def test_viewer_behind_the_ring_catches_up_from_the_files(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    hub = LiveBlocks(tmp_path, streams=("proxy",), capacity=10)
    cursor = hub.head()
    write(store, "proxy", 100, block_every=2)       # 50 blocks; the ring keeps the last 10
    hub.poll_once()
    assert hub.evicted == 40
    seen: list[str] = []
    for _ in range(20):
        events, cursor = hub.read(cursor, limit=8)  # small batches: catch-up and ring together
        seen += urls(events)
        if not events:
            break
    assert seen == [f"https://x.jp/{i}" for i in range(0, 100, 2)]


def test_a_restarted_console_resumes_an_old_cursor_from_the_files(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    hub = LiveBlocks(tmp_path, streams=("proxy",))
    cursor = hub.head()
    write(store, "proxy", 5, block_every=1)
    hub.poll_once()
    got, _ = hub.read(cursor, limit=2)
    write(store, "proxy", 5, start=5, block_every=1)     # written while the console was down
    restarted = LiveBlocks(tmp_path, streams=("proxy",))  # starts at the end of the stream
    rest, _ = restarted.read({"proxy": got[-1].seq})
    assert urls(got) + urls(rest) == [f"https://x.jp/{i}" for i in range(10)]


def test_filters_by_device_and_category():
    from gateway.logstore.live import LiveEvent
    e = LiveEvent("proxy", 1, {"device.id": "d1", "rule.category": "webmail"})
    assert e.matches(None, None) and e.matches("d1", "webmail")
    assert not e.matches("d2", None) and not e.matches(None, "storage")


def test_ring_memory_is_bounded_whatever_the_viewers(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    hub = LiveBlocks(tmp_path, streams=("proxy",), capacity=50)
    cursors = [hub.head() for _ in range(200)]
    write(store, "proxy", 500, block_every=1)
    hub.poll_once()
    assert len(hub._ring) == 50
    events, _ = hub.read(cursors[0], limit=1000)
    assert len(events) == 500 and len({e.seq for e in events}) == 500


def test_shown_fields_leave_out_what_the_viewer_need_not_see(tmp_path):
    store = LogStore(tmp_path, clock=Clock())
    hub = LiveBlocks(tmp_path, streams=("proxy",))
    cursor = hub.head()
    store.append("proxy", {"device.id": "d1", "kanmon.verdict": "block", "user_agent.original": "UA",
                           "url.full": "https://x.jp/"})
    hub.poll_once()
    [event], _ = hub.read(cursor)
    assert "user_agent.original" not in event.fields and "event.hash" not in event.fields
    json.dumps(event.fields)


def test_the_cheap_line_test_never_drops_a_block(tmp_path):
    """may_be_blocked may let a non-block through (it is parsed and checked), never drop a block."""
    from gateway.logstore.live import may_be_blocked
    store = LogStore(tmp_path, clock=Clock())
    store.append("proxy", {"kanmon.verdict": "block", "url.full": "https://x.jp/"})
    store.append("conn", {"kanmon.verdict": "monitor", "event.type": ["denied"]})
    store.append("proxy", {"kanmon.verdict": "allow", "url.full": 'https://x.jp/?q="kanmon.verdict":"block"&"denied"'})
    store.append("proxy", {"kanmon.verdict": "allow", "url.full": "https://x.jp/denied"})
    lines = {s: (tmp_path / s / f"{s}-2026-05-01.jsonl").read_bytes().splitlines() for s in ("proxy", "conn")}
    assert [may_be_blocked(raw) for raw in lines["proxy"]] == [True, False, False]
    assert [may_be_blocked(raw) for raw in lines["conn"]] == [True]
    hub = LiveBlocks(tmp_path, streams=("proxy", "conn"))
    assert hub.head() == {"proxy": 3, "conn": 1}
    events, cursor = hub.read({"proxy": 0, "conn": 0})
    assert sorted((e.stream, e.seq) for e in events) == [("conn", 1), ("proxy", 1)]
    assert cursor == {"proxy": 3, "conn": 1}


def test_a_viewer_catching_up_in_small_reads_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """Each read continues with the follower the previous read left (no rescan from the start
    of the file), and the result is the same as one big read."""
    from gateway.logstore import live as live_module
    store = LogStore(tmp_path, clock=Clock())
    hub = LiveBlocks(tmp_path, streams=("proxy",), capacity=5)
    start = hub.head()
    write(store, "proxy", 300, block_every=3)
    hub.poll_once()
    created = []
    real = live_module.StreamFollower

    def counting(*a, **kw):
        created.append(kw.get("after"))
        return real(*a, **kw)
    monkeypatch.setattr(live_module, "StreamFollower", counting)
    cursor, seen = dict(start), []
    while True:
        events, cursor = hub.read(cursor, limit=7)
        if not events:
            break
        assert len(events) <= 7
        seen += urls(events)
    assert seen == [f"https://x.jp/{i}" for i in range(0, 300, 3)]
    assert created == [0]          # one follower for the whole catch-up
