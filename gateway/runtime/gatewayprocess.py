"""Talking to the running gateway process from an operator command: find it by its pid
file, and ask it to act now (SIGUSR1: reconcile the registry; SIGHUP: reload the policy)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def running_gateway_pid(pid_path: Path) -> int | None:
    try:
        pid = int(pid_path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def poke_reconcile(pid_path: Path) -> bool:
    """Ask the gateway to apply registry changes now; False if no gateway runs (it then
    applies them when it starts; with a gateway on another node, the registry poll does)."""
    pid = running_gateway_pid(pid_path)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    return True


# -- "applied": which registry revision the running gateway has enforced ------------------------
# The gateway rewrites this small file after every reconcile pass that reached a new registry
# revision (peers, drop set and live connections done); an operator command that changed the
# registry waits for it, so "revoked" on the terminal means the device is already cut off.

def write_applied(path: Path, revision: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"revision": revision, "pid": os.getpid(), "at": time.time()}))
    os.replace(tmp, path)


def applied_revision(path: Path) -> int | None:
    try:
        value = json.loads(path.read_text())["revision"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


def wait_applied(path: Path, revision: int, timeout: float, interval: float = 0.005,
                 clock=time.monotonic, sleep=time.sleep) -> float | None:
    """Seconds until the gateway reports ``revision`` (or a later one) enforced; None when
    it has not within ``timeout``."""
    started = clock()
    while True:
        seen = applied_revision(path)
        if seen is not None and seen >= revision:
            return clock() - started
        if clock() - started >= timeout:
            return None
        sleep(interval)
