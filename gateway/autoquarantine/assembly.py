"""Issue #18's parts of the gateway, put together from the config: the automatic quarantiner
and the addons of the data path (download scanner, block observer). Kept out of gateway/app.py
so the app adds them with a few lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.autoquarantine.service import AutoQuarantiner
from gateway.autoquarantine.triggers import QuarantineOrder, TriggerEngine
from gateway.reports.alerting import auto_quarantine_event


def build_quarantiner(cfg, registry, alerts, metrics, poke: Callable[[], None]) -> AutoQuarantiner | None:
    settings = getattr(cfg, "auto_quarantine", None)
    if settings is None:
        return None

    def alert(order: QuarantineOrder, done: bool) -> None:
        if alerts is not None:
            alerts.send(auto_quarantine_event(order.device_id, user=order.user, trigger=str(order.trigger),
                                              summary=order.summary, evidence=order.evidence, at=order.at, done=done))

    return AutoQuarantiner(TriggerEngine(settings), registry, poke=poke, alert=alert, metrics=metrics)


def data_path_addons(cfg, *, connections, metrics, logstore, block_http, cut, quarantiner: AutoQuarantiner | None,
                     user_of: Callable[[Any], str | None] | None) -> list[Any]:
    """Addons that go right after the enforcer (they act on the verdict that stood)."""
    out: list[Any] = []
    if getattr(cfg, "scan", None) is not None:
        from addons.scan import DownloadScanner
        from gateway.scan.clamdclient import AsyncClamd
        s = cfg.scan
        client = AsyncClamd(s.clamd_socket, s.clamd_host, s.clamd_port, s.timeout_seconds, s.max_concurrent)
        out.append(DownloadScanner(s, client, connections, metrics, logstore, block_http, cut,
                                   on_virus=quarantiner.virus if quarantiner is not None else None, user_of=user_of))
    if quarantiner is not None:
        from addons.autoquarantine import BlockObserver
        out.append(BlockObserver(connections, quarantiner.blocked, user_of=user_of))
    return out
