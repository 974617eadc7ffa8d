"""`kanmon policy test --device ID --config C`: the policy's view of a registered device as the
gateway would build it right now -- the registry record (groups, ownership, posture, status)
and, when user sign-in is configured, the signed-in user's session (issue #9)."""

from __future__ import annotations

from datetime import datetime

from gateway.cli.common import load_config_or_exit
from gateway.policy.query import DeviceContext
from gateway.runtime.devicecontext import DeviceLookupError  # noqa: F401  (raised to the CLI's callers)
from gateway.runtime.devicecontext import registered_device_context as _context


def registered_device_context(config_path: str, device_id: str,
                              now: datetime | None = None) -> tuple[DeviceContext, str | None]:
    """(context, signed-in user or None). Raises DeviceLookupError for an unknown device.
    The code path is gateway/runtime/devicecontext.py, shared with the console (issue #21)."""
    return _context(load_config_or_exit(config_path), device_id, now)
