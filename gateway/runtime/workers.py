"""Inspection workers (issue #22, `proxy.workers: auto | N` with N > 1).

The gateway process (the *parent*) keeps everything that exists once per host: the tunnel and
its peers, the nftables table, the registry and the reconciler, the log files, the metrics
endpoint, enrollment, feeds and the policy compile. It forks N *workers*, each a mitmproxy
master with the full addon chain (addons/chain.py, the one builder) listening on
``transparent_port + i`` and ``dns_port + i``. nftables sends each device to one worker by a
hash of its tunnel source address (gateway/net/steering.py), so one device's flows, DNS
bindings and limits stay in one worker. ``workers: 1`` does not come here at all: the gateway
runs as the single process it always was.

What stays whole across the workers, and why this way:

- **Start-up and restarts fork from the parent after the policy compiled** (and after the
  first reconcile), with ``gc.freeze()`` first: the compiled policy, the device directory and
  the code are shared copy-on-write, not compiled or loaded N times. A worker that dies is
  forked again from the parent's *current* state, so it comes back with the policy and the
  devices in force at that moment, whatever it missed.
- **Revocation, suspension, quarantine, record changes**: the parent's reconcile pass (peers
  and drop set first, as before) sends its report to every worker; each updates its device
  directory and cuts its own live connections of the changed devices, then acknowledges the
  revision. The parent confirms the revision to the waiting operator command only when every
  live worker has acknowledged, so "revoked" on the terminal means cut in every worker. A
  worker that does not acknowledge within ``ACK_TIMEOUT`` is killed (fail closed: its devices
  are refused until it is forked again, with the new state). Chosen over a kernel socket
  destroy (``ss -K``): that would cut the device side of revoked devices only, while a
  quarantine or a group change keeps the device admitted and needs the worker's directory and
  its cached verdicts updated anyway -- one message does both, within the same 100 ms.
- **Policy apply and feed update**: the parent compiles (off its loop, as before). A policy
  that does not compile is refused there, so no worker ever sees it and the old one keeps
  serving everywhere. A good one is swapped in the parent, then each worker loads it from the
  prepared-policy cache the parent's compile has just written (gateway/runtime/policycache.py:
  no list is parsed again) and swaps it in one assignment, checking that it got the version
  the parent compiled. A worker that fails or is late is killed and forked again from the
  parent, which serves the new policy: every worker serves the same version afterwards.
  Memory: after a reload the big host tables (block lists of thousands of names and more) are
  one file every process maps read-only (gateway/runtime/hosttablefile.py), not a copy per
  worker; the rest of the new snapshot (rules, RE2 sets, small tables) is per process.
- **Logs: one writer.** Workers do not open log files: each record goes over a Unix stream
  socket to the parent, whose one LogStore appends it to the one hash chain of its stream, so
  ``kanmon logs verify/search``, the reports, retention and anchors are unchanged. A chain per
  worker would have meant N chains per stream for every reader to merge and verify. The access
  log awaits the parent's answer on the worker's event loop, so a response reaches the device
  only after its record was written, and a write that failed blocks it
  (``logs.on_write_error``) as in the single process. Group commit, so that this costs little
  per request: the records of two turns of the worker's loop go in one message, the parent
  answers every record of one read with one message (naming the failed ones), and no thread
  is involved (RemoteLogStore). A record sent is in the kernel's socket buffer, which survives
  the worker's ``kill -9``: the parent reads it to the end after the worker died. (The parent
  is the single writer: if it dies the workers lose their socket and end with it.)
- **Metrics: an aggregator in the parent.** A scrape of the parent's /metrics asks every
  worker for a snapshot of its own registry and waits for the answers (at most
  ``SCRAPE_TIMEOUT``; workers also push one every ``METRICS_EVERY`` seconds), then merges them
  with the parent's own: counters, histograms and gauges summed by name and labels (workers
  start from zero metrics, so a gauge only a worker sets -- open connections -- sums to the
  gateway's total, and the parent's own gauges -- peers, policy -- are not multiplied),
  ``*_created`` the earliest. A dead worker's last counters and histograms are kept, so totals
  never go down when it restarts (what it counted after its last snapshot before a ``kill -9``
  is lost). ``kanmon_worker_up{worker}`` and ``kanmon_worker_restarts_total{worker}`` show
  liveness.
- **Fail closed**: a dead worker's port is not listening, so its devices' connections are
  refused (RST) until it is back; nftables never sends them to another worker or around the
  proxy. A worker whose chain cannot be built (an addon that cannot load) stops the gateway,
  as the single process does.

Forking a process that has threads (the log checkpointer, the firewall log reader, the alert
queue, idle executor threads): the child only uses what the parent's event-loop thread -- the
thread that forks, never inside one of them at that moment -- takes locks for (the device
directory, the policy and its verdict table, the tunnel's peer read), and builds the rest anew
(mitmproxy, the chain, metrics, the log client); it never touches the other threads' objects
(log files, registry, alert queue). CPython re-initialises the logging and import locks in the
child, glibc's malloc and jemalloc their arenas' locks (pthread_atfork).

- **User sign-in** (`signin:`): a device's portal requests and its traffic reach the same
  worker (the same tunnel address), so the worker that signs a device in is the one that
  enforces its session. Each worker opens its own connection to the session store (a SQLite
  or PostgreSQL connection is not carried across ``fork``) and writes its auth records and
  counts through the parent like everything else. Sessions end elsewhere too (``kanmon user
  signout``, expiry, the console, another node): the parent's session tick (every reconcile
  poll, 50 ms) sees them, writes their auth records once, and sends the ended devices to every
  worker; each reloads its sessions from the store, cuts the live connections of those
  devices and acknowledges, as for a reconcile report (late: killed and forked again). A
  device that loses admission loses its session in the workers with the reconcile report.
- **Automatic quarantine** (`auto_quarantine:`): the triggers are counted where they are seen,
  in the worker that holds the device (one device, one worker: per-device thresholds hold).
  A worker's order goes to the parent, which carries it out as the single process does
  (registry write with audit entry, reconcile poke, alert, metric); the reconcile report then
  cuts the device in its worker like a quarantine by an operator.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import dataclasses
import gc
import logging
import os
import pickle
import signal
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge
from prometheus_client.core import Metric

log = logging.getLogger("kanmon.workers")

ACK_TIMEOUT = 2.0            # seconds a worker has to apply a reconcile report
POLICY_TIMEOUT = 120.0       # seconds a worker has to load a new policy (from the prepared cache)
METRICS_EVERY = 0.5          # seconds between a worker's metric snapshots
RESTART_DELAY = 1.0          # seconds before a dead worker is forked again (no busy restart loop)
READY_TIMEOUT = 60.0
SCRAPE_TIMEOUT = 1.0         # seconds a scrape waits for the workers' current counts
LOG_ACK_TIMEOUT = 10.0       # seconds a worker waits for the parent to write a record (then: a failed write)
EXIT_FATAL = 3               # a worker's exit status: its chain cannot run; stop the gateway
_HEADER = struct.Struct("!I")
_MAX_FRAME = 256 * 1024 * 1024


# -- framing: length-prefixed pickles between our own processes (parent <-> forked child) -------

def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class Frames(asyncio.Protocol):
    """Messages straight from the socket's data callback: every complete frame of what arrived
    goes to ``on_message`` in order, then ``on_chunk()`` runs once (to answer everything read
    in one go with one message); the stream's end (the other side closed or died: everything
    it sent was delivered first) sets ``closed``. No reader task is woken per message -- this
    carries the access records and their answers, one exchange per turn of the loops."""

    def __init__(self, on_message: Callable[[Any], None], on_chunk: Callable[[], None] | None = None):
        self.on_message = on_message
        self.on_chunk = on_chunk
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos, end = 0, len(buffer)
        try:
            with memoryview(buffer) as view:
                while end - pos >= _HEADER.size:
                    (length,) = _HEADER.unpack_from(view, pos)
                    if length > _MAX_FRAME:
                        raise ValueError(f"frame of {length} bytes")
                    if end - pos - _HEADER.size < length:
                        break
                    message = pickle.loads(view[pos + _HEADER.size:pos + _HEADER.size + length])
                    pos += _HEADER.size + length
                    self.on_message(message)
        finally:
            del buffer[:pos]
            if self.on_chunk is not None:
                self.on_chunk()

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)   # a frame cut short by the sender's death was never sent


class Uplink:
    """The worker's side of its socket to the parent: blocking, thread-safe sends."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(True)
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = encode(message)
        with self._lock:
            self.sock.sendall(data)


