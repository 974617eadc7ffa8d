"""Opt-in memory diagnostics for a running gateway: where its memory goes, on demand.

Off unless the environment asks for it (nothing is imported, started or hooked otherwise):

- ``KANMON_DIAGNOSTICS=1``: on ``SIGUSR2`` the gateway writes a report of its live objects
  counted by type (``ConnectionState``, ``HTTPFlow``, ``DatagramStream``, dicts ...).
  Cheap until the signal arrives; a dump walks the garbage collector's objects (tens of ms).
- ``KANMON_TRACEMALLOC=1``: also starts ``tracemalloc`` at start-up (``KANMON_TRACEMALLOC_FRAMES``
  frames per allocation, default 1), and every report adds the top allocation sites and,
  from the second report on, the sites that grew most since the first one. tracemalloc
  costs CPU and memory on every allocation: for a soak or a lab, not for production.

Every report also has the allocators' totals (Python's allocated blocks; jemalloc's and glibc's bytes in
use, free-but-held and mmapped): RSS that stays high while little is in use is the
allocators' high-water mark, not live objects.

Reports go to ``KANMON_DIAGNOSTICS_DIR`` (default: the gateway's state directory) as
``memory-<n>.txt``, numbered from 1, written whole under a temporary name and renamed, so a
reader never sees half a report. ``bench/soak.py`` uses it to count the flow table and to
compare an early and a late allocation snapshot.

    KANMON_TRACEMALLOC=1 kanmon run --config ...    # then: kill -USR2 $(cat STATE/kanmon.pid)

Everything but ``install`` is pure (takes the data, returns text) so it is tested alone.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import tracemalloc
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from gateway.runtime import allocator

log = logging.getLogger("kanmon.diagnostics")

ENV_DIAGNOSTICS = "KANMON_DIAGNOSTICS"
ENV_TRACEMALLOC = "KANMON_TRACEMALLOC"
ENV_FRAMES = "KANMON_TRACEMALLOC_FRAMES"
ENV_DIR = "KANMON_DIAGNOSTICS_DIR"
TOP_SITES = 25
TOP_TYPES = 40
# Per-connection objects, always listed (0 when none is alive) whatever their rank: the
# gateway's flow table, mitmproxy's flows and connections, the DNS listener's streams.
WATCHED_TYPES = (
    "gateway.proxy.connections.ConnectionState",
    "mitmproxy.http.HTTPFlow", "mitmproxy.tcp.TCPFlow", "mitmproxy.dns.DNSFlow", "mitmproxy.udp.UDPFlow",
    "mitmproxy.connection.Client", "mitmproxy.connection.Server",
    "gateway.proxy.dnslistener.DatagramStream", "_asyncio.Task",
)


def _on(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def enabled(env: Mapping[str, str]) -> bool:
    return _on(env, ENV_DIAGNOSTICS) or _on(env, ENV_TRACEMALLOC)


def frame_count(env: Mapping[str, str]) -> int:
    text = env.get(ENV_FRAMES, "").strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{ENV_FRAMES} must be a whole number of frames (1 or more), not {text!r}")
    return int(text)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_stats() -> dict[str, int] | None:
    """glibc's allocator totals over all its arenas (``mallinfo2``), in bytes: what live
    objects use, what is free but still held (RSS that a high-water mark left behind), and
    what is mapped for large blocks. ``None`` off glibc (< 2.33 or another libc)."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    mallinfo2.restype = _MallInfo2
    m = mallinfo2()
    return {"in_use": m.uordblks, "free_held": m.fordblks, "mmapped": m.hblkhd, "heap": m.arena}


def format_malloc_stats(stats: Mapping[str, int] | None, python_blocks: int,
                        jemalloc: Mapping[str, int] | None = None) -> list[str]:
    lines = [f"python: {python_blocks} allocated blocks"]
    if jemalloc is not None:
        figures = ", ".join(f"{jemalloc[k] / 2**20:.1f} MiB {k}" for k in ("allocated", "active", "resident", "retained"))
        lines.append(f"jemalloc: {figures}")
    if stats is None:
        return lines + ["glibc: mallinfo2 not available"]
    return lines + [f"glibc: {stats['in_use'] / 2**20:.1f} MiB in use, {stats['free_held'] / 2**20:.1f} MiB free "
                    f"but held, {stats['mmapped'] / 2**20:.1f} MiB mmapped, {stats['heap'] / 2**20:.1f} MiB in arenas"]


def type_counts(objects: Iterable[object]) -> Counter[str]:
    """Live objects by qualified type name (``module.Class``; builtins by bare name)."""
    counts: Counter[str] = Counter()
    for obj in objects:
        t = type(obj)
        module = t.__module__
        counts[t.__qualname__ if module == "builtins" else f"{module}.{t.__qualname__}"] += 1
    return counts


def format_type_counts(counts: Counter[str], limit: int = TOP_TYPES) -> list[str]:
    return [f"{n:>10}  {name}" for name, n in counts.most_common(limit)]


