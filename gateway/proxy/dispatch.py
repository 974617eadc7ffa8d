"""Hook dispatch that visits only the addons implementing the hook (issue #22).

mitmproxy's AddonManager.trigger_event visits every addon of the chain for every event (a
coroutine, a context manager, two generators and a `getattr` per addon), and after each flow
event it does it all again for the `update` event. Kanmon's chain is about twenty addons
(its own and mitmproxy's data-path ones), a new TLS connection about twenty events. Measured
here: about 3.5 µs per addon per flow event (75 µs for 20 addons), almost all of it for
addons that do not implement the hook; bench/proxy.py --suite https shows the gateway's CPU
per connection before and after.

``IndexedAddonManager`` keeps, per hook name, the list of (addon, bound hook) pairs in chain
order, and calls just those: the same calls, in the same order, with the same error handling
(mitmproxy's ``safecall`` per top-level addon, ``AddonHalt`` ends the event). The list is
made again whenever the chain changes (``add``/``remove``/``clear``: the chain list is
replaced or grows). An addon with children (a non-empty ``addons``: mitmproxy's script
loader, Kanmon's ``GuardedParent``) is walked on every event as mitmproxy does, since its
children may change at any time. A hook is looked up once: an addon that rebinds a hook
method after it was added is not followed (none of Kanmon's or mitmproxy's data-path addons
does; Kanmon's ``Guarded`` wrappers look the inner hook up on each call anyway).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks


class IndexedAddonManager(addonmanager.AddonManager):
    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._plans: dict[str, list[tuple[Any, tuple]]] = {}
        self._plans_for: tuple[int, int] = (0, -1)

    def _plan(self, name: str) -> list[tuple[Any, tuple]]:
        """(top-level addon, its (hook) callables, or None for "walk it each time") in chain order."""
        key = (id(self.chain), len(self.chain))
        if key != self._plans_for:
            self._plans, self._plans_for = {}, key
        plan = self._plans.get(name)
        if plan is None:
            plan = []
            for top in self.chain:
                if getattr(top, "addons", None):          # children that may change: walked each time
                    plan.append((top, None))
                    continue
                func = getattr(top, name, None)
                if func and callable(func):
                    plan.append((top, (func,)))
                elif func and not isinstance(func, types.ModuleType):   # as _iter_hooks: a module is skipped
                    raise exceptions.AddonManagerError(f"Addon handler {name} ({top}) not callable")
            self._plans[name] = plan
        return plan

    async def trigger_event(self, event: hooks.Hook) -> None:
        plan = self._plan(event.name)
        if not plan:
            return
        args = event.args()
        for top, funcs in plan:
            try:
                with addonmanager.safecall():
                    if funcs is None:
                        await self.invoke_addon(top, event)
                        continue
                    for func in funcs:
                        result = func(*args)
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return