class RemoteLogStore:
    """The LogStore a worker's chain writes to: each record to the parent's one writer.

    The access log awaits ``append_later`` on the worker's event loop (no thread): the record
    joins the *outbox*; every record that joins it during that turn of the loop and the next
    goes to the parent in one message (one ``send``), and the parent writes them one by one into the
    chains and answers with one message for all of them (``("logged", upto, errors)``). The
    returned future resolves when the parent has written that record, and fails with
    LogWriteError when its write failed or no answer came within ``timeout``: the request
    whose record could not be written is blocked (``logs.on_write_error: block``), never served
    unlogged, exactly as in the single process. Records keep their order (one outbox, one
    socket, the parent appends in arrival order), so each stream stays one hash chain.

    ``append`` on the event loop (other addons' rare records) sends the outbox with the record
    at once and returns when it is in the kernel's socket buffer (it cannot wait for an answer
    the same loop delivers); a record in the kernel's buffer survives the worker's ``kill -9``.
    ``append`` from another thread waits for the parent's answer like ``append_later``."""

    writes_block = True

    def __init__(self, uplink: Uplink, loop_thread: int | None = None, timeout: float = LOG_ACK_TIMEOUT,
                 loop: asyncio.AbstractEventLoop | None = None):
        self._uplink = uplink
        self._loop_thread = loop_thread if loop_thread is not None else threading.get_ident()
        self._loop = loop
        self._timeout = timeout
        self._next = 0
        self._outbox: list[tuple[str, dict[str, Any], int]] = []
        self._flush_due = False
        # records queued or sent and not yet answered, oldest first:
        # [seq, stream, future (asyncio or concurrent), monotonic time sent or 0.0 while queued]
        self._waiting: collections.deque[list] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None

    # -- on the worker's event loop
    def append_later(self, stream: str, record: dict[str, Any]) -> asyncio.Future:
        """The record is written when the returned future is done (LogWriteError: it was not)."""
        future = self._event_loop().create_future()
        self._queue(stream, record, future)
        return future

    def append(self, stream: str, record: dict[str, Any]) -> None:
        from gateway.logstore.writer import LogWriteError
        if threading.get_ident() == self._loop_thread:
            self._outbox.append((stream, record, 0))
            self.flush()
            return
        if self._loop is None:
            raise LogWriteError(stream, RuntimeError("the worker's event loop is not running"))
        done = concurrent.futures.Future()
        try:
            self._loop.call_soon_threadsafe(self._queue, stream, record, done)
        except RuntimeError as exc:   # the loop has closed (the worker is stopping)
            raise LogWriteError(stream, exc) from None
        try:
            done.result(self._timeout + 1)
        except concurrent.futures.TimeoutError:
            why = TimeoutError(f"the log writer did not answer within {self._timeout:.0f} s")
            raise LogWriteError(stream, why) from None

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _queue(self, stream: str, record: dict[str, Any], future) -> None:
        self._next += 1
        self._outbox.append((stream, record, self._next))
        self._waiting.append([self._next, stream, future, 0.0])
        if not self._flush_due:
            self._flush_due = True
            self._event_loop().call_soon(self._flush_after_next_turn)

    def _flush_after_next_turn(self) -> None:
        # One more turn of the loop first: the connections whose data arrived with this one's
        # (their callbacks run after this) add their records to the same message.
        self._event_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send every record of the outbox in one message (on the loop thread)."""
        self._flush_due = False
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            try:
                self._uplink.send(("logs", batch))
            except OSError:
                raise
            except Exception:   # noqa: BLE001 - a record that cannot be encoded; nothing was sent
                self._send_each(batch)
        except OSError as exc:   # the parent is gone: nothing waiting will be answered
            while self._waiting:
                _, stream, future, _ = self._waiting.popleft()
                self._settle(future, stream, f"{type(exc).__name__}: {exc}")
            if batch[-1][2] == 0:
                from gateway.logstore.writer import LogWriteError
                raise LogWriteError(batch[-1][0], exc) from None
            return
        finally:
            self._stamp()

    def _send_each(self, batch: list[tuple[str, dict[str, Any], int]]) -> None:
        """One message per record: a record that cannot be encoded fails alone (its request is
        blocked; an on-loop ``append`` raises), the others are sent."""
        from gateway.logstore.writer import LogWriteError
        failed: LogWriteError | None = None
        for stream, record, seq in batch:
            try:
                self._uplink.send(("logs", [(stream, record, seq)]))
            except OSError:
                raise
            except Exception as exc:   # noqa: BLE001 - pickle's errors are of many types
                log.error("a %s record cannot be sent to the log writer: %s", stream, exc)
                if seq == 0:
                    failed = LogWriteError(stream, exc)
                for entry in self._waiting:
                    if entry[0] == seq:
                        self._settle(entry[2], stream, f"{type(exc).__name__}: {exc}")
                        break
        if failed is not None:
            raise failed

    def _stamp(self) -> None:
        """Note when the records just sent (the newest unstamped ones) left, for the watchdog."""
        if not self._waiting or self._loop is None:
            return
        now = time.monotonic()
        for entry in reversed(self._waiting):
            if entry[3]:
                break
            entry[3] = now
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(min(1.0, self._timeout), self._check_overdue)

    def _check_overdue(self) -> None:
        """Fail the records the parent has not answered within ``timeout`` (checked each second)."""
        self._watchdog = None
        limit = time.monotonic() - self._timeout
        while self._waiting and 0 < self._waiting[0][3] <= limit:
            _, stream, future, _ = self._waiting.popleft()
            self._settle(future, stream, f"TimeoutError: the log writer did not answer within {self._timeout:.0f} s")
        if self._waiting:
            self._watchdog = self._event_loop().call_later(min(1.0, self._timeout), self._check_overdue)

    def written(self, upto: int, errors: dict[int, str] | None = None) -> None:
        """The parent's answer (called by the worker's reader on the loop): every record up to
        ``upto`` was written, except those in ``errors`` (seq -> why its write failed)."""
        errors = errors or {}
        while self._waiting and self._waiting[0][0] <= upto:
            seq, stream, future, _ = self._waiting.popleft()
            self._settle(future, stream, errors.get(seq))

    @staticmethod
    def _settle(future, stream: str, error: str | None) -> None:
        if future is None or future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            from gateway.logstore.writer import LogWriteError
            future.set_exception(LogWriteError(stream, OSError(error)))


# -- metrics --------------------------------------------------------------------------------

Sample = tuple[str, tuple[tuple[str, str], ...], float]
Family = tuple[str, str, str, str, list[Sample]]    # name, type, documentation, unit, samples


def snapshot(registry) -> list[Family]:
    """A registry's current values as plain data (picklable, mergeable)."""
    return [(m.name, m.type, m.documentation, m.unit,
             [(s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in m.samples])
            for m in registry.collect()]


def merge(families: Iterable[list[Family]]) -> list[Family]:
    """Sum snapshots family by family, sample by sample (name and labels); ``*_created``
    (when a counter began) is the earliest, not a sum."""
    out: dict[str, tuple[str, str, str, str, dict]] = {}
    for snap in families:
        for name, kind, doc, unit, samples in snap:
            entry = out.setdefault(name, (name, kind, doc, unit, {}))
            values = entry[4]
            for sname, labels, value in samples:
                key = (sname, labels)
                if key not in values:
                    values[key] = value
                elif sname.endswith("_created"):
                    values[key] = min(values[key], value)
                else:
                    values[key] += value
    return [(name, kind, doc, unit, [(s, l, v) for (s, l), v in values.items()])
            for name, kind, doc, unit, values in out.values()]


def retained(snap: list[Family]) -> list[Family]:
    """What a dead worker leaves behind: its counters and histograms (totals must not go down
    when it restarts), not its gauges (its connections are gone with it)."""
    return [f for f in snap if f[1] in ("counter", "histogram", "summary")]


class MergedExposition:
    """What /metrics serves with workers: the parent's registry plus every worker's snapshot
    plus what dead workers counted (duck-typed as a registry for prometheus_client)."""

    def __init__(self, registry, pool: "WorkerPool"):
        self.registry = registry
        self.pool = pool

    def collect(self):
        refresh = getattr(self.pool, "refresh", None)
        if refresh is not None:
            refresh()   # every worker's counts as of this scrape
        parts = [snapshot(self.registry), self.pool.retired, *self.pool.snapshots.values()]
        for name, kind, doc, unit, samples in merge(parts):
            metric = Metric(name, doc, kind, unit)
            for sname, labels, value in samples:
                metric.add_sample(sname, dict(labels), value)
            yield metric

    def restricted_registry(self, names):   # prometheus_client's ?name[]= filter
        wanted = set(names)

        class _Restricted:
            def collect(inner):
                for metric in self.collect():
                    if any(s.name in wanted for s in metric.samples):
                        yield metric
        return _Restricted()


# -- the parent's side ------------------------------------------------------------------------

@dataclasses.dataclass
class _Worker:
    index: int
    pid: int
    writer: asyncio.StreamWriter | None
    sockets: tuple[socket.socket, ...] = ()    # the parent's ends (closed in later-forked workers)
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    applied: int = -1
    policy: tuple[str, bool] | None = None     # (version, loaded) of the last policy message
    alive: bool = True
    pending: list[bytes] = dataclasses.field(default_factory=list)   # sent before the stream was open
    metrics_seq: int = 0                       # the last scrape request its snapshot answered
    sessions: int = 0                          # the last ended-sessions notice it applied
    log_upto: int = 0                          # its last record written (or failed)
    log_answered: int = 0                      # ... and the last one it was told about
    log_errors: dict[int, str] = dataclasses.field(default_factory=dict)   # failed since the last answer


class WorkerPool:
    """Forks, feeds and supervises the workers (parent side). ``child_main(index, down, up)``
    runs in the forked child and never returns (the worker's process exits)."""

    def __init__(self, count: int, registry, child_main: Callable[[int, socket.socket, socket.socket], None],
                 on_log: Callable[[str, dict], None], on_fatal: Callable[[str], None],
                 on_quarantine: Callable[[Any], None] | None = None):
        self.count = count
        self.on_quarantine = on_quarantine   # a worker's automatic-quarantine order, carried out here
        self.child_main = child_main
        self.on_log = on_log
        self.on_fatal = on_fatal
        self.workers: dict[int, _Worker] = {}
        self.snapshots: dict[int, list[Family]] = {}
        self.retired: list[Family] = []
        self.stopping = False
        self.stopped = asyncio.Event()
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._scrapes = 0
        self._session_notices = 0
        self._tasks: set[asyncio.Task] = set()
        self.up = Gauge("kanmon_worker_up", "Inspection worker serving (1) or down (0), by worker index "
                        "(issue #22: a down worker's devices are refused until it is back).", ["worker"],
                        registry=registry)
        self.restarts = Counter("kanmon_worker_restarts_total", "Inspection workers forked again after they "
                                "died, by worker index.", ["worker"], registry=registry)
        self.exposition = MergedExposition(registry, self)

    # -- lifecycle
    async def start(self, timeout: float = READY_TIMEOUT) -> None:
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        gc.freeze()   # what exists now (the compiled policy) stays shared: gc does not touch its pages
        for i in range(self.count):
            self._fork(i)
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for w in list(self.workers.values()):
            try:
                await asyncio.wait_for(w.ready.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise RuntimeError(f"inspection worker {w.index} did not start within {timeout:.0f} s") from None
            if not w.alive:
                raise RuntimeError(f"inspection worker {w.index} exited during start-up")

    def _fork(self, index: int) -> None:
        down_parent, down_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        up_parent, up_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        others = [s for w in self.workers.values() for s in w.sockets]
        with warnings.catch_warnings():   # threads at fork: see the module note for why this one is safe
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:   # the worker: drop the parent's ends of every channel, run, never return
            code = 1
            try:
                for s in (down_parent, up_parent, *others):
                    try:   # detach first: the parent's objects in this copy must not close a reused fd later
                        os.close(s.detach())
                    except OSError:
                        pass
                self.child_main(index, down_child, up_child)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:   # noqa: BLE001 - the child must never fall back into the parent's code
                logging.getLogger("kanmon.workers").exception("worker %d failed", index)
            finally:
                os._exit(code)
        down_child.close()
        up_child.close()
        worker = self.workers[index] = _Worker(index, pid, None, sockets=(down_parent, up_parent))
        log.info("inspection worker %d started (pid %d)", index, pid)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._adopt(worker, down_parent, up_parent), name=f"worker-{index}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, worker: _Worker, down: socket.socket, up: socket.socket) -> None:
        _, worker.writer = await asyncio.open_unix_connection(sock=down)
        for data in worker.pending:
            worker.writer.write(data)
        worker.pending.clear()
        frames = Frames(lambda message: self._received(worker, message), lambda: self._answer_logs(worker))
        try:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: frames, sock=up)
        except BaseException:
            await self._died(worker)
            raise
        try:
            await frames.closed
        finally:
            transport.close()
            # Everything the worker sent before it died has been read (the stream ends only
            # after its last byte): its log records are written.
            await self._died(worker)

    def _received(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "logs":
            self._write_logs(worker, message[1])
        elif kind == "metrics":
            self.snapshots[worker.index] = message[1]
            if len(message) > 2:
                worker.metrics_seq = max(worker.metrics_seq, message[2])
                self._changed.set()
        elif kind == "applied":
            worker.applied = max(worker.applied, message[1])
            self._changed.set()
        elif kind == "sessions-done":
            worker.sessions = max(worker.sessions, message[1])
            self._changed.set()
        elif kind == "quarantine":
            if self.on_quarantine is not None:
                self.on_quarantine(message[1])
            else:   # a worker with auto-quarantine under a parent without: cannot happen, but never dropped silently
                log.error("inspection worker %d sent a quarantine order the gateway cannot carry out", worker.index)
        elif kind == "policy":
            worker.policy = (message[1], message[2])
            self._changed.set()
        elif kind == "ready":
            self.up.labels(str(worker.index)).set(1)
            worker.ready.set()
            log.info("inspection worker %d serving", worker.index)
        elif kind == "fatal":
            self.on_fatal(f"inspection worker {worker.index}: {message[1]}")

    def _write_logs(self, worker: _Worker, batch: list[tuple[str, dict, int]]) -> None:
        """Append a worker's records in the order they came, then answer: one message for every
        record that arrived in this turn of the loop (``_answer_logs``), naming the ones whose
        write failed (the worker blocks their requests)."""
        for stream, record, seq in batch:
            try:
                self.on_log(stream, record)
            except Exception as exc:   # noqa: BLE001 - counted by the log store; the worker blocks the request
                if seq:
                    worker.log_errors[seq] = f"{type(exc).__name__}: {exc}"
            if seq:
                worker.log_upto = seq

    def _answer_logs(self, worker: _Worker) -> None:
        """After each chunk read from a worker: one answer for every record it waits for."""
        if worker.log_upto <= worker.log_answered:
            return
        errors, worker.log_errors = worker.log_errors, {}
        worker.log_answered = worker.log_upto
        self._send(worker, ("logged", worker.log_upto, errors or None))

    async def _died(self, worker: _Worker) -> None:
        worker.alive = False
        worker.ready.set()   # wake a start-up waiter
        self._changed.set()
        self.up.labels(str(worker.index)).set(0)
        status = await asyncio.to_thread(_reap, worker.pid)
        self.retired = merge([self.retired, retained(self.snapshots.pop(worker.index, []))])
        if worker.writer is not None:
            worker.writer.close()
        if self.stopping:
            return
        if status == EXIT_FATAL:
            self.on_fatal(f"inspection worker {worker.index} cannot run its addon chain")
            return
        log.error("inspection worker %d (pid %d) died (status %s); its devices are refused until it is "
                  "forked again", worker.index, worker.pid, status)
        await asyncio.sleep(RESTART_DELAY)
        if not self.stopping:
            self.restarts.labels(str(worker.index)).inc()
            self._fork(worker.index)

    def live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.alive]

    def _send(self, worker: _Worker, message: Any) -> None:
        try:
            if worker.writer is None:
                worker.pending.append(encode(message))
            else:
                worker.writer.write(encode(message))
        except (OSError, RuntimeError):
            pass   # it died: _died restarts it from the parent's current state

    def kill(self, worker: _Worker, why: str) -> None:
        log.error("inspection worker %d killed: %s (forked again from the current state)", worker.index, why)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def _wait(self, done: Callable[[_Worker], bool], timeout: float) -> list[_Worker]:
        """Wait until ``done`` holds for every live worker; return the ones it did not hold for."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            late = [w for w in self.live() if not done(w)]
            remaining = deadline - asyncio.get_running_loop().time()
            if not late or remaining <= 0:
                return late
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def refresh(self, timeout: float = SCRAPE_TIMEOUT) -> None:
        """From the /metrics thread: ask every worker for its counts now and wait for them (at
        most ``timeout``; a late worker's last pushed snapshot is served), so a scrape sees
        everything counted before it. On the event loop itself: nothing (it cannot wait)."""
        if self._loop is None or threading.get_ident() == self._loop_thread or self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._refresh(timeout), self._loop).result(timeout + 1)
        except Exception:   # noqa: BLE001 - a scrape never fails for a slow worker: it gets the pushed counts
            log.debug("metrics refresh incomplete", exc_info=True)

    async def _refresh(self, timeout: float) -> None:
        self._scrapes += 1
        seq = self._scrapes
        targets = self.live()
        for w in targets:
            self._send(w, ("metrics?", seq))
        await self._wait(lambda w: w.metrics_seq >= seq or w not in targets, timeout)

    # -- what every worker must follow
    async def reconciled(self, report, timeout: float = ACK_TIMEOUT) -> None:
        """Send a reconcile report to every worker and wait until each has applied it (its
        directory updated, its live connections of changed devices cut)."""
        targets = self.live()
        for w in targets:
            self._send(w, ("reconcile", report))
        for w in await self._wait(lambda w: w.applied >= report.revision or w not in targets, timeout):
            self.kill(w, f"did not apply registry revision {report.revision} within {timeout:.0f} s")

    async def sessions_ended(self, device_ids: set[str], timeout: float = ACK_TIMEOUT) -> None:
        """User sessions ended (sign-out, expiry, ended elsewhere): every worker reloads its
        sessions and cuts the live connections of ``device_ids``; wait until each has."""
        self._session_notices += 1
        seq = self._session_notices
        targets = self.live()
        for w in targets:
            self._send(w, ("sessions", seq, sorted(device_ids)))
        for w in await self._wait(lambda w: w.sessions >= seq or w not in targets, timeout):
            self.kill(w, f"did not end the sessions of {len(device_ids)} device(s) within {timeout:.0f} s")

    async def switch_policy(self, version: str, timeout: float = POLICY_TIMEOUT) -> None:
        targets = self.live()
        for w in targets:
            w.policy = None
            self._send(w, ("policy", version))
        for w in await self._wait(lambda w: w.policy is not None or w not in targets, timeout):
            self.kill(w, f"did not load policy {version} within {timeout:.0f} s")
        for w in targets:
            if w.alive and w.policy is not None and not w.policy[1]:
                self.kill(w, f"could not load policy {version}")

    async def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        for w in self.live():
            try:
                os.kill(w.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.live() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in self.live():
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        self.stopped.set()


def _reap(pid: int) -> int | None:
    """The worker's exit status (blocking until it has exited; it has closed its socket)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel sends SIGKILL to this worker when the parent dies (even by
    ``kill -9``), so no orphan keeps a proxy port and a restarted gateway can bind it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("could not ask the kernel to end this worker with the gateway process")


# -- the worker's side ------------------------------------------------------------------------

def worker_main(app, index: int, down: socket.socket, up: socket.socket) -> None:
    """Run in the forked child: serve worker ``index`` of ``app`` (a GatewayApp forked after its
    start-up) until the parent says stop, dies, or the proxy ends."""
    die_with_parent()
    signal.set_wakeup_fd(-1)    # the parent's event loop's wake-up pipe is not ours
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)   # a terminal's Ctrl-C goes to the parent, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = asyncio.run(_serve(app, index, down, Uplink(up)))
    raise SystemExit(code)


