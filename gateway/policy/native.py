"""Which engine decides: the native fast path or the pure-Python engine.

The native fast path (``_fastpath.cpp``, a CPython extension built by setup.py) decides a
URL in one call when the policy's rules are ones it can evaluate, and hands everything else
back to the Python engine in snapshot.py, which stays the reference: the gateway runs the
same policy with the same verdicts where the extension is not built.
``KANMON_NATIVE=0`` in the environment switches the fast path off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import ModuleType

try:
    from gateway.policy import _fastpath as _MODULE

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built here: the Python engine decides
    _MODULE = None
    IMPORT_ERROR = str(exc)

ENV = "KANMON_NATIVE"


def available() -> bool:
    """True when the extension is built and importable (whatever KANMON_NATIVE says)."""
    return _MODULE is not None


def switched_off(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(ENV, "").strip().lower() in ("0", "false", "no", "off")


def module(wanted: bool | None = None, environ: Mapping[str, str] | None = None) -> tuple[ModuleType | None, str]:
    """The extension module a snapshot should use, and why not when None. ``wanted``: None
    follows KANMON_NATIVE; False never; True requires it (RuntimeError when not built)."""
    if wanted is False:
        return None, "native engine not requested"
    if wanted is None and switched_off(environ):
        return None, f"{ENV}=0"
    if _MODULE is None:
        if wanted:
            raise RuntimeError(f"the native policy engine is not built: {IMPORT_ERROR}")
        return None, f"extension not built: {IMPORT_ERROR}"
    return _MODULE, ""
