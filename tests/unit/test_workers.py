"""issue #22: the inspection workers' machinery without the lab -- metric sums, the log path
surviving a worker's SIGKILL, and the pool's supervision (acknowledged reconcile, a worker
that does not answer is killed and forked again, a dead worker's counts are kept)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.runtime import workers
from gateway.runtime.workers import (RemoteLogStore, Uplink, WorkerPool, encode, merge, read_message, retained,
                                     snapshot)


def registry_with(counter: float, gauge: float, label: str = "a") -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("k_requests", "requests", ["kind"], registry=r).labels(label).inc(counter)
    Gauge("k_open", "open connections", registry=r).set(gauge)
    return r


def values(families) -> dict:
    return {(s[0], s[1]): s[2] for f in families for s in f[4]}


def test_merge_sums_counters_and_gauges_and_keeps_the_earliest_created():
    a, b = snapshot(registry_with(3, 2)), snapshot(registry_with(4, 5))
    merged = values(merge([a, b]))
    assert merged[("k_requests_total", (("kind", "a"),))] == 7
    assert merged[("k_open", ())] == 7
    created = [v for (name, _), v in values(a).items() if name == "k_requests_created"]
    created += [v for (name, _), v in values(b).items() if name == "k_requests_created"]
    assert merged[("k_requests_created", (("kind", "a"),))] == min(created)
    # different labels stay apart
    merged = values(merge([a, snapshot(registry_with(1, 0, label="b"))]))
    assert merged[("k_requests_total", (("kind", "a"),))] == 3 and merged[("k_requests_total", (("kind", "b"),))] == 1


def test_a_dead_workers_counters_are_kept_and_its_gauges_dropped():
    kept = retained(snapshot(registry_with(3, 9)))
    names = {f[0] for f in kept}
    assert "k_requests" in names and "k_open" not in names


@dataclass
class FakeReport:
    revision: int


class FakePool:
    def __init__(self, *snaps):
        self.retired = []
        self.snapshots = dict(enumerate(snaps))


def test_exposition_is_one_family_per_metric_and_parses():
    parent = registry_with(1, 1)
    expo = workers.MergedExposition(parent, FakePool(snapshot(registry_with(2, 3)), snapshot(registry_with(4, 5))))
    text = generate_latest(expo).decode()
    assert text.count("# TYPE k_requests_total counter") == 1 and text.count("# TYPE k_open gauge") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    total = [s.value for s in families["k_requests"].samples if s.name == "k_requests_total"]
    assert total == [7.0]
    assert [s.value for s in families["k_open"].samples] == [9.0]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_records_sent_before_a_sigkill_all_arrive():
    """A record counts as written once ``append`` returned: kill -9 right after loses none."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            parent_end.close()
            store = RemoteLogStore(Uplink(child_end))
            for i in range(300):
                store.append("proxy", {"n": i, "url.full": "http://x.test/" + "a" * (i * 7)})
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    child_end.close()

    async def read_all() -> list:
        reader, _ = await asyncio.open_unix_connection(sock=parent_end)
        out = []
        while (message := await read_message(reader)) is not None:
            out.append(message)
        return out

    got = asyncio.run(read_all())
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [m[2]["n"] for m in got] == list(range(300))
    assert all(m[0] == "log" and m[1] == "proxy" for m in got)


def test_a_frame_cut_short_is_not_a_message():
    async def run() -> list:
        reader = asyncio.StreamReader()
        whole = encode(("log", "proxy", {"n": 1}))
        reader.feed_data(whole + encode(("log", "proxy", {"n": 2}))[:-3])
        reader.feed_eof()
        return [await read_message(reader), await read_message(reader)]

    first, second = asyncio.run(run())
    assert first == ("log", "proxy", {"n": 1}) and second is None


# -- the pool with stand-in workers (forked for real) ----------------------------------------

def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def standin_worker(index: int, down: socket.socket, up: socket.socket) -> None:
    """Acknowledges reconcile reports -- except worker 1 when the report's revision is 13."""
    import pickle
    uplink = Uplink(up)
    reg = registry_with(5 + index, 1)
    counter = reg._names_to_collectors["k_requests"]
    uplink.send(("ready", os.getpid()))
    uplink.send(("metrics", snapshot(reg)))
    down.setblocking(True)
    while (head := _recv_exactly(down, 4)) is not None:
        message = pickle.loads(_recv_exactly(down, struct.unpack("!I", head)[0]))
        if message[0] == "reconcile" and not (index == 1 and message[1].revision == 13):
            uplink.send(("applied", message[1].revision))
        elif message[0] == "metrics?":   # a scrape: count one more, answer with the current values
            counter.labels("a").inc()
            uplink.send(("metrics", snapshot(reg), message[1]))
        elif message[0] == "policy" and message[1] == "chain-broken":
            raise SystemExit(workers.EXIT_FATAL)   # what _serve returns when the chain cannot run
        elif message[0] == "policy":
            uplink.send(("policy", message[1], message[1] != "bad-in-worker"))