def format_sites(stats: Iterable[tracemalloc.Statistic], limit: int = TOP_SITES) -> list[str]:
    out = []
    for stat in list(stats)[:limit]:
        frame = stat.traceback[0]
        out.append(f"{stat.size / 1024:>10.1f} KiB {stat.count:>9} blocks  {frame.filename}:{frame.lineno}")
    return out


def format_growth(diffs: Iterable[tracemalloc.StatisticDiff], limit: int = TOP_SITES) -> list[str]:
    """Sites by growth since the baseline, largest first (shrinking sites are left out)."""
    grown = [d for d in diffs if d.size_diff > 0]
    grown.sort(key=lambda d: d.size_diff, reverse=True)
    out = []
    for d in grown[:limit]:
        frame = d.traceback[0]
        out.append(f"{d.size_diff / 1024:>+10.1f} KiB {d.count_diff:>+9} blocks  (now {d.size / 1024:.1f} KiB)  "
                   f"{frame.filename}:{frame.lineno}")
    return out


def parse_type_counts(report: str) -> dict[str, int]:
    """The ``[watched]`` and ``[objects]`` sections of a report back as {type name: count}
    (for bench scripts)."""
    counts: dict[str, int] = {}
    section = None
    for line in report.splitlines():
        if line.startswith("["):
            section = line.strip()
            continue
        if section in ("[watched]", "[objects]") and line.strip():
            n, _, name = line.strip().partition("  ")
            counts[name.strip()] = int(n)
    return counts


def parse_allocator(report: str) -> dict[str, float]:
    """The ``[allocator]`` section of a report back as numbers (for bench scripts):
    ``python_blocks``; on glibc ``glibc_in_use_mib``, ``glibc_free_held_mib``,
    ``glibc_mmapped_mib``, ``glibc_heap_mib``; under jemalloc also ``jemalloc_allocated_mib``,
    ``jemalloc_active_mib``, ``jemalloc_resident_mib``, ``jemalloc_retained_mib``.
    Missing or unreadable lines are left out."""
    glibc_keys = {"in use": "in_use", "free but held": "free_held", "mmapped": "mmapped", "in arenas": "heap"}
    out: dict[str, float] = {}
    for line in report.splitlines():
        if line.startswith("python: ") and line.endswith(" allocated blocks"):
            number = line[len("python: "):-len(" allocated blocks")]
            if number.isdigit():
                out["python_blocks"] = int(number)
            continue
        lib, _, rest = line.partition(": ")
        if lib not in ("glibc", "jemalloc") or "MiB" not in rest:
            continue
        for part in rest.split(", "):
            value, _, what = part.partition(" MiB ")
            key = glibc_keys.get(what) if lib == "glibc" else what.strip()
            try:
                if key:
                    out[f"{lib}_{key}_mib"] = float(value)
            except ValueError:
                continue
    return out


class MemoryReporter:
    """Writes numbered reports; the first tracemalloc snapshot is the growth baseline."""

    def __init__(self, out_dir: Path, trace: bool) -> None:
        self.out_dir = Path(out_dir)
        self.trace = trace
        self.written = 0
        self._baseline: tracemalloc.Snapshot | None = None

    def render(self, counts: Counter[str], snapshot: tracemalloc.Snapshot | None) -> str:
        watched = Counter({name: counts.get(name, 0) for name in WATCHED_TYPES})
        lines = [f"report {self.written + 1}", "", "[watched]", *format_type_counts(watched, len(watched)),
                 "", "[allocator]", *format_malloc_stats(malloc_stats(), sys.getallocatedblocks(), allocator.jemalloc_stats()),
                 "", "[objects]", *format_type_counts(counts)]
        if snapshot is not None:
            traced, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
            lines += ["", "[tracemalloc]", f"traced {traced / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB",
                      "", "[top sites]", *format_sites(snapshot.statistics("lineno"))]
            if self._baseline is not None:
                lines += ["", "[growth since report 1]",
                          *format_growth(snapshot.compare_to(self._baseline, "lineno"))]
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        gc.collect()
        counts = type_counts(gc.get_objects())
        snapshot = None
        if self.trace and tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot().filter_traces(
                (tracemalloc.Filter(False, tracemalloc.__file__),))
        text = self.render(counts, snapshot)
        if snapshot is not None and self._baseline is None:
            self._baseline = snapshot
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"memory-{self.written + 1}.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self.written += 1
        return path


def install(loop, default_dir: Path, env: Mapping[str, str] = os.environ) -> MemoryReporter | None:
    """Start tracemalloc and hook SIGUSR2 when the environment asks for it; else do nothing."""
    if not enabled(env):
        return None
    trace = _on(env, ENV_TRACEMALLOC)
    if trace and not tracemalloc.is_tracing():
        tracemalloc.start(frame_count(env))
    reporter = MemoryReporter(Path(env.get(ENV_DIR) or default_dir), trace)

    def on_signal() -> None:
        try:
            log.info("memory report written: %s", reporter.write())
        except Exception:  # a diagnostic must never take the gateway down
            log.exception("memory report failed")

    loop.add_signal_handler(signal.SIGUSR2, on_signal)
    log.warning("memory diagnostics on (tracemalloc %s): SIGUSR2 writes a report to %s",
                "on" if trace else "off", reporter.out_dir)
    return reporter
