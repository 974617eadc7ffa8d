"""The I/O edge of the policy layer: read the policy file and its list files, compile.

Every file is read with gateway/yamlsource's ``read_text_file``: a regular file only, within
a size bound (a list named as /dev/zero or a FIFO is refused at once, issue #15)."""

from __future__ import annotations

from collections.abc import Callable

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gateway.policy.compiler import compile_policy, parse_policy
from gateway.policy.snapshot import PolicySnapshot
from gateway.yamlsource import MAX_LIST_BYTES, MAX_YAML_BYTES, SourceError, SourceErrors, read_text_file

log = logging.getLogger("kanmon.policy")


def load_policy(path: str | Path, now: datetime | None = None, feeds_dir: str | Path | None = None,
                cache: Any = None, release_memory: Callable[[], None] | None = None) -> PolicySnapshot:
    """Read, validate and compile a policy. Raises SourceErrors listing every problem
    (``file:line: key: message``); nothing is half-built. A policy file that cannot be read
    raises ``UnreadableSource`` (a SourceErrors: the commands exit 2).

    ``cache``: a gateway/runtime/policycache.PolicyCache: the compile starts from what an earlier
    compile of exactly these inputs stored there (a damaged file is refused and the policy
    compiled from its sources), and a compile from the sources stores its result.
    ``release_memory``: called after the compile, e.g. gateway/runtime/heaptrim.py
    ``give_back_freed_memory`` (the allocator is the process's business, not the engine's)."""
    policy_path = Path(path)
    text = read_text_file(policy_path, MAX_YAML_BYTES)
    return load_policy_text(text, policy_path, now, feeds_dir, cache, release_memory)


def load_policy_text(text: str, path: str | Path, now: datetime | None = None, feeds_dir: str | Path | None = None,
                     cache: Any = None, release_memory: Callable[[], None] | None = None) -> PolicySnapshot:
    """``load_policy`` of a text already read (a candidate pasted in the console, issue #21),
    compiled as if it were the file ``path``: its list files are read relative to ``path``'s
    directory. Nothing is written."""
    policy_path = Path(path)
    doc, sources = parse_policy(text, str(policy_path))
    list_texts: dict[str, tuple[str, str]] = {}
    errors: list[SourceError] = []
    for src in sources:
        if src.feed is not None:
            continue  # a category feed: its last good copy (below)
        list_path = Path(src.file)
        if not list_path.is_absolute():
            list_path = policy_path.parent / list_path
        try:
            list_texts[src.name] = (str(list_path), read_text_file(list_path, MAX_LIST_BYTES))
        except SourceErrors as exc:
            # Point at the policy line that names the file, and say which file.
            first = exc.errors[0]
            errors.append(SourceError(doc.filename, doc.line_of(("lists", src.name, "file")), ("lists", src.name, "file"),
                                      f"{first.message} ({list_path})", f"{first.ja}（{list_path}）" if first.ja else ""))
    if errors:
        raise SourceErrors(errors)
    from gateway.feeds.loading import feed_lists  # the last good copies: never the network
    from gateway.feeds.store import feeds_dir as default_feeds_dir

    lists, versions = feed_lists(sources, Path(feeds_dir) if feeds_dir else default_feeds_dir())
    try:
        return _compile(doc, text, sources, list_texts, now, lists, versions, cache)
    finally:
        if release_memory is not None:
            release_memory()




def _compile(doc: Any, text: str, sources: Any, list_texts: dict[str, tuple[str, str]], now: datetime | None,
             lists: Any, versions: str, cache: Any) -> PolicySnapshot:
    if cache is None:
        return compile_policy(doc, text, sources, list_texts, now or datetime.now(timezone.utc),
                              feed_lists=lists, feed_versions=versions)
    key = cache.key(text, list_texts, versions)
    prepared = cache.load(key)
    snapshot = compile_policy(doc, text, sources, list_texts, now or datetime.now(timezone.utc), feed_lists=lists,
                              feed_versions=versions, prepared=prepared, keep_prepared=prepared is None)
    if prepared is None:
        cache.store(key, snapshot.prepared)
        snapshot.prepared = None  # the parsed lists need not outlive the compile
        # issue #22: serve the big host tables from the files just written, mapped as every
        # process that loads this policy from the cache maps them (one shared copy), not from
        # this compile's dicts. Same contents: the files were written from these dicts, and
        # the snapshot is not served yet.
        shared = cache.shared_tables(key) if hasattr(cache, "shared_tables") else {}
        snapshot._exact = shared.get("exact", snapshot._exact)
        snapshot._suffix = shared.get("suffix", snapshot._suffix)
    return snapshot
