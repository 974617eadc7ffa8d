"""The I/O edge of automatic quarantine: carries out the trigger engine's orders
(gateway/autoquarantine/triggers.py) on the same path as `kanmon device quarantine` — the
registry record becomes ``quarantined`` with an audit entry, and the reconciler is poked, which
cuts the device's live connections and from then on lets it reach only its remediation hosts
(addons/quarantine.py) — then alerts the operator (webhook / mail through the gateway's alert
dispatcher, and the ``kanmon_auto_quarantines_total`` metric behind a Prometheus alert).

Never blocks the data path: callers (addons on the event loop, or other threads) only enqueue;
the registry write runs in a worker thread, and the alert dispatcher only enqueues too. A
write that fails is retried, then counted (``kanmon_auto_quarantine_errors_total``), logged
and alerted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from gateway.autoquarantine.triggers import AUTO_ACTOR, QuarantineOrder, Trigger, TriggerEngine
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus

log = logging.getLogger("kanmon.autoquarantine")

WRITE_ATTEMPTS = 3
RETRY_SECONDS = 0.5


class AutoQuarantiner:
    def __init__(self, engine: TriggerEngine, registry, *, poke: Callable[[], None],
                 alert: Callable[[QuarantineOrder, bool], None] | None = None, metrics=None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), node: str = "gw"):
        self.engine = engine
        self.node = node
        self.registry = registry
        self.poke = poke
        self.alert = alert
        self.metrics = metrics
        self.clock = clock
        self.loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        # issue #22: in an inspection worker, orders go to the gateway process, which carries
        # them out (gateway/runtime/workers.py); None: carried out here.
        self.hand_over: Callable[[QuarantineOrder], None] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    # -- what happened (any thread) ------------------------------------------------------
    def virus(self, source: Trigger, device: DeviceRecord | None, user: str | None,
              evidence: Mapping[str, Any]) -> QuarantineOrder | None:
        if not _active(device):
            return None
        order = self.engine.virus(source, device.device_id, user, evidence, self.clock())
        self._submit(order)
        return order

    def blocked(self, device: DeviceRecord | None, user: str | None, category: str | None,
                evidence: Mapping[str, Any]) -> QuarantineOrder | None:
        if not _active(device) or not category:
            return None
        order = self.engine.blocked(device.device_id, user, category, evidence, self.clock())
        self._submit(order)
        return order

    # -- carrying out --------------------------------------------------------------------
    def _submit(self, order: QuarantineOrder | None) -> None:
        if order is None:
            return
        if self.hand_over is not None:
            try:
                self.hand_over(order)
            except Exception:   # the gateway process is gone: counted and logged, the worker ends with it
                log.exception("automatic quarantine of %s (%s) not handed to the gateway process",
                              order.device_id, order.trigger)
                self._count_error()
                return
            return   # the gateway process retries, counts and alerts (the order's window is already cleared)
        self.carry_out(order)

    def carry_out(self, order: QuarantineOrder) -> None:
        """Carry out an order (any thread): on the bound event loop."""
        loop = self.loop
        if loop is None:
            log.error("automatic quarantine of %s (%s) not carried out: not bound to the event loop",
                      order.device_id, order.trigger)
            self._count_error()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._start(order)
        else:
            loop.call_soon_threadsafe(self._start, order)

    def _start(self, order: QuarantineOrder) -> None:
        if order.device_id in self._inflight:
            return   # one order per device at a time; the later trigger's device is being quarantined
        self._inflight.add(order.device_id)
        task = asyncio.ensure_future(self.apply(order))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def apply(self, order: QuarantineOrder) -> bool:
        """Quarantine the device in the registry, poke the reconciler, alert. True when this
        order changed the device (False: it was no longer active, or the write failed)."""
        try:
            for attempt in range(1, WRITE_ATTEMPTS + 1):
                try:
                    changed = await asyncio.to_thread(self._write, order)
                    break
                except Exception as exc:   # registry locked, disk error, ...: retried, then counted
                    if attempt == WRITE_ATTEMPTS:
                        self._count_error()
                        log.error("automatic quarantine of %s (%s) failed after %d attempts: %s",
                                  order.device_id, order.trigger, attempt, exc)
                        self._alert(order, False)
                        return False
                    await asyncio.sleep(RETRY_SECONDS * attempt)
            if not changed:
                return False
            self.poke()
            self.engine.forget(order.device_id)
            if self.metrics is not None:
                self.metrics.auto_quarantines.labels(str(order.trigger)).inc()
            log.warning("device %s quarantined automatically: %s", order.device_id, order.reason)
            self._alert(order, True)
            return True
        finally:
            self._inflight.discard(order.device_id)

    def _write(self, order: QuarantineOrder) -> bool:
        record = self.registry.get(order.device_id)
        if record is None or record.status is not DeviceStatus.ACTIVE:
            return False
        try:
            self.registry.update(replace(record, status=DeviceStatus.QUARANTINED, status_reason=order.reason),
                                 audit=AuditEntry(AUTO_ACTOR, "device-quarantined", order.reason))
        except Exception as exc:
            # Several nodes on PostgreSQL (gateway/cluster.py): while the registry cannot be
            # written, the quarantine goes into the node's local outbox like `kanmon cluster
            # quarantine` — this node applies it at once, every node once it is replayed.
            outbox = getattr(self.registry, "outbox", None)
            if outbox is None:
                raise
            outbox.queue(order.device_id, DeviceStatus.QUARANTINED, order.reason, AUTO_ACTOR, self.node)
            log.warning("registry not writable (%s): automatic quarantine of %s queued in the local outbox",
                        exc, order.device_id)
        return True

    def _alert(self, order: QuarantineOrder, done: bool) -> None:
        if self.alert is None:
            return
        try:
            self.alert(order, done)
        except Exception:   # the alert path never stops the quarantine
            log.exception("could not queue the alert for %s", order.device_id)

    def _count_error(self) -> None:
        if self.metrics is not None:
            self.metrics.auto_quarantine_errors.inc()

    async def drain(self) -> None:
        """Wait for the orders under way (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _active(device: DeviceRecord | None) -> bool:
    return device is not None and device.status is DeviceStatus.ACTIVE

