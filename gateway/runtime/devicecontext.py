"""The policy's view of a registered device as the gateway would build it right now -- the
registry record (groups, ownership, posture, status) and, when user sign-in is configured,
the signed-in user's session (issue #9). One code path for `kanmon policy test --device` and
the console's policy test (issue #21)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.policy.query import DeviceContext


class DeviceLookupError(ValueError):
    pass


def registered_device_context(cfg: Any, device_id: str, now: datetime | None = None,
                              registry: Any = None) -> tuple[DeviceContext, str | None]:
    """(context, signed-in user or None). Raises DeviceLookupError for an unknown device.
    ``registry``: an open registry to read (else one is opened and closed here)."""
    from addons.policy import device_context
    from gateway.registry.factory import open_registry
    from gateway.signin.sessions import SessionDirectory
    from gateway.signin.store import open_session_store

    own = registry is None
    registry = open_registry(cfg) if own else registry
    try:
        record = registry.get(device_id)
    finally:
        close = getattr(registry, "close", None)
        if own and close is not None:
            close()
    if record is None:
        raise DeviceLookupError(f"no registered device {device_id!r}")
    session = None
    if cfg.signin is not None:
        store = open_session_store(cfg)   # the registry's SQLite file, or the shared PostgreSQL
        try:
            directory = SessionDirectory()
            directory.replace(store.active(now or datetime.now(UTC)))
            session = directory.for_device(record.device_id, {str(a) for a in record.addresses}, now or datetime.now(UTC))
        finally:
            store.close()
    ctx = device_context(record, None, session, signin_configured=cfg.signin is not None)
    return ctx, ctx.user
