"""gateway/runtime/diagnostics.py: opt-in memory reports (object counts, tracemalloc sites, growth)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tracemalloc
from collections import Counter

import pytest

from gateway.runtime import diagnostics
from gateway.proxy.connections import ConnectionState
from gateway.runtime.diagnostics import (MemoryReporter, enabled, format_type_counts, install, parse_type_counts, type_counts)


class _Probe:
    pass


def test_off_unless_the_environment_asks():
    assert not enabled({})
    assert not enabled({"KANMON_DIAGNOSTICS": "0", "KANMON_TRACEMALLOC": ""})
    assert enabled({"KANMON_DIAGNOSTICS": "1"})
    assert enabled({"KANMON_TRACEMALLOC": "yes"})


def test_install_does_nothing_when_off(tmp_path):
    class NoSignals:
        def add_signal_handler(self, *a):
            raise AssertionError("no handler may be installed when diagnostics are off")

    assert install(NoSignals(), tmp_path, env={}) is None


def test_type_counts_name_module_and_class():
    counts = type_counts([_Probe(), _Probe(), ConnectionState("c1", "10.0.0.2", 1, None), 3, "x"])
    assert counts[f"{__name__}._Probe"] == 2
    assert counts["gateway.proxy.connections.ConnectionState"] == 1
    assert counts["int"] == 1 and counts["str"] == 1


def test_report_object_section_parses_back():
    counts = Counter({"gateway.proxy.connections.ConnectionState": 7, "dict": 1200, "mitmproxy.http.HTTPFlow": 3})
    text = "report 1\n\n[objects]\n" + "\n".join(format_type_counts(counts)) + "\n\n[tracemalloc]\ntraced 1 MiB\n"
    assert parse_type_counts(text) == dict(counts)


def test_reports_count_live_objects_and_are_numbered(tmp_path):
    reporter = MemoryReporter(tmp_path, trace=False)
    held = [ConnectionState(f"c{i}", "10.0.0.2", i, None) for i in range(37)]
    first = reporter.write()
    del held[:]
    second = reporter.write()
    assert (first.name, second.name) == ("memory-1.txt", "memory-2.txt")
    assert parse_type_counts(first.read_text())["gateway.proxy.connections.ConnectionState"] >= 37
    assert parse_type_counts(second.read_text())["gateway.proxy.connections.ConnectionState"] < 37
    assert "mitmproxy.http.HTTPFlow" in parse_type_counts(second.read_text())   # watched: listed even at 0
    assert not list(tmp_path.glob("*.tmp"))


def test_tracemalloc_report_names_the_site_that_grew(tmp_path):
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        reporter = MemoryReporter(tmp_path, trace=True)
        reporter.write()
        hoard = [bytearray(4096) for _ in range(500)]   # ~2 MiB from this line
        text = reporter.write().read_text()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    growth = text.split("[growth since report 1]", 1)[1]
    first_site = growth.strip().splitlines()[0]
    assert "test_diagnostics.py" in first_site, growth[:500]
    assert len(hoard) == 500


def test_sigusr2_writes_a_report(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        reporter = install(loop, tmp_path / "state", env={"KANMON_DIAGNOSTICS": "1"})
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 5
            while reporter.written == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)
        return reporter

    reporter = asyncio.run(main())
    assert reporter.written == 1
    assert "[objects]" in (tmp_path / "state" / "memory-1.txt").read_text()


def test_report_directory_from_environment(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        try:
            return install(loop, tmp_path / "state", env={"KANMON_DIAGNOSTICS": "on",
                                                          "KANMON_DIAGNOSTICS_DIR": str(tmp_path / "elsewhere")})
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)

    reporter = asyncio.run(main())
    assert reporter.out_dir == tmp_path / "elsewhere" and reporter.trace is False


def test_a_failing_report_does_not_raise_into_the_loop(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main():
        loop = asyncio.get_running_loop()
        reporter = install(loop, blocker, env={"KANMON_DIAGNOSTICS": "1"})
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            await asyncio.sleep(0.3)
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)
        return reporter

    with caplog.at_level("ERROR", logger="kanmon.diagnostics"):
        reporter = asyncio.run(main())
    assert reporter.written == 0
    assert "memory report failed" in caplog.text


@pytest.mark.parametrize("value", ["2", "x"])
def test_frame_count_is_used_or_refused_with_the_variable_named(tmp_path, value):
    env = {"KANMON_TRACEMALLOC": "1", "KANMON_TRACEMALLOC_FRAMES": value}
    was_tracing = tracemalloc.is_tracing()

    async def main():
        loop = asyncio.get_running_loop()
        try:
            return install(loop, tmp_path, env=env)
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)

    try:
        if value == "x":
            with pytest.raises(ValueError, match="KANMON_TRACEMALLOC_FRAMES"):
                asyncio.run(main())
        else:
            asyncio.run(main())
            assert tracemalloc.get_traceback_limit() == 2
    finally:
        if not was_tracing and tracemalloc.is_tracing():
            tracemalloc.stop()


def test_allocator_section_shows_glibc_bytes_in_use_and_free(tmp_path):
    stats = diagnostics.malloc_stats()
    if stats is None:
        pytest.skip("not glibc >= 2.33")
    before = stats["in_use"] + stats["mmapped"]
    hoard = [bytes(200_000) for _ in range(20)]   # 4 MB through malloc (not pymalloc)
    after = diagnostics.malloc_stats()
    assert after["in_use"] + after["mmapped"] - before >= 3_000_000
    assert len(hoard) == 20
    text = MemoryReporter(tmp_path, trace=False).write().read_text()
    line = next(l for l in text.split("[allocator]", 1)[1].splitlines() if l.startswith("glibc: "))
    assert line.startswith("glibc: ") and "MiB in use" in line and "free but held" in line


def test_allocator_section_without_glibc():
    assert diagnostics.format_malloc_stats(None, 12) == ["python: 12 allocated blocks", "glibc: mallinfo2 not available"]


def test_allocator_section_parses_back_for_the_soak_report():
    stats = {"in_use": 36 * 2**20, "free_held": int(3.5 * 2**20), "mmapped": 2 * 2**20, "heap": int(39.5 * 2**20)}
    text = "\n".join(["[allocator]", *diagnostics.format_malloc_stats(stats, 1073905), "", "[objects]", "  12  dict"])
    assert diagnostics.parse_allocator(text) == {
        "python_blocks": 1073905, "glibc_in_use_mib": 36.0, "glibc_free_held_mib": 3.5,
        "glibc_mmapped_mib": 2.0, "glibc_heap_mib": 39.5}
    bare = "\n".join(diagnostics.format_malloc_stats(None, 7))
    assert diagnostics.parse_allocator(bare) == {"python_blocks": 7}
    # a damaged report gives what can be read, never an exception
    assert diagnostics.parse_allocator("python: many allocated blocks\nglibc: x MiB in use, 2.0 MiB mmapped") == {
        "glibc_mmapped_mib": 2.0}
