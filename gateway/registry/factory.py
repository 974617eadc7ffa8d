"""The one way to open the device registry: the PostgreSQL registry when the config (or
$KANMON_REGISTRY_URL) names one, else the embedded SQLite file of the state directory. Every
command and the gateway process open it here, so no caller reads `registry.sqlite3` itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.registry.outbox import LocalOutbox, OutageTolerantRegistry

REGISTRY_URL_ENV = "KANMON_REGISTRY_URL"


def registry_url_of(cfg) -> str | None:
    """The shared registry's URL: `registry.url` in the config (cfg.registry_url once
    config.py has it), else $KANMON_REGISTRY_URL; None: the embedded SQLite registry."""
    return getattr(cfg, "registry_url", None) or os.environ.get(REGISTRY_URL_ENV) or None


def outbox_path(cfg) -> Path:
    return cfg.state_dir / "registry-outbox.sqlite3"


def open_state_dir_registry(state_dir: str | Path):
    """The embedded SQLite registry of a state directory, or None when it has none (commands
    that take `--state-dir` instead of `--config`; they never create one)."""
    from gateway.registry.sqlite import SqliteRegistry
    path = Path(state_dir) / "registry.sqlite3"
    return SqliteRegistry(path) if path.exists() else None


def open_registry(cfg, *, node: str | None = None, gateway: bool = False):
    """The registry the config selects: PostgreSQL when a registry URL is set (wrapped in
    OutageTolerantRegistry for the gateway process), else the embedded SQLite file."""
    url = registry_url_of(cfg)
    if url is None:
        from gateway.registry.sqlite import SqliteRegistry
        return SqliteRegistry(cfg.registry_path)
    from gateway.registry.postgres import PgRegistry
    inner = PgRegistry(url, node=node or cfg.node_name)
    if not gateway:
        return inner
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return OutageTolerantRegistry(inner, LocalOutbox(outbox_path(cfg)))
