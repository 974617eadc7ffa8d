"""Fail closed: an exception in any of our addons blocks the connection it happened on.

mitmproxy's addon manager catches addon exceptions, logs them and carries on, so a crashing
filter would let traffic through. Every addon in Kanmon's chain (ours and operator-supplied
extras) is wrapped in `Guarded`, which catches the exception, counts it, and blocks what the
hook was handling: the HTTP flow gets an error page, a DNS query is refused, a raw TCP/UDP
connection is cut, a new client or server connection is refused. An exception while loading
or configuring stops the gateway: it must not serve without its addons.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, dns, hooks, http, tcp, tls, udp
from mitmproxy.proxy import server_hooks

from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.verdict import RULE_FAIL_CLOSED, Action, Stage, Verdict

log = logging.getLogger("kanmon.failclosed")

LIFECYCLE_HOOKS = frozenset({"load", "configure", "running"})
# Hooks after which nothing can be blocked any more: an error there is only counted.
TEARDOWN_HOOKS = frozenset({"done", "client_disconnected", "server_disconnected", "tcp_end", "udp_end",
                            "tcp_error", "udp_error", "error", "dns_error", "websocket_end", "add_log", "update"})

# Hooks mitmproxy still registers but warns about when an addon merely has the attribute
# (AddonManager.register uses hasattr): no attribute for them here, so a start does not log
# one deprecation warning per guarded addon (#19). None of our addons implements them.
DEPRECATED_HOOKS = frozenset({"add_log"})


class FailClosedActions:
    """What blocking means for each kind of hook argument."""

    def __init__(self, connections: LiveConnections, metrics: GatewayMetrics,
                 block_http: Callable[[http.HTTPFlow, Verdict], None],
                 cut_client: Callable[[str], None], fatal: Callable[[str], None]):
        self.connections = connections
        self.metrics = metrics
        self.block_http = block_http
        self.cut_client = cut_client
        self.fatal = fatal

    def handle(self, addon: str, hook: str, args: tuple, exc: BaseException) -> None:
        self.metrics.addon_errors.labels(addon, hook).inc()
        reason = f"{addon}.{hook}: {type(exc).__name__}: {exc}"
        log.error("addon error, failing closed: %s", reason, exc_info=exc)
        if hook in LIFECYCLE_HOOKS:
            self.fatal(reason)
            return
        if hook in TEARDOWN_HOOKS or not args:
            return
        target = args[0]
        verdict = Verdict(Action.BLOCK, RULE_FAIL_CLOSED, f"internal error in {addon}.{hook}", _stage_of(target))
        self.metrics.fail_closed_blocks.labels(str(verdict.stage), "addon-error").inc()
        client = _client_of(target)
        if client is not None and (state := self.connections.get(client.id)) is not None:
            state.failed = reason
            state.record(verdict)
        if isinstance(target, http.HTTPFlow):
            self.block_http(target, verdict)
        elif isinstance(target, dns.DNSFlow):
            target.response = target.request.fail(dns.response_codes.REFUSED)
        elif isinstance(target, (tcp.TCPFlow, udp.UDPFlow)):
            if target.messages:
                target.messages[-1].content = b""
            self.cut_client(target.client_conn.id)
        elif isinstance(target, connection.Client):
            target.error = reason
        elif isinstance(target, server_hooks.ServerConnectionHookData):
            target.server.error = reason
        elif client is not None:
            # TLS hooks and the like: the connection is marked failed above; the enforcer
            # refuses everything on it, and cutting it now stops the handshake.
            self.cut_client(client.id)


def _client_of(target: Any) -> connection.Client | None:
    if isinstance(target, connection.Client):
        return target
    if hasattr(target, "client_conn"):
        return target.client_conn
    if isinstance(target, server_hooks.ServerConnectionHookData):
        return target.client
    if isinstance(target, (tls.ClientHelloData, tls.TlsData)):
        return target.context.client
    return None


def _stage_of(target: Any) -> Stage:
    if isinstance(target, http.HTTPFlow):
        return Stage.RESPONSE if target.response is not None else Stage.REQUEST
    if isinstance(target, dns.DNSFlow):
        return Stage.DNS
    if isinstance(target, (tcp.TCPFlow, udp.UDPFlow)):
        return Stage.TCP
    if isinstance(target, (tls.ClientHelloData, tls.TlsData)):
        return Stage.TLS
    if isinstance(target, server_hooks.ServerConnectionHookData):
        return Stage.UPSTREAM
    return Stage.CONNECT


class Guarded:
    """Wraps one addon so every hook it implements fails closed.

    mitmproxy looks every hook up again for every event and addon (``hasattr(a, "addons")``
    and ``getattr(a, name, None)`` in ``AddonManager._iter_hooks``). Answering those through
    ``__getattr__`` and a property cost about 2.5 µs per addon and event (21 µs per event over
    eight addons, >10 % of the gateway's CPU under load), so the answers are plain instance
    attributes set once: a wrapper for each hook the inner addon implements, ``None`` for the
    others (mitmproxy skips a false value) and an empty ``addons`` for an addon without
    children. A wrapper looks the inner hook up when it is called, so an addon that rebinds
    one of its hooks at run time is followed; an addon with children gets `GuardedParent`,
    whose ``addons`` follows the inner list.
    """

    def __new__(cls, inner: Any, actions: FailClosedActions):
        if cls is Guarded and hasattr(inner, "addons"):
            cls = GuardedParent
        return super().__new__(cls)

    def __init__(self, inner: Any, actions: FailClosedActions):
        self._inner = inner
        self._actions = actions
        self.name = getattr(inner, "name", type(inner).__name__.lower())
        if not isinstance(self, GuardedParent):
            self.addons = ()
        for hook in hooks.all_hooks:
            if hook in DEPRECATED_HOOKS:
                continue
            attr = getattr(inner, hook, None)
            setattr(self, hook, self._wrap(hook, attr) if callable(attr) else None)

    @property
    def inner(self) -> Any:
        return self._inner

    def __getattr__(self, item: str) -> Any:
        # For what is not an instance attribute: options, commands, the addon's own state,
        # and a hook whose event class was registered after this addon was guarded (its
        # module imported later): wrapped then, never handed out unguarded.
        if item == "_inner":
            raise AttributeError(item)  # not initialised yet (copy, pickle)
        attr = getattr(self._inner, item)
        if item in hooks.all_hooks and callable(attr):
            attr = self._wrap(item, attr)
            setattr(self, item, attr)
        return attr

    def _wrap(self, hook: str, func: Callable) -> Callable:
        actions, name, inner = self._actions, self.name, self._inner
        if inspect.iscoroutinefunction(func):
            async def guarded_async(*args):
                try:
                    return await getattr(inner, hook)(*args)
                except Exception as exc:
                    actions.handle(name, hook, args, exc)
            guarded_async.__name__ = guarded_async.__qualname__ = f"guarded_{hook}"
            return guarded_async

        async def guarded_awaitable(awaitable, args):
            try:
                return await awaitable
            except Exception as exc:
                actions.handle(name, hook, args, exc)

        def guarded(*args):
            try:
                result = getattr(inner, hook)(*args)
            except Exception as exc:
                actions.handle(name, hook, args, exc)
                return None
            if result is not None and inspect.isawaitable(result):
                return guarded_awaitable(result, args)  # a hook rebound to an async function
            return result
        guarded.__name__ = guarded.__qualname__ = f"guarded_{hook}"
        return guarded

    def __repr__(self) -> str:
        return f"Guarded({self._inner!r})"


class GuardedParent(Guarded):
    """`Guarded` for an addon with children (an ``addons`` list): each child is guarded too
    and keeps its wrapper, and with it its hook table, while the inner list is unchanged."""

    def __init__(self, inner: Any, actions: FailClosedActions):
        # the inner addon's children last seen and their Guarded wrappers
        self._children: tuple[tuple, list] = ((), [])
        super().__init__(inner, actions)

    @property
    def addons(self) -> list:
        current = tuple(getattr(self._inner, "addons", ()))
        seen, wrapped = self._children
        if len(current) != len(seen) or any(a is not b for a, b in zip(current, seen)):
            wrapped = [Guarded(a, self._actions) for a in current]
            self._children = (current, wrapped)
        return list(wrapped)
