"""The last good copy of every feed, under ``<state_dir>/feeds/``, and the feed's fetch
state (validators, last success, last error). Each file is written whole to a temporary
name, synced, and renamed over the old one: a crash leaves the old copy or the new one,
never half of either, and the copy survives restarts.

``NAME.json``        the last good snapshot (normalized entries per category)
``NAME.state.json``  ETag / Last-Modified of that copy, last attempt, last error
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.feeds.formats import Category
from gateway.i18n import Text
from gateway.yamlsource import SourceError, SourceErrors, read_bytes_file

T_DAMAGED = Text("フィードのコピーが壊れています（{kind}）。`kanmon lists update` で取得し直してください",
                 "damaged feed copy ({kind}); run `kanmon lists update` to fetch it again")
MAX_SNAPSHOT_BYTES = 1024 * 1024 * 1024
MAX_STATE_BYTES = 64 * 1024
DEFAULT_STATE_DIR = "/var/lib/kanmon"


def feeds_dir(state_dir: str | Path | None = None) -> Path:
    base = state_dir or os.environ.get("KANMON_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(base) / "feeds"


@dataclass
class Snapshot:
    name: str
    url: str
    fetched_at: float  # time.time() of the fetch that produced it
    sha256: str  # of the fetched file (of the directory's files for a local UT1 tree)
    categories: dict[str, Category]

    def total(self) -> int:
        return sum(len(c) for c in self.categories.values())

    def skipped(self) -> int:
        return sum(c.skipped for c in self.categories.values())

    def names(self):
        for c in self.categories.values():
            yield from c.domains
            yield from c.exact


@dataclass
class FeedState:
    etag: str | None = None
    last_modified: str | None = None
    last_attempt: float | None = None
    last_success: float | None = None  # a fetch that confirmed or replaced the copy
    last_error: str | None = None
    last_error_reason: str | None = None
    failures: dict[str, int] = field(default_factory=dict)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def snapshot_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.json"


def save_snapshot(directory: Path, snap: Snapshot) -> None:
    doc = {
        "name": snap.name, "url": snap.url, "fetched_at": snap.fetched_at, "sha256": snap.sha256,
        "categories": {k: {"domains": sorted(c.domains), "exact": sorted(c.exact), "urls": sorted(c.urls),
                           "skipped": c.skipped} for k, c in snap.categories.items()},
    }
    _write_atomic(snapshot_path(directory, snap.name), json.dumps(doc, separators=(",", ":")).encode())


def load_snapshot(directory: Path, name: str) -> Snapshot | None:
    """The last good copy, or None when there is none. A copy that cannot be read raises
    SourceErrors (the policy then does not compile: fail closed)."""
    path = snapshot_path(directory, name)
    if not path.exists():
        return None
    data = read_bytes_file(path, MAX_SNAPSHOT_BYTES)
    try:
        doc = json.loads(data)
        cats = {str(k): Category(set(v["domains"]), set(v["exact"]), set(v["urls"]), int(v["skipped"]))
                for k, v in doc["categories"].items()}
        return Snapshot(str(doc["name"]), str(doc["url"]), float(doc["fetched_at"]), str(doc["sha256"]), cats)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SourceErrors([SourceError.of(str(path), 0, (), T_DAMAGED.format(kind=type(exc).__name__))]) from None


def load_state(directory: Path, name: str) -> FeedState:
    path = directory / f"{name}.state.json"
    try:
        doc: dict[str, Any] = json.loads(read_bytes_file(path, MAX_STATE_BYTES))
        return FeedState(**{k: doc.get(k) for k in FeedState.__dataclass_fields__ if k in doc})
    except (SourceErrors, ValueError, TypeError):
        return FeedState()


def save_state(directory: Path, name: str, state: FeedState) -> None:
    _write_atomic(directory / f"{name}.state.json", json.dumps(state.__dict__).encode())
