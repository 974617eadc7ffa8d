"""Hand freed heap memory back to the kernel now and then (glibc ``malloc_trim``).

Soak runs (bench/soak.py, issue #7) show the gateway's RSS creeping about 1 MB a minute under
steady load while its live Python objects stay flat: glibc's free-but-held memory grows (DNS and
connection bursts free many small blocks in the middle of the heap, which plain ``free`` does
not return). ``malloc_trim(0)`` releases those pages (``madvise``) without moving anything.

It slowed the creep by about a third in a 10-minute soak but did not stop it, so the gateway
runs on jemalloc instead (gateway/runtime/allocator.py). This stays as an opt-in for the glibc fallback
(``KANMON_ALLOCATOR=glibc`` or no jemalloc): ``KANMON_MALLOC_TRIM_SECONDS=60`` turns it on;
under jemalloc it does nothing (glibc's heap is then unused).
ctypes releases the GIL during the call and it runs in a worker thread, so the proxy keeps
serving while glibc walks its free lists. Not glibc (musl, macOS): nothing to do.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("kanmon.heaptrim")

ENV = "KANMON_MALLOC_TRIM_SECONDS"


def interval_from_env(environ: dict[str, str] | os._Environ = os.environ) -> float | None:
    """Seconds between trims from ``KANMON_MALLOC_TRIM_SECONDS``; None when unset or 0.
    Raises ValueError naming the variable for anything but a non-negative number."""
    text = environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV} must be a number of seconds, not {text!r}") from None
    if value < 0 or value != value:
        raise ValueError(f"{ENV} must be 0 (off) or a positive number of seconds, not {text!r}")
    return value or None


def load_malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


async def trim_loop(interval: float, trim: Callable[[int], int], on_trim: Callable[[float], None] | None = None) -> None:
    """Every ``interval`` seconds, ``trim(0)`` in a worker thread; ``on_trim(seconds)``
    after each (a metric). Runs until cancelled; a failing call is logged, never raised."""
    while True:
        await asyncio.sleep(interval)
        started = time.perf_counter()
        try:
            await asyncio.to_thread(trim, 0)
        except Exception:  # pragma: no cover - ctypes calls into glibc do not raise
            log.exception("malloc_trim failed")
            continue
        if on_trim is not None:
            on_trim(time.perf_counter() - started)
