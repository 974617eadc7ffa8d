"""Issue #16: with `fsync: always` every log append waits for the disk; the access log must
not do that on the event loop (every other connection would wait too), yet the flow must still
wait for its record, and a failed write must still block it (fail closed)."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from mitmproxy.test import tflow

from addons.accesslog import AccessLog
from gateway.logstore import LogStore
from gateway.proxy.connections import LiveConnections


class SlowDisk(LogStore):
    """A store whose appends wait until the test releases them, recording the thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.threads: list[int] = []

    def append(self, stream, record):
        self.threads.append(threading.get_ident())
        if not self.release.wait(5):      # on the event loop nothing could ever release it
            raise OSError("the disk never answered (the append blocked the event loop)")
        super().append(stream, record)


async def invoke(hook, *args):
    """What mitmproxy does with a hook's result."""
    result = hook(*args)
    if result is not None and inspect.isawaitable(result):
        await result


def test_fsync_always_appends_in_a_worker_and_the_flow_waits_for_its_record(tmp_path):
    store = SlowDisk(tmp_path / "logs", fsync="always")
    accesslog = AccessLog(store, connections=LiveConnections())
    flow = tflow.tflow(resp=True)

    async def scenario():
        loop_thread = threading.get_ident()
        hook = asyncio.create_task(invoke(accesslog.response, flow))
        await asyncio.sleep(0.05)
        assert not hook.done()                # the flow waits for its record ...
        assert store.records_written == 0
        store.release.set()                   # ... while the loop still runs other work
        await asyncio.wait_for(hook, 10)
        return loop_thread

    loop_thread = asyncio.run(scenario())
    assert store.records_written == 1
    assert store.threads and all(t != loop_thread for t in store.threads)


def test_a_failed_write_off_the_loop_still_blocks_the_flow(tmp_path):
    class FullDisk(LogStore):
        def append(self, stream, record):
            raise OSError(28, "No space left on device")

    accesslog = AccessLog(FullDisk(tmp_path / "logs", fsync="always"), connections=LiveConnections())
    with pytest.raises(OSError, match="No space left"):
        asyncio.run(invoke(accesslog.response, tflow.tflow(resp=True)))


def test_without_fsync_always_the_record_is_written_before_the_hook_returns(tmp_path):
    store = LogStore(tmp_path / "logs", fsync="rotate")
    accesslog = AccessLog(store, connections=LiveConnections())
    assert accesslog.response(tflow.tflow(resp=True)) is None
    assert store.records_written == 1
