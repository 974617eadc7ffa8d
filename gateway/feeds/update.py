"""One feed update: fetch (conditional), verify, parse, check, store. A feed that fails any
step is refused: the last good copy stays, the failure is recorded in the feed's state (and
counted by reason in metrics by the caller)."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.feeds import formats
from gateway.feeds.checks import FeedRefused, check_sanity, verify_integrity
from gateway.feeds.fetch import fetch_bytes, fetch_http, read_local
from gateway.feeds.formats import Category, FeedFormatError, parse_text, parse_ut1_files
from gateway.feeds.spec import FeedSpec
from gateway.feeds.store import FeedState, Snapshot, load_snapshot, load_state, save_snapshot, save_state
from gateway.i18n import Text

log = logging.getLogger("kanmon.feeds")

MAX_SIGNATURE_BYTES = 4096
T_TOO_MANY = Text("エントリが多すぎます（{n} 件、上限 {limit} 件）", "too many entries ({n}, at most {limit})")
T_FORMAT = Text("フィードを読めません: {e}", "the feed cannot be read: {e}")
T_DIR_INTEGRITY = Text("ディレクトリのフィードには sha256 / 署名を使えません（tar.gz を指定してください）",
                       "a feed directory cannot carry a sha256 or signature (point at the tar.gz)")


@dataclass
class UpdateResult:
    name: str
    outcome: str  # updated, unchanged, refused
    reason: str | None = None  # metrics label of a refusal
    message: Text | None = None
    added: dict[str, set[str]] = field(default_factory=dict)
    removed: dict[str, set[str]] = field(default_factory=dict)
    snapshot: Snapshot | None = None  # the copy in force after the update (None: none yet)


def _local_path(spec: FeedSpec, base_dir: Path | None) -> Path:
    path = Path(spec.url)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def obtain(spec: FeedSpec, base_dir: Path | None, state: FeedState | None, previous: Snapshot | None,
           now: float) -> tuple[Snapshot | None, FeedState]:
    """The new snapshot (None: not modified) and the validators to remember. Raises
    FeedRefused for every failure; writes nothing."""
    new_state = FeedState(**(state.__dict__ if state else {}))
    files: dict[tuple[str, str], str] | None = None
    if spec.is_http:
        conditional = previous is not None and state is not None
        got = fetch_http(spec.url, spec.timeout, spec.max_bytes,
                         state.etag if conditional else None, state.last_modified if conditional else None)
        if got.body is None:
            return None, new_state
        data = got.body
        new_state.etag, new_state.last_modified = got.etag, got.last_modified
    else:
        path = _local_path(spec, base_dir)
        if spec.format == "ut1" and path.is_dir():
            if spec.sha256 or spec.public_key:
                raise FeedRefused("integrity", T_DIR_INTEGRITY)
            files, h = {}, hashlib.sha256()
            for cat in spec.categories:
                for kind in ("domains", "urls"):
                    member = path / cat / kind
                    if member.exists():
                        raw = read_local(member, spec.max_bytes)
                        h.update(f"{cat}/{kind}\0".encode() + raw + b"\0")
                        files[(cat, kind)] = raw.decode("utf-8", "replace")
            data = h.hexdigest().encode()  # stands for the tree in the unchanged check below
        else:
            data = read_local(path, spec.max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if files is None:
        signature = None
        if spec.public_key:
            signature = fetch_bytes(spec.signature_url, spec.timeout, MAX_SIGNATURE_BYTES, base_dir)
        verify_integrity(data, spec.sha256, spec.public_key, signature)
    if previous is not None and previous.sha256 == digest and previous.url == spec.url:
        return None, new_state
    try:
        if spec.format == "ut1":
            if files is None:
                files = formats.ut1_files_from_tar(data, spec.categories)
            cats = parse_ut1_files(files, spec.categories)
        else:
            cats = {formats.ALL: parse_text(data.decode("utf-8", "replace"), spec.format)}
    except FeedFormatError as exc:
        raise FeedRefused(exc.reason, T_FORMAT.format(e=exc)) from None
    snap = Snapshot(spec.name, spec.url, now, digest, cats)
    total = snap.total()
    if total > formats.MAX_FEED_ENTRIES:
        raise FeedRefused("too-many", T_TOO_MANY.format(n=total, limit=formats.MAX_FEED_ENTRIES))
    check_sanity(total, previous.total() if previous else None, spec.max_shrink, snap.names(),
                 spec.accept_public_suffixes)
    return snap, new_state


def diff(old: Snapshot | None, new: Snapshot) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    added, removed = {}, {}
    for cat, c in new.categories.items():
        o = old.categories.get(cat, Category()) if old else Category()
        new_set = c.domains | c.exact | c.urls
        old_set = o.domains | o.exact | o.urls
        added[cat], removed[cat] = new_set - old_set, old_set - new_set
    return added, removed


def update_feed(spec: FeedSpec, directory: Path, base_dir: Path | None = None, now: float | None = None) -> UpdateResult:
    """Fetch and, when it passes every check, store the new copy. Never raises for a feed
    problem: the result says what happened and the state file records it."""
    now = time.time() if now is None else now
    state = load_state(directory, spec.name)
    try:
        previous = load_snapshot(directory, spec.name)
    except Exception:  # noqa: BLE001 - a damaged copy is replaced by a good fetch
        previous = None
    state.last_attempt = now
    try:
        snap, state = obtain(spec, base_dir, state, previous, now)
    except FeedRefused as exc:
        state.last_attempt = now
        state.last_error = exc.text.render()
        state.last_error_reason = exc.reason
        state.failures[exc.reason] = state.failures.get(exc.reason, 0) + 1
        save_state(directory, spec.name, state)
        log.warning("feed %s refused (%s); the last good copy keeps serving: %s", spec.name, exc.reason, exc.text.en)
        return UpdateResult(spec.name, "refused", exc.reason, exc.text, snapshot=previous)
    state.last_success = now
    state.last_error = state.last_error_reason = None
    if snap is None:
        save_state(directory, spec.name, state)
        return UpdateResult(spec.name, "unchanged", snapshot=previous)
    added, removed = diff(previous, snap)
    save_snapshot(directory, snap)
    save_state(directory, spec.name, state)
    log.info("feed %s updated: %d entries (+%d -%d), %d lines skipped", spec.name, snap.total(),
             sum(map(len, added.values())), sum(map(len, removed.values())), snap.skipped())
    return UpdateResult(spec.name, "updated", added=added, removed=removed, snapshot=snap)
