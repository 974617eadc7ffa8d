"""The gateway's feed refresher: each feed is fetched when its refresh interval is due (in
a worker thread: the event loop never waits on the network or the parser); when a feed's
last good copy changes on disk — fetched here or by `kanmon lists update` — the policy is
recompiled off the loop and swapped atomically (GatewayApp.reload_policy, as for
`kanmon policy apply`). A refused or unreachable feed changes nothing: the last good copy
keeps serving, and the refusal is counted by reason."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.feeds.spec import FeedSpec
from gateway.feeds.store import load_snapshot, load_state, snapshot_path
from gateway.feeds.update import UpdateResult, update_feed

log = logging.getLogger("kanmon.feeds")
TICK_SECONDS = 1.0


class FeedRunner:
    def __init__(self, directory: Path, policy_path: Callable[[], Path | None], metrics,
                 reload: Callable[[], Awaitable[bool]]):
        self.directory = directory
        self._policy_path = policy_path
        self.metrics = metrics
        self._reload = reload
        self._specs_key: tuple | None = None
        self._specs: list[FeedSpec] = []
        self._due: dict[str, float] = {}
        self._copies: dict[str, int] = {}  # feed -> mtime_ns of the copy the policy was compiled from
        self._success: dict[str, float] = {}

    def specs(self) -> list[FeedSpec]:
        """The feeds of the active policy file (parsed again only when the file changes)."""
        from gateway.policy.compiler import parse_policy
        from gateway.yamlsource import MAX_YAML_BYTES, SourceErrors, read_text_file

        path = self._policy_path()
        if path is None:
            return []
        try:
            st = Path(path).stat()
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key != self._specs_key:
                _doc, sources = parse_policy(read_text_file(path, MAX_YAML_BYTES), str(path))
                self._specs = [s.feed for s in sources if s.feed is not None]
                self._specs_key = key
                for spec in self._specs:
                    self._success.setdefault(spec.name, load_state(self.directory, spec.name).last_success or 0.0)
                    self.metrics.list_age.labels(spec.name).set_function(lambda n=spec.name: self.age(n))
        except (OSError, SourceErrors):
            pass  # a broken policy file is reported by the reload; the feeds known so far stay
        return self._specs

    def age(self, name: str, now: float | None = None) -> float:
        last = self._success.get(name) or 0.0
        return float("inf") if not last else max(0.0, (time.time() if now is None else now) - last)

    def _copy_version(self, name: str) -> int:
        try:
            return snapshot_path(self.directory, name).stat().st_mtime_ns
        except OSError:
            return 0

    def _base_dir(self) -> Path | None:
        path = self._policy_path()
        return Path(path).parent if path else None

    def update(self, spec: FeedSpec) -> UpdateResult:
        """One update, blocking (call in a thread); metrics recorded."""
        result = update_feed(spec, self.directory, self._base_dir())
        if result.outcome == "refused":
            self.metrics.list_update_failures.labels(spec.name, result.reason or "error").inc()
        else:
            self._success[spec.name] = time.time()
        if result.snapshot is not None:
            for cat, c in result.snapshot.categories.items():
                self.metrics.list_entries.labels(spec.name, cat).set(len(c))
        return result

    def fetch_missing(self) -> None:
        """At start-up, before the policy compiles: fetch every feed that has no copy yet.
        One that still has none then stops the start (the compiler says which)."""
        now = time.time()
        for spec in self.specs():
            try:
                has_copy = load_snapshot(self.directory, spec.name) is not None
            except Exception:  # noqa: BLE001 - a damaged copy: fetch a new one
                has_copy = False
            if not has_copy:
                self.update(spec)
                self._due[spec.name] = now + spec.refresh
        for spec in self._specs:
            self._copies[spec.name] = self._copy_version(spec.name)

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the refresher must outlive one bad pass
                log.exception("feed refresh pass failed; the last good copies keep serving")

    async def tick(self) -> bool:
        """Fetch what is due; reload the policy when a copy changed. True when it reloaded."""
        specs = await asyncio.to_thread(self.specs)
        now = time.time()
        for spec in specs:
            if self._due.get(spec.name, 0.0) <= now:
                self._due[spec.name] = now + spec.refresh
                await asyncio.to_thread(self.update, spec)
        changed = {s.name: self._copy_version(s.name) for s in specs}
        if all(self._copies.get(n) == v for n, v in changed.items()):
            return False
        log.info("feed copies changed (%s): recompiling the policy",
                 ", ".join(n for n, v in changed.items() if self._copies.get(n) != v))
        # Remembered even when the reload is refused (logged and counted there): the next
        # new copy tries again, a broken policy file is not recompiled every second.
        self._copies.update(changed)
        return await self._reload()
