"""Last month beside this month (monthly review, issue #18). Pure, no I/O.

The review of the previous month is built the same way from its own records (commands.py
reads both months); here each counted table of the two reports is lined up by key, so the
reviewer sees what is new, what grew and what went away."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .model import Count


@dataclass(frozen=True)
class Beside:
    key: str
    this: int
    last: int | None      # None: not among last month's top rows (a truncated table)

    @property
    def change(self) -> int | None:
        return None if self.last is None else self.this - self.last

    @property
    def new(self) -> bool:
        """Seen this month and not at all last month."""
        return self.this > 0 and self.last == 0


def previous_month(month: str) -> str:
    """``"2026-01"`` -> ``"2025-12"`` (the caller has validated the format)."""
    year, number = (int(p) for p in month.split("-"))
    return f"{year - 1:04d}-12" if number == 1 else f"{year:04d}-{number - 1:02d}"


def beside(this: Sequence[Count], last: Sequence[Count] | None, *, complete: bool = True,
           limit: int | None = None) -> tuple[Beside, ...]:
    """Every key of this month (in this month's order), then keys only last month had
    (largest first). ``last`` None (no previous report) gives zeros for last month.
    ``complete`` False: the tables are each month's top N, so a key missing from last
    month's table has an unknown count there (None), not zero. ``limit`` keeps the first N
    rows of this month and of last-month-only keys each."""
    previous = {c.key: c.count for c in last or ()}
    missing = 0 if complete or last is None else None
    rows = [Beside(c.key, c.count, previous.get(c.key, missing)) for c in this]
    seen = {c.key for c in this}
    gone = [Beside(c.key, 0, c.count) for c in (last or ()) if c.key not in seen]
    if limit is not None:
        rows, gone = rows[:limit], gone[:limit]
    return tuple(rows) + tuple(gone)


def change_text(row: Beside) -> str:
    """``+3``, ``-2``, ``±0``, ``?`` when last month's count is unknown (signs, not words:
    the same in both languages)."""
    if row.change is None:
        return "?"
    return f"{row.change:+,}" if row.change else "±0"