def test_pool_waits_for_every_worker_and_replaces_one_that_does_not_answer(monkeypatch):
    monkeypatch.setattr(workers, "RESTART_DELAY", 0.05)
    logged = []

    async def scenario():
        registry = CollectorRegistry()
        pool = WorkerPool(2, registry, standin_worker, on_log=lambda s, r: logged.append((s, r)),
                          on_fatal=lambda why: pytest.fail(why))
        await pool.start(timeout=10)
        try:
            first = {i: w.pid for i, w in pool.workers.items()}
            await pool.reconciled(FakeReport(12), timeout=5)
            assert all(w.applied == 12 for w in pool.live())
            await asyncio.sleep(0.1)   # the stand-ins' metric snapshots
            assert values(snapshot(pool.exposition))[("k_requests_total", (("kind", "a"),))] == 5 + 6
            # a scrape (from the HTTP server's thread) gets every worker's counts as of now
            scraped = await asyncio.to_thread(lambda: values(snapshot(pool.exposition)))
            assert scraped[("k_requests_total", (("kind", "a"),))] == 6 + 7
            # worker 1 does not acknowledge revision 13: killed, forked again from the parent
            await pool.reconciled(FakeReport(13), timeout=0.5)
            for _ in range(100):
                if pool.workers[1].pid != first[1] and pool.workers[1].ready.is_set() and pool.workers[1].alive:
                    break
                await asyncio.sleep(0.05)
            assert pool.workers[1].pid != first[1] and pool.workers[1].alive
            assert pool.workers[0].pid == first[0], "the other worker kept serving"
            assert registry.get_sample_value("kanmon_worker_restarts_total", {"worker": "1"}) == 1
            assert registry.get_sample_value("kanmon_worker_up", {"worker": "1"}) == 1
            await asyncio.sleep(0.1)
            # the dead worker's count (7) is kept beside the new one's (6) and worker 0's (6)
            assert values(snapshot(pool.exposition))[("k_requests_total", (("kind", "a"),))] == 6 + 7 + 6
            # a worker that cannot load a policy is replaced too
            before = pool.workers[1].pid
            await pool.switch_policy("bad-in-worker", timeout=5)
            for _ in range(100):
                if pool.workers[1].pid != before and pool.workers[1].alive:
                    break
                await asyncio.sleep(0.05)
            assert registry.get_sample_value("kanmon_worker_restarts_total", {"worker": "0"}) == 1
            assert registry.get_sample_value("kanmon_worker_restarts_total", {"worker": "1"}) == 2
        finally:
            await pool.stop()
        assert not pool.live()

    asyncio.run(scenario())


def test_a_worker_that_cannot_run_its_chain_stops_the_gateway_instead_of_restarting(monkeypatch):
    monkeypatch.setattr(workers, "RESTART_DELAY", 0.05)
    fatal = []

    async def scenario():
        pool = WorkerPool(1, CollectorRegistry(), standin_worker, on_log=lambda s, r: None, on_fatal=fatal.append)
        await pool.start(timeout=10)
        pid = pool.workers[0].pid
        try:
            await pool.switch_policy("chain-broken", timeout=5)
            await asyncio.sleep(0.3)
            assert fatal and "worker 0" in fatal[0]
            assert pool.workers[0].pid == pid and not pool.workers[0].alive, "not forked again"
        finally:
            await pool.stop()

    asyncio.run(scenario())


class CapturingUplink:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


def test_an_append_off_the_loop_waits_for_the_writer_and_a_failed_write_raises():
    import threading

    from gateway.logstore import LogWriteError

    uplink = CapturingUplink()
    store = RemoteLogStore(uplink, loop_thread=-1, timeout=5)   # every caller counts as a thread
    assert store.writes_block, "the access log runs the appends in a thread and awaits them"
    outcome = {}

    def writer(name):
        try:
            store.append("proxy", {"n": name})
            outcome[name] = "written"
        except LogWriteError as exc:
            outcome[name] = f"failed: {exc}"

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("ok", "full")]
    for t in threads:
        t.start()
    for _ in range(200):
        if len(uplink.sent) == 2:
            break
        threading.Event().wait(0.01)
    assert not outcome, "no append returns before the writer answered"
    seq = {m[2]["n"]: m[3] for m in uplink.sent}
    store.written(seq["full"], "OSError: [Errno 28] No space left on device")
    store.written(seq["ok"], None)
    for t in threads:
        t.join(5)
    assert outcome["ok"] == "written"
    assert outcome["full"].startswith("failed") and "No space left" in outcome["full"]


