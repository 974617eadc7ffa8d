"""The RE2 set of URL wildcard patterns tied to a host (facts.KEYED_SET), matched without
their scheme part.

A wildcard ``site.example/path*`` compiles to ``^[a-z][a-z0-9+.-]*://site\\.example...``
(urlpattern.py). In one RE2 set of thousands of such patterns the leading scheme loop cannot
be factored out and cost 40 MiB of the 58 MiB the set took for 8,000 patterns (issue #22,
engine scale). Here every pattern is compiled from ``://`` on (``CompiledWildcard.tail``),
the set is asked about the URL from its first ``:`` on, and the scheme is checked on its own:
a scheme regex never matches ``:``, so a URL matches ``^S://T$`` exactly when its text up
to the first ``:`` matches ``S`` and the rest matches ``^://T$``. Both checks run in RE2
with the set's own options (case-insensitive), so a scheme matches as it did inside the
whole pattern. tests/fuzz/test_engine_scale_paths.py compares both forms on generated URLs.
"""

from __future__ import annotations

import re
from typing import Any

import re2

ANY_SCHEME = "[a-z][a-z0-9+.-]*"  # urlpattern.py's scheme for a pattern that names none


class SchemeSplitSet:
    """``Match(url_bytes)`` -> the indices of the patterns that match, like RE2's Set."""

    __slots__ = ("_set", "_schemes", "_checks")

    def __init__(self, compiled_set: Any, schemes: tuple[str | None, ...], options: Any):
        self._set = compiled_set  # the RE2 set of the patterns' tails, in this order
        self._schemes = schemes  # per pattern: its scheme (lower case) or None for any
        self._checks = {scheme: re2.compile(ANY_SCHEME if scheme is None else re.escape(scheme), options)
                        for scheme in set(schemes)}

    def Match(self, url: bytes) -> list[int]:  # noqa: N802 - RE2's Set spelling (facts.Facts)
        colon = url.find(b":")
        if colon < 1 or url[colon:colon + 3] != b"://":
            return []
        found = self._set.Match(url[colon:])
        if not found:
            return []
        scheme = url[:colon].decode("utf-8", "surrogateescape")
        verdicts: dict[str | None, bool] = {}
        out = []
        for index in found:
            want = self._schemes[index]
            ok = verdicts.get(want)
            if ok is None:
                ok = verdicts[want] = self._checks[want].fullmatch(scheme) is not None
            if ok:
                out.append(index)
        return out
