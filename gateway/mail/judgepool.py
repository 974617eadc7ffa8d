"""Worker processes that judge mail for the gateway (issue #15): no message can stall the proxy.

The gateway is one multithreaded asyncio process. A judgement that runs away (a parser going
quadratic, a regular expression holding the interpreter lock, a header blowing up to gigabytes)
would freeze every device's traffic if it ran there, so each message is judged
(judgement.judge_message) in a separate process:

* processes come from multiprocessing's "forkserver" context: a clean server process forks the
  workers, the gateway itself is never forked (forking a threaded process copies locks held by
  other threads);
* each worker limits itself with setrlimit: RLIMIT_AS (memory) once at start, RLIMIT_CPU
  raised to "CPU used so far + cpu_seconds" before each judgement. Over the CPU limit the
  kernel ends the worker (SIGXCPU); over the memory limit Python raises MemoryError, which the
  worker reports before it exits. The parent also keeps a wall-clock deadline (a worker stuck
  in I/O, or one that ignores SIGXCPU) and kills the worker past it;
* a worker that went over a limit is replaced and the message is answered with the indicator
  ``message-too-complex`` and the policy's ``too_complex`` action: a fresh worker stores it in
  quarantine and writes the notice, without parsing it (the store's own header summary then
  runs under the same limits);
* anything else — the pool cannot start a worker, a worker dies for another reason or answers
  with an error — raises JudgeFailed. The caller fails closed (addons/mail.py: the exception
  reaches the fail-closed guard, which cuts the connection; the message is not delivered).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import resource
import signal
import threading
from multiprocessing.connection import Connection

from gateway.i18n import Text
from gateway.mail.engine import MailContext
from gateway.mail.judgement import Outcome, hold_too_complex, judge_message
from gateway.mail.policy import JudgeLimits, MailPolicy

log = logging.getLogger("kanmon.mail.judgepool")


class JudgeFailed(Exception):
    """The pool could not judge the message (no worker, or a worker failed otherwise)."""


def _worker_main(conn: Connection, policy: MailPolicy, quarantine, scanner, dns_txt, limits: JudgeLimits) -> None:
    """The worker's loop. Requests: ("judge", raw, context) and ("hold", raw, context, evidence)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the gateway's Ctrl-C is for the gateway
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    memory = limits.memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory if hard == resource.RLIM_INFINITY else min(memory, hard), hard))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        _limit_cpu(limits.cpu_seconds)
        try:
            if request[0] == "judge":
                _, raw, context = request
                outcome = judge_message(raw, context, policy, quarantine, scanner=scanner, dns_txt=dns_txt)
            else:
                _, raw, context, evidence = request
                outcome = hold_too_complex(raw, context, policy, quarantine, evidence)
            conn.send(("ok", outcome))
        except (MemoryError, RecursionError) as exc:
            conn.send(("too-complex", type(exc).__name__))
            return   # a heap that ran out is not reused: the parent starts a new worker
        except Exception as exc:  # noqa: BLE001 — reported to the parent, which fails closed
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _limit_cpu(seconds: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(used) + seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


class _Worker:
    def __init__(self, ctx, args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, *args), daemon=True,
                                   name="kanmon-mail-judge")
        self.process.start()
        child.close()

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(5)
        finally:
            self.conn.close()


