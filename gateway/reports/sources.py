"""I/O edge of the reports: records from a log directory (through
``gateway.logstore.search``), rules from a policy file, and writing the HTML out."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.logstore import STREAMS, search
from gateway.logstore.layout import day_files


def has_log_files(directory: Path) -> bool:
    return any(day_files(directory, stream) for stream in STREAMS)


def stream_records(directory: Path, since: datetime, until: datetime,
                   device: str | None = None) -> dict[str, Iterator[dict[str, Any]]]:
    """Lazy iterators, one per stream (each file is read when the iterator is consumed)."""
    return {stream: search(directory, stream, since, until, device=device) for stream in STREAMS}


def expiring_policy_rules(policy_path: Path, now: datetime, days: int) -> tuple[list[Any], Any]:
    """RuleInfo of the rules that expire within ``days`` (or already did), and the policy's
    time zone. Raises gateway.yamlsource.SourceErrors for a bad policy."""
    from gateway.policy.loader import load_policy

    snapshot = load_policy(policy_path, now)
    return snapshot.expiring(now, days), snapshot.tz


def write_atomically(path: Path, text: str) -> None:
    """Write next to the target and rename, so a failed run never leaves half a report."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)          # mkstemp creates 0600; give the report the usual mode
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
