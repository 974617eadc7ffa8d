"""gateway/proxy/dispatch.py: hook dispatch that visits only the addons implementing a hook
makes the same calls, in the same order, with the same error handling as mitmproxy's."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions, hooks, master, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from addons.failclosed import FailClosedActions, Guarded
from gateway.proxy.dispatch import IndexedAddonManager


class Recorder:
    """Implements `request` (sync) and `response` (async); records what it saw."""

    def __init__(self, name: str, calls: list, fail: str | None = None):
        self.name, self.calls, self.fail = name, calls, fail

    def request(self, flow):
        self.calls.append((self.name, "request", flow.id))
        if self.fail == "error":
            raise ValueError("boom")
        if self.fail == "halt":
            raise exceptions.AddonHalt()

    async def response(self, flow):
        await asyncio.sleep(0)
        self.calls.append((self.name, "response", flow.id))


class Quiet:
    """Implements no hook, and has a module named like one (mitmproxy skips it)."""

    import logging as log  # noqa: F401  (the `log` hook name)

    def __init__(self, name: str):
        self.name = name


class Parent:
    """Children that change at run time (walked on each event)."""

    def __init__(self, calls: list):
        self.name, self.addons = "parent", [Recorder("child1", calls)]


def _chain(calls: list, fail: str | None = None) -> list:
    return [Recorder("a", calls), Quiet("q"), Recorder("b", calls, fail), Parent(calls), Recorder("c", calls)]


async def _run(manager_class, fail: str | None = None, events=("request", "response")):
    calls: list = []
    m = master.Master(options.Options(), event_loop=asyncio.get_running_loop())
    m.addons = manager_class(m)
    chain = _chain(calls, fail)
    m.addons.add(*chain)
    flow = tflow.tflow(resp=True)
    for name in events:
        await m.addons.handle_lifecycle(hooks.all_hooks[name](flow))
    # the chain changes: a child added to the parent, an addon removed, one added
    chain[3].addons.append(Recorder("child2", calls))
    m.addons.remove(chain[0])
    m.addons.add(Recorder("d", calls))
    for name in events:
        await m.addons.handle_lifecycle(hooks.all_hooks[name](flow))
    m._legacy_log_events.uninstall()   # its logging handler must not outlive this event loop
    return [(who, hook) for who, hook, _ in calls]


@pytest.mark.parametrize("fail", [None, "error", "halt"])
def test_the_same_calls_in_the_same_order_as_mitmproxy(fail, caplog):
    with caplog.at_level(logging.ERROR):
        expected = asyncio.run(_run(AddonManager, fail))
        mitmproxy_errors = [r.getMessage() for r in caplog.records]
        caplog.clear()
        got = asyncio.run(_run(IndexedAddonManager, fail))
        ours_errors = [r.getMessage() for r in caplog.records]
    assert got == expected
    assert ours_errors == mitmproxy_errors    # a failing hook is logged and the next addon runs
    if fail == "halt":
        assert ("c", "request") not in got and ("c", "response") in got
    if fail is None:
        assert ("child2", "request") in got and ("d", "response") in got and ("a", "request") in got


def test_guarded_addons_are_visited_only_for_their_hooks():
    calls: list = []

    async def go():
        m = master.Master(options.Options(), event_loop=asyncio.get_running_loop())
        m.addons = IndexedAddonManager(m)
        actions = FailClosedActions.__new__(FailClosedActions)
        m.addons.add(*[Guarded(Quiet(f"q{i}"), actions) for i in range(20)], Guarded(Recorder("r", calls), actions))
        flow = tflow.tflow()
        await m.addons.handle_lifecycle(hooks.all_hooks["request"](flow))
        plan = m.addons._plan("request")
        assert [type(top.inner).__name__ for top, _ in plan] == ["Recorder"]
        assert m.addons._plan("client_connected") == []
        await m.addons.trigger_event(server_hooks.ClientConnectedHook(flow.client_conn))
        m._legacy_log_events.uninstall()

    asyncio.run(go())
    assert [(who, hook) for who, hook, _ in calls] == [("r", "request")]
