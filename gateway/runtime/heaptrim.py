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


# After a policy compile (issue #22, bench/engine_scale.py): passed to load_policy by the gateway.
def give_back_freed_memory() -> None:
    """A compile at scale frees far more than it keeps (split lines, set tables, RE2 parse
    trees: a 1M-domain policy holds ~118 MiB and peaks at ~225), and the allocator keeps
    what was freed: glibc because its mmap threshold grows with the first large free (RSS
    stayed ~55 MiB above the snapshot's needs), jemalloc until its decay timer (seconds)
    purges it. Right after a compile both are told to return it: glibc's ``malloc_trim(0)``
    and, when jemalloc is the allocator (the gateway preloads it, gateway/runtime/allocator.py), a
    purge of every arena. bench/engine_scale.py measures both."""
    global _RELEASE
    if _RELEASE is None:
        _RELEASE = _releasers()
    for release in _RELEASE:
        try:
            release()
        except Exception:  # noqa: BLE001 - only memory is at stake, never the policy
            log.debug("returning freed memory after a compile failed", exc_info=True)


def _releasers() -> tuple[Any, ...]:
    import ctypes

    out: list[Any] = []
    trim = load_malloc_trim()
    if trim is not None:
        out.append(lambda: trim(0))
    try:
        mallctl = ctypes.CDLL(None).mallctl  # only when jemalloc is loaded
    except (AttributeError, OSError):
        return tuple(out)
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    out.append(lambda: mallctl(b"arena.4096.purge", None, None, None, 0))  # 4096: MALLCTL_ARENAS_ALL
    return tuple(out)


_RELEASE: tuple[Any, ...] | None = None
