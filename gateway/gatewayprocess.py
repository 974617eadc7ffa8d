"""Talking to the running gateway process from an operator command: find it by its pid
file, and ask it to act now (SIGUSR1: reconcile the registry; SIGHUP: reload the policy)."""

from __future__ import annotations

import os
import signal
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