class JudgePool:
    """Judge messages in worker processes; thread-safe (``judge`` is called from the proxy's
    worker threads). Workers start on first use and are replaced as they end."""

    def __init__(self, policy: MailPolicy, quarantine, *, scanner=None, dns_txt=None,
                 limits: JudgeLimits | None = None, start_method: str = "forkserver") -> None:
        limits = limits or policy.judge
        self.limits = limits
        self._args = (policy, quarantine, scanner, dns_txt, limits)
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["gateway.mail.judgepool"])
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._slots = threading.Semaphore(limits.workers)
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()
        self._closed = False
        self.killed = 0     # workers ended for going over a limit (tests, logs)

    # -- public ----------------------------------------------------------------------------
    def warm(self) -> None:
        """Start the workers now (in a background thread), so the first message does not wait
        for them; a worker that fails to start here is tried again on first use."""
        def start() -> None:
            started = []
            for _ in range(self.limits.workers):
                try:
                    started.append(self._take())
                except JudgeFailed as exc:
                    log.warning("mail judge worker not started ahead of use: %s", exc)
                    break
            for worker in started:
                self._idle.put(worker)
        threading.Thread(target=start, name="kanmon-mail-judge-warm", daemon=True).start()

    def judge(self, raw: bytes, context: MailContext) -> Outcome:
        reply, why = self._call(("judge", raw, context))
        if reply is not None:
            return reply
        evidence = Text(f"メッセージが複雑すぎて検査できません: {why[0]}",
                        f"the message is too complex to inspect: {why[1]}")
        reply, again = self._call(("hold", raw, context, evidence))
        if reply is None:
            raise JudgeFailed(f"the message could not be held after its judgement was stopped: {again[1]}")
        return reply

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            w.kill()

    # -- one request on one worker -------------------------------------------------------------
    def _call(self, request: tuple) -> tuple[Outcome | None, tuple[str, str]]:
        """(outcome, _) or (None, (ja, en) why the worker was stopped). Raises JudgeFailed."""
        if not self._slots.acquire(timeout=self.limits.wall_seconds):
            raise JudgeFailed("no mail judge worker became free in time")
        try:
            worker = self._send(request)
            try:
                if not worker.conn.poll(self.limits.wall_seconds):
                    self._discard(worker, over_limit=True)
                    return None, (f"判定が {self.limits.wall_seconds:g} 秒を超えた",
                                  f"the judgement took longer than {self.limits.wall_seconds:g} s")
                status, value = worker.conn.recv()
            except (EOFError, OSError):
                return None, self._died(worker)
            if status == "ok":
                self._idle.put(worker)
                return value, ("", "")
            if status == "too-complex":
                self._discard(worker, over_limit=True)
                return None, (f"判定がメモリ上限 ({self.limits.memory_mb} MiB) を超えた ({value})",
                              f"the judgement went over the memory limit of {self.limits.memory_mb} MiB ({value})")
            self._idle.put(worker)
            raise JudgeFailed(f"the mail judge failed: {value}")
        finally:
            self._slots.release()

    def _send(self, request: tuple) -> _Worker:
        """Hand the request to an idle worker; one that died while idle is replaced."""
        for _ in range(2):
            worker = self._take()
            try:
                worker.conn.send(request)
                return worker
            except (OSError, ValueError) as exc:
                log.warning("mail judge worker gone while idle (%s); starting another", exc)
                self._discard(worker, over_limit=False)
        raise JudgeFailed("cannot hand the message to a mail judge worker")

    def _died(self, worker: _Worker) -> tuple[str, str]:
        worker.process.join(5)
        code = worker.process.exitcode
        over = code in (-signal.SIGXCPU, -signal.SIGKILL)
        self._discard(worker, over_limit=over)
        if over:
            return (f"判定が CPU 時間の上限 ({self.limits.cpu_seconds} 秒) を超えた",
                    f"the judgement went over its CPU time limit of {self.limits.cpu_seconds} s")
        raise JudgeFailed(f"the mail judge worker ended unexpectedly (exit code {code})")

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                raise JudgeFailed("the mail judge pool is closed")
        try:
            worker = _Worker(self._ctx, self._args)
        except Exception as exc:  # noqa: BLE001 — no worker: the caller fails closed
            raise JudgeFailed(f"cannot start a mail judge worker: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker, over_limit: bool) -> None:
        if over_limit:
            self.killed += 1
        with self._lock:
            self._all.discard(worker)
        worker.kill()
