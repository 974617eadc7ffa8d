"""The automatic quarantiner, put together from the config and the gateway's registry, alert
dispatcher and metrics (issue #18). Kept out of gateway/app.py so the app adds it with a few
lines; its addons join the chain in addons/chain.py (_data_path_addons)."""

from __future__ import annotations

from collections.abc import Callable

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

    return AutoQuarantiner(TriggerEngine(settings), registry, poke=poke, alert=alert, metrics=metrics,
                           node=getattr(cfg, "node_name", "gw"))