def test_an_unanswered_append_fails_instead_of_passing():
    from gateway.logstore import LogWriteError

    store = RemoteLogStore(CapturingUplink(), loop_thread=-1, timeout=0.2)
    with pytest.raises(LogWriteError):
        store.append("proxy", {"n": 1})


def sessions_worker(index: int, down: socket.socket, up: socket.socket) -> None:
    """Hands one quarantine order up at start; acknowledges ended-sessions notices -- except
    worker 1 when a notice names "late"."""
    import pickle
    uplink = Uplink(up)
    uplink.send(("ready", os.getpid()))
    uplink.send(("quarantine", {"device_id": f"dev-of-worker-{index}"}))
    down.setblocking(True)
    while (head := _recv_exactly(down, 4)) is not None:
        message = pickle.loads(_recv_exactly(down, struct.unpack("!I", head)[0]))
        if message[0] == "sessions" and not (index == 1 and "late" in message[2]):
            uplink.send(("sessions-done", message[1]))


def test_ended_sessions_reach_every_worker_and_orders_reach_the_gateway(monkeypatch):
    # issue #22: a sign-out counts as applied when every worker has cut; a late worker is
    # replaced; a worker's automatic-quarantine order is carried out by the gateway process
    monkeypatch.setattr(workers, "RESTART_DELAY", 0.05)
    orders = []

    async def scenario():
        pool = WorkerPool(2, CollectorRegistry(), sessions_worker, on_log=lambda s, r: None,
                          on_fatal=lambda why: pytest.fail(why), on_quarantine=orders.append)
        await pool.start(timeout=10)
        try:
            first = {i: w.pid for i, w in pool.workers.items()}
            await pool.sessions_ended({"dev-1"}, timeout=5)
            assert [w.sessions for w in pool.live()] == [1, 1]
            assert pool.workers[1].pid == first[1]
            await pool.sessions_ended({"late"}, timeout=0.5)
            for _ in range(100):
                if pool.workers[1].pid != first[1] and pool.workers[1].alive and pool.workers[1].ready.is_set():
                    break
                await asyncio.sleep(0.05)
            assert pool.workers[1].pid != first[1] and pool.workers[0].pid == first[0]
            for _ in range(100):
                if len(orders) == 3:
                    break
                await asyncio.sleep(0.02)
        finally:
            await pool.stop()

    asyncio.run(scenario())
    assert sorted(o["device_id"] for o in orders) == ["dev-of-worker-0", "dev-of-worker-1", "dev-of-worker-1"]


def test_a_worker_cuts_the_devices_whose_sessions_ended_and_loses_sessions_with_admission():
    from types import SimpleNamespace

    from gateway.signin.sessions import SessionDirectory, UserSession

    def user_session(device_id):
        return UserSession(f"s-{device_id}", device_id, "10.77.0.2", "u", "sub", "iss")

    directory = SessionDirectory()
    for d in ("dev-1", "dev-2", "dev-3"):
        directory.put(user_session(d))
    cut: list[tuple[set, str]] = []
    signin = SimpleNamespace(directory=directory, follow_store=lambda: {"dev-2"})   # the store lost dev-2's too
    app = SimpleNamespace(signin=signin, _cut_devices=lambda ids, why: cut.append((set(ids), why)))
    asyncio.run(workers.follow_sessions(app, {"dev-1"}))
    assert cut == [({"dev-1", "dev-2"}, "user session ended")]
    assert {s.device_id for s in directory.all()} == {"dev-3"}

    def unreadable():
        raise OSError("database is locked")

    signin.follow_store = unreadable   # the named ends still end here
    directory.put(user_session("dev-1"))
    cut.clear()
    asyncio.run(workers.follow_sessions(app, {"dev-1"}))
    assert cut == [({"dev-1"}, "user session ended")] and {s.device_id for s in directory.all()} == {"dev-3"}

    # a reconcile report: dev-3 lost admission, so its session leaves this worker's copy
    record = SimpleNamespace(device_id="dev-3")
    report = SimpleNamespace(changed=[record], admitted_ids=set(), full=False)
    updates = []
    app = SimpleNamespace(signin=signin, directory=SimpleNamespace(update=lambda a, r: updates.append((a, r))),
                          connections=SimpleNamespace(all=lambda: []), policy=None)
    workers.follow_reconcile(app, report)
    assert updates == [([], [record])] and len(directory) == 0
