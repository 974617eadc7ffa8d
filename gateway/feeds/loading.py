"""Last good feed copies -> the DomainLists the compiler uses. Reads only the state dir,
never the network: `kanmon policy test` and `policy check` work offline."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.feeds.formats import ALL, Category
from gateway.feeds.store import Snapshot, load_snapshot, snapshot_path
from gateway.policy.compiler import ListSource
from gateway.policy.lists import DomainList


def url_regex(entry: str) -> str:
    """A UT1 ``urls`` line (``host/path``, squidGuard semantics: the host or a sub-domain,
    any scheme and port, the path as a prefix) as an RE2 pattern. ``re.escape`` leaves
    nothing RE2 would read as syntax."""
    host, _, path = entry.partition("/")
    return r"^[a-z][a-z0-9+.-]*://(?:[^/?#@]*\.)?" + re.escape(host) + r"(?::[0-9]+)?/" + re.escape(path)


def _domain_list(name: str, filename: str, cats: list[Category], match: str) -> DomainList:
    domains = frozenset().union(*(c.domains for c in cats)) if cats else frozenset()
    exact = frozenset().union(*(c.exact for c in cats)) if cats else frozenset()
    urls = sorted(set().union(*(c.urls for c in cats))) if cats else []
    if match == "exact":
        domains, exact = frozenset(), exact | domains
    return DomainList(name, filename, domains, exact, tuple((url_regex(u), 0) for u in urls))


def feed_lists(sources: list[ListSource], directory: Path) -> tuple[dict[str, DomainList], str]:
    """Every feed's lists (``name`` and ``name/category``) and a version string of the copies.
    A feed without a copy is left out (the compiler reports it); a damaged copy raises."""
    lists: dict[str, DomainList] = {}
    versions = []
    for src in sources:
        spec = src.feed
        if spec is None:
            continue
        snap: Snapshot | None = load_snapshot(directory, spec.name)
        if snap is None:
            continue
        filename = str(snapshot_path(directory, spec.name))
        versions.append(f"{spec.name}={snap.sha256}@{snap.fetched_at}")
        cats = [snap.categories.get(c, Category()) for c in spec.categories]
        lists[spec.name] = _domain_list(spec.name, filename, cats, spec.match)
        for c, cat in zip(spec.categories, cats):
            if c != ALL:
                lists[f"{spec.name}/{c}"] = _domain_list(f"{spec.name}/{c}", filename, [cat], spec.match)
    return lists, ";".join(versions)
