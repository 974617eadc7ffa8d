"""Issue #18's addons of the data path, from the config: the download scanner and automatic
quarantine's block observer. They go right after the enforcer (they act on the verdict that
stood). Kept out of gateway/app.py so the chain adds them with one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from addons.autoquarantine import BlockObserver
from addons.scan import DownloadScanner
from gateway.autoquarantine.service import AutoQuarantiner
from gateway.scan.clamdclient import AsyncClamd


def data_path_addons(cfg, *, connections, metrics, logstore, block_http, cut, quarantiner: AutoQuarantiner | None,
                     user_of: Callable[[Any], str | None] | None) -> list[Any]:
    """Addons that go right after the enforcer (they act on the verdict that stood)."""
    out: list[Any] = []
    if getattr(cfg, "scan", None) is not None:
        s = cfg.scan
        client = AsyncClamd(s.clamd_socket, s.clamd_host, s.clamd_port, s.timeout_seconds, s.max_concurrent)
        out.append(DownloadScanner(s, client, connections, metrics, logstore, block_http, cut,
                                   on_virus=quarantiner.virus if quarantiner is not None else None, user_of=user_of))
    if quarantiner is not None:
        out.append(BlockObserver(connections, quarantiner.blocked, user_of=user_of))
    return out