async def _serve(app, index: int, down: socket.socket, uplink: Uplink) -> int:
    from addons.chain import layer_decision
    from gateway.metrics import GatewayMetrics
    from gateway.net.underlay import UnderlayAddresses
    from gateway.proxy.connections import LiveConnections
    from gateway.proxy.master import ProxySettings, build_master, wait_for_listeners
    from gateway.runtime.errors import StartupError

    loop = asyncio.get_running_loop()
    # The process's own data-path state; what the parent built (directory, policy) is kept.
    app.metrics = GatewayMetrics()       # from zero: the parent sums (see the module note)
    app.connections = LiveConnections()
    app.logstore = RemoteLogStore(uplink, threading.get_ident(), loop=loop)
    app._stop = asyncio.Event()
    app._underlay_now = asyncio.Event()
    app.underlay = UnderlayAddresses(read_peers=app.tunnel.peers, on_change=app._underlay_changed,
                                     on_miss=app._underlay_now.set)
    adopt_signin(app)
    adopt_quarantiner(app, uplink)
    loop.add_signal_handler(signal.SIGTERM, app._stop.set)
    cfg = app.cfg
    settings = dataclasses.replace(ProxySettings.from_config(cfg),
                                   modes=(f"transparent@{cfg.transparent_port + index}", f"dns@{cfg.dns_port + index}"))
    try:
        app.master = build_master(settings, app.build_chain(), layer_decision=layer_decision(app.chain_parts()))
    except StartupError as exc:
        uplink.send(("fatal", str(exc)))
        return EXIT_FATAL
    run_task = asyncio.create_task(app.master.run(), name="mitmproxy")
    await wait_for_listeners(app.master, run_task)
    if app.fatal_reason:
        uplink.send(("fatal", app.fatal_reason))
        return EXIT_FATAL
    uplink.send(("ready", os.getpid()))
    inbox: asyncio.Queue = asyncio.Queue()
    frames = Frames(lambda message: _from_parent(app, inbox, message))
    await loop.connect_accepted_socket(lambda: frames, sock=down)
    frames.closed.add_done_callback(lambda _: inbox.put_nowait(None))
    follow_task = asyncio.create_task(_follow(app, inbox, uplink), name="follow-parent")
    metrics_task = asyncio.create_task(_push_metrics(app, uplink), name="metrics")
    underlay_task = asyncio.create_task(app.underlay_loop(), name="underlay")
    stop_task = asyncio.create_task(app._stop.wait())
    await asyncio.wait({run_task, follow_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    app.master.shutdown()
    for task in (metrics_task, underlay_task, follow_task, stop_task):
        task.cancel()
    await asyncio.wait({run_task}, timeout=5)
    try:
        uplink.send(("metrics", snapshot(app.metrics.registry)))   # the last counts
    except OSError:
        pass
    return EXIT_FATAL if app.fatal_reason else 0


async def _push_metrics(app, uplink: Uplink) -> None:
    while True:
        uplink.send(("metrics", snapshot(app.metrics.registry)))
        await asyncio.sleep(METRICS_EVERY)


def _from_parent(app, inbox: asyncio.Queue, message: tuple) -> None:
    """The parent's answers for access records settle at once (the requests waiting for them go
    on); everything else is applied in order by ``_follow``."""
    if message[0] == "logged":
        app.logstore.written(message[1], message[2])
    else:
        inbox.put_nowait(message)


async def _follow(app, inbox: asyncio.Queue, uplink: Uplink) -> None:
    """Apply what the parent sends until it closes the stream (it stopped or died)."""
    while (message := await inbox.get()) is not None:
        kind = message[0]
        if kind == "metrics?":
            uplink.send(("metrics", snapshot(app.metrics.registry), message[1]))
        elif kind == "reconcile":
            follow_reconcile(app, message[1])
            uplink.send(("applied", message[1].revision))
        elif kind == "policy":
            loaded = await _load_policy(app, message[1])
            uplink.send(("policy", message[1], loaded))
        elif kind == "sessions":
            await follow_sessions(app, set(message[2]))
            uplink.send(("sessions-done", message[1]))


def adopt_signin(app) -> None:
    """The worker's sign-in service: its own session-store connection (the parent's is not
    used across fork; it is kept referenced, never closed here, so nothing is sent on the
    parent's connection), auth records and counts through the parent. The sessions gauge is
    the parent's alone (each worker holds every session: a sum would count them N+1 times)."""
    from gateway.signin.store import open_session_store

    service = app.signin
    if service is None:
        return
    app._parent_session_store = service.store
    service.store = open_session_store(app.cfg)
    service.logstore = app.logstore
    service.metrics = app.metrics

    def changed(device_ids: set[str]) -> None:
        if app.policy is not None:
            for device_id in device_ids:
                app.policy.invalidate_device(device_id)

    service.on_sessions_changed = changed


def adopt_quarantiner(app, uplink: Uplink) -> None:
    """The worker counts the triggers it sees; an order goes to the parent, which writes the
    registry, pokes the reconcile and alerts (gateway/autoquarantine/service.py)."""
    quarantiner = app.autoquarantine
    if quarantiner is None:
        return
    quarantiner.metrics = app.metrics
    quarantiner.hand_over = lambda order: uplink.send(("quarantine", order))


async def follow_sessions(app, device_ids: set[str]) -> None:
    """The parent saw these devices' sessions end: reload the sessions from the store (off the
    loop: blocking I/O), then cut every live connection of those devices (and of any other
    device whose session this worker held and the store no longer has)."""
    if app.signin is None:
        return
    try:
        device_ids = device_ids | await asyncio.to_thread(app.signin.follow_store)
    except Exception:   # noqa: BLE001 - the store unreadable: the ended sessions still end here
        log.exception("worker: reloading the user sessions failed; ending the named ones")
    for device_id in device_ids:
        app.signin.directory.remove(device_id)
    app._cut_devices(device_ids, "user session ended")


def follow_reconcile(app, report) -> None:
    """A worker's part of a reconcile pass (the parent's GatewayApp._apply_reconcile did the
    host's part and the logging): the device directory, and every live connection of a device
    that lost admission or whose record changed is cut (its next connection is judged by what
    the registry says now)."""
    admitted = [r for r in report.changed if r.device_id in report.admitted_ids]
    if report.full:
        app.directory.replace(admitted)
    else:
        app.directory.update(admitted, [r for r in report.changed if r.device_id not in report.admitted_ids])
    changed = {r.device_id: r for r in report.changed}
    if app.signin is not None:   # a device that loses admission loses its user session (the parent ends it in the store)
        for device_id in changed.keys() - set(report.admitted_ids):
            app.signin.directory.remove(device_id)
    from gateway.runtime.reconcile import cut_changed_devices

    cut_changed_devices(app, changed, report.admitted_ids)


async def _load_policy(app, version: str) -> bool:
    """Load the policy the parent has just compiled (from the prepared cache its compile wrote)
    and swap it in, only if it is the version the parent has: else keep the old one and say so
    (the parent then forks this worker again from its own state)."""
    from gateway.policy import load_policy
    from gateway.runtime import heaptrim

    path = app.cfg.active_policy_path()
    if app.policy is None or path is None:
        return False
    try:
        snapshot = await asyncio.to_thread(load_policy, path, None, app.feeds.directory, app._policy_cache(),
                                           heaptrim.give_back_freed_memory)
    except Exception:   # noqa: BLE001 - refused: the old policy keeps serving here until the parent restarts us
        log.exception("worker: loading policy %s failed", version)
        return False
    if snapshot.version != version:
        log.error("worker: the policy file changed under the reload (got %s, the gateway compiled %s)",
                  snapshot.version, version)
        return False
    app.policy.swap(snapshot)
    return True


async def start_pool(app) -> tuple[WorkerPool, asyncio.Task]:
    """Fork ``app.cfg.proxy_workers`` workers of a GatewayApp whose start-up (policy compile,
    first reconcile, log store) is done; returns the pool and a task that ends when it stopped."""
    from gateway.proxy import interceptca
    from gateway.runtime.errors import StartupError

    # The interception CA before the fork: N workers creating it at once would make N of them.
    # The same call build_master makes (the key type of proxy.ca_key; an existing CA is kept).
    interceptca.ensure_ca(app.cfg.mitmproxy_confdir, app.cfg.proxy_ca_key)
    pool = WorkerPool(app.cfg.proxy_workers, app.metrics.registry,
                      lambda index, down, up: worker_main(app, index, down, up),
                      on_log=app.logstore.append, on_fatal=app.fail,
                      on_quarantine=app.autoquarantine.carry_out if app.autoquarantine is not None else None)
    app.metrics.exposition = pool.exposition
    try:
        await pool.start()
    except RuntimeError as exc:
        await pool.stop()
        raise StartupError(f"{exc} / 検査ワーカーが起動しませんでした") from None
    log.info("%d inspection workers on ports %d-%d (DNS %d-%d)", pool.count, app.cfg.transparent_port,
             app.cfg.transparent_port + pool.count - 1, app.cfg.dns_port, app.cfg.dns_port + pool.count - 1)
    return pool, asyncio.create_task(pool.stopped.wait(), name="workers")
