"""Periodic malloc_trim (gateway/runtime/heaptrim.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.runtime import heaptrim


@pytest.mark.parametrize("text, expect", [("", None), ("  ", None), ("0", None), ("60", 60.0), (" 0.5 ", 0.5)])
def test_interval_from_the_environment(text, expect):
    assert heaptrim.interval_from_env({heaptrim.ENV: text}) == expect
    assert heaptrim.interval_from_env({}) is None


@pytest.mark.parametrize("text", ["-1", "soon", "1m", "nan"])
def test_a_bad_interval_names_the_variable(text):
    with pytest.raises(ValueError, match=heaptrim.ENV):
        heaptrim.interval_from_env({heaptrim.ENV: text})


def test_the_loop_trims_in_a_worker_thread_and_reports_each_pass():
    calls, reports = [], []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    async def run():
        task = asyncio.create_task(heaptrim.trim_loop(0.01, trim, reports.append))
        while len(reports) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert calls[:3] == [0, 0, 0] and all(seconds >= 0 for seconds in reports)


def test_glibc_malloc_trim_is_found_and_answers():
    trim = heaptrim.load_malloc_trim()
    if trim is None:
        pytest.skip("not glibc")
    hoard = [bytearray(100_000) for _ in range(50)]
    del hoard
    assert trim(0) in (0, 1)     # 1: memory was released, 0: there was none to release
