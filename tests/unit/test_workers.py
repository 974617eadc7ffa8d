"""issue #22: the inspection workers' machinery without the lab -- metric sums, the log path
surviving a worker's SIGKILL, and the pool's supervision (acknowledged reconcile, a worker
that does not answer is killed and forked again, a dead worker's counts are kept)."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import struct
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.runtime import workers
from gateway.runtime.workers import Frames, RemoteLogStore, Uplink, WorkerPool, encode, merge, retained, snapshot


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

    got = asyncio.run(read_all(parent_end))
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert all(m[0] == "logs" for m in got)
    records = [r for m in got for r in m[1]]
    assert [r[1]["n"] for r in records] == list(range(300))
    assert all(stream == "proxy" and seq == 0 for stream, _, seq in records)


def test_frames_split_anywhere_arrive_whole_in_order_and_a_frame_cut_short_is_not_a_message():
    messages = [("logs", [("proxy", {"n": n, "pad": "x" * (n * 37)}, n)]) for n in range(20)]
    data = b"".join(encode(m) for m in messages)

    async def run(step: int) -> tuple[list, int]:
        got, chunks = [], []
        frames = Frames(got.append, lambda: chunks.append(len(got)))
        for i in range(0, len(data), step):
            frames.data_received(data[i:i + step])
        frames.data_received(encode(("logs", [("proxy", {"n": 99}, 99)]))[:-3])   # the sender died mid-frame
        frames.connection_lost(None)
        assert frames.closed.done()
        return got, len(chunks)

    for step in (1, 7, 4096, len(data)):
        got, chunks = asyncio.run(run(step))
        assert got == messages, step
        assert chunks == -(-len(data) // step) + 1   # one on_chunk per piece of data read

    async def oversized():
        frames = Frames(pytest.fail)
        with pytest.raises(ValueError):
            frames.data_received(struct.pack("!I", workers._MAX_FRAME + 1) + b"x")
    asyncio.run(oversized())


async def read_all(sock: socket.socket) -> list:
    """Every message on ``sock`` until the other end closes it."""
    got = []
    frames = Frames(got.append)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: frames, sock=sock)
    await frames.closed
    return got


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


def test_records_of_two_loop_turns_go_in_one_message_and_one_answer_settles_them():
    from gateway.logstore import LogWriteError

    uplink = CapturingUplink()

    async def scenario():
        store = RemoteLogStore(uplink, timeout=5)
        first = [store.append_later("proxy", {"n": n}) for n in range(2)]
        await asyncio.sleep(0)           # one turn of the loop: nothing sent yet ...
        assert uplink.sent == []
        first.append(store.append_later("proxy", {"n": 2}))   # ... and this one joins them
        await asyncio.sleep(0)
        assert [m[0] for m in uplink.sent] == ["logs"]
        assert [(stream, r["n"], seq) for stream, r, seq in uplink.sent[0][1]] == [
            ("proxy", 0, 1), ("proxy", 1, 2), ("proxy", 2, 3)]
        later = [store.append_later("dns", {"n": 3}), store.append_later("proxy", {"n": 4})]
        for _ in range(2):
            await asyncio.sleep(0)
        assert [m[0] for m in uplink.sent] == ["logs", "logs"]
        assert [(stream, seq) for stream, _, seq in uplink.sent[1][1]] == [("dns", 4), ("proxy", 5)]
        assert not any(f.done() for f in first + later), "nothing is written before the writer answered"
        store.written(4, {2: "OSError: [Errno 28] No space left on device", 4: "OSError: [Errno 5] EIO"})
        assert all(f.done() for f in first + later[:1]) and not later[1].done()
        assert first[0].result() is None and first[2].result() is None
        with pytest.raises(LogWriteError, match="No space left") as failed:
            first[1].result()
        assert failed.value.stream == "proxy"
        with pytest.raises(LogWriteError, match="EIO") as failed:
            later[0].result()
        assert failed.value.stream == "dns"
        store.written(5, None)
        assert later[1].result() is None

    asyncio.run(scenario())


def test_an_append_off_the_loop_waits_for_the_writer_and_a_failed_write_raises():
    import threading

    from gateway.logstore import LogWriteError

    uplink = CapturingUplink()
    outcome = {}

    async def scenario():
        store = RemoteLogStore(uplink, loop_thread=-1, timeout=5, loop=asyncio.get_running_loop())
        assert store.writes_block

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
            if sum(len(m[1]) for m in uplink.sent) == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not outcome, "no append returns before the writer answered"
        seq = {r["n"]: s for m in uplink.sent for _, r, s in m[1]}
        store.written(max(seq.values()), {seq["full"]: "OSError: [Errno 28] No space left on device"})
        for t in threads:
            await asyncio.to_thread(t.join, 5)

    asyncio.run(scenario())
    assert outcome["ok"] == "written"
    assert outcome["full"].startswith("failed") and "No space left" in outcome["full"]


def test_an_append_from_a_thread_after_the_loop_closed_fails():
    from gateway.logstore import LogWriteError

    loop = asyncio.new_event_loop()
    store = RemoteLogStore(CapturingUplink(), loop_thread=-1, timeout=5, loop=loop)
    loop.close()
    with pytest.raises(LogWriteError):
        store.append("auth", {"n": 1})
    with pytest.raises(LogWriteError):
        RemoteLogStore(CapturingUplink(), loop_thread=-1).append("auth", {"n": 1})   # no loop at all


def test_an_unanswered_append_fails_instead_of_passing():
    from gateway.logstore import LogWriteError

    async def scenario():
        store = RemoteLogStore(CapturingUplink(), timeout=0.2)
        with pytest.raises(LogWriteError, match="did not answer"):
            await asyncio.wait_for(store.append_later("proxy", {"n": 1}), 5)

    asyncio.run(scenario())


def test_a_record_that_cannot_be_encoded_fails_alone_and_the_others_are_sent():
    import threading

    from gateway.logstore import LogWriteError

    class EncodingUplink(CapturingUplink):
        def send(self, message):
            super().send(pickle.loads(encode(message)[4:]))   # encodes as the real one does

    uplink = EncodingUplink()

    async def scenario():
        store = RemoteLogStore(uplink, timeout=5)
        good = store.append_later("proxy", {"n": 1})
        bad = store.append_later("proxy", {"n": 2, "lock": threading.Lock()})   # not picklable
        also_good = store.append_later("dns", {"n": 3})
        for _ in range(2):
            await asyncio.sleep(0)
        with pytest.raises(LogWriteError):
            bad.result()
        sent = [(stream, r["n"], seq) for m in uplink.sent for stream, r, seq in m[1]]
        assert sent == [("proxy", 1, 1), ("dns", 3, 3)]
        store.written(3, None)
        assert good.result() is None and also_good.result() is None
        with pytest.raises(LogWriteError):
            store.append("conn", {"n": 4, "lock": threading.Lock()})   # on the loop: raised at once

    asyncio.run(scenario())


def test_a_parent_that_is_gone_fails_every_record_waiting():
    from gateway.logstore import LogWriteError

    class GoneUplink:
        def send(self, message):
            raise BrokenPipeError(32, "Broken pipe")

    async def scenario():
        store = RemoteLogStore(GoneUplink(), timeout=5)
        waiting = [store.append_later("proxy", {"n": n}) for n in range(3)]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, LogWriteError) for r in results)
        with pytest.raises(LogWriteError):
            store.append("conn", {"n": 4})   # on the loop: raised at once

    asyncio.run(scenario())


class FakeWriter:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


def test_the_writer_appends_in_order_and_answers_each_turn_once_naming_the_failures():
    written = []

    def on_log(stream, record):
        if record["n"] in (2, 5):
            raise OSError(28, "No space left on device")
        written.append((stream, record["n"]))

    async def scenario():
        pool = WorkerPool(1, CollectorRegistry(), standin_worker, on_log=on_log, on_fatal=pytest.fail)
        worker = workers._Worker(0, 0, FakeWriter())
        frames = Frames(lambda message: pool._received(worker, message), lambda: pool._answer_logs(worker))
        frames.data_received(encode(("logs", [("proxy", {"n": 1}, 1), ("proxy", {"n": 2}, 2), ("conn", {"n": 0}, 0)]))
                             + encode(("logs", [("dns", {"n": 3}, 3), ("proxy", {"n": 4}, 4), ("proxy", {"n": 5}, 5)])))
        answers = []
        decoder = Frames(answers.append)
        decoder.data_received(worker.writer.data)
        assert answers == [("logged", 5, {2: "OSError: [Errno 28] No space left on device",
                                          5: "OSError: [Errno 28] No space left on device"})], "one answer for both"
        frames.data_received(encode(("logs", [("conn", {"n": 6}, 0)])))   # nothing waits for it: no answer
        frames.data_received(encode(("logs", [("conn", {"n": 7}, 6)])))
        answers.clear()
        decoder.data_received(worker.writer.data[len(worker.writer.data) - len(encode(("logged", 6, None))):])
        assert answers == [("logged", 6, None)] and worker.writer.data.count(b"logged") == 2

    asyncio.run(scenario())
    assert written == [("proxy", 1), ("conn", 0), ("dns", 3), ("proxy", 4), ("conn", 6), ("conn", 7)]


def logging_worker(index: int, down: socket.socket, up: socket.socket) -> None:
    """Writes 60 records through the parent, all at once, reports what each append said (as a
    quarantine order, the one message the pool hands to a callback), then kills itself."""
    async def run():
        loop = asyncio.get_running_loop()
        uplink = Uplink(up)
        store = RemoteLogStore(uplink, loop=loop, timeout=5)
        await loop.connect_accepted_socket(
            lambda: Frames(lambda message: store.written(message[1], message[2]) if message[0] == "logged" else None),
            sock=down)
        uplink.send(("ready", os.getpid()))
        results = []
        for chunk in range(3):   # three bursts: several messages, several answers
            futures = [store.append_later("proxy", {"n": chunk * 20 + i}) for i in range(20)]
            results += await asyncio.gather(*futures, return_exceptions=True)
        uplink.send(("quarantine", ["written" if r is None else f"failed: {r}" for r in results]))
        os.kill(os.getpid(), signal.SIGKILL)
    asyncio.run(run())


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_worker_gets_every_answer_and_what_was_answered_written_is_in_the_store_after_kill_9(monkeypatch):
    monkeypatch.setattr(workers, "RESTART_DELAY", 30)   # not forked again during the test
    written, reports = [], []

    def on_log(stream, record):
        if record["n"] % 7 == 3:
            raise OSError(5, "Input/output error")
        written.append(record["n"])

    async def scenario():
        pool = WorkerPool(1, CollectorRegistry(), logging_worker, on_log=on_log, on_fatal=pytest.fail,
                          on_quarantine=reports.append)
        await pool.start(timeout=10)
        try:
            for _ in range(200):
                if reports and not pool.workers[0].alive:
                    break
                await asyncio.sleep(0.02)
        finally:
            await pool.stop()

    asyncio.run(scenario())
    assert len(reports) == 1 and len(reports[0]) == 60
    for n, said in enumerate(reports[0]):
        if n % 7 == 3:
            assert said.startswith("failed") and "Input/output error" in said, (n, said)
        else:
            assert said == "written", (n, said)
    assert written == [n for n in range(60) if n % 7 != 3], "in order, and every acknowledged record is there"


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


def test_the_access_log_awaits_the_writer_on_the_loop_and_a_failed_write_blocks_the_flow():
    import inspect
    import threading

    from mitmproxy.test import tflow

    from addons.accesslog import AccessLog
    from gateway.logstore import LogWriteError
    from gateway.proxy.connections import LiveConnections

    uplink = CapturingUplink()

    async def invoke(hook, *args):   # what mitmproxy does with a hook's result
        result = hook(*args)
        if result is not None and inspect.isawaitable(result):
            await result

    async def scenario(on_log_failure: str, error: str | None):
        uplink.sent.clear()
        store = RemoteLogStore(uplink, timeout=5)
        accesslog = AccessLog(store, on_log_failure=on_log_failure, connections=LiveConnections())
        threads = threading.active_count()
        hook = asyncio.create_task(invoke(accesslog.response, tflow.tflow(resp=True)))
        await asyncio.sleep(0.05)
        assert not hook.done(), "the flow waits for its record"
        assert threading.active_count() == threads, "no thread per record"
        [(stream, record, seq)] = uplink.sent[0][1]
        assert stream == "proxy" and record["event.dataset"] == "kanmon.proxy"
        store.written(seq, {seq: error} if error else None)
        await asyncio.wait_for(hook, 5)

    asyncio.run(scenario("block", None))
    with pytest.raises(LogWriteError, match="No space left"):
        asyncio.run(scenario("block", "OSError: [Errno 28] No space left on device"))
    asyncio.run(scenario("continue", "OSError: [Errno 28] No space left on device"))   # configured to serve on
