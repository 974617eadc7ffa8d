"""The cost oracle every linearity check uses (issue #15): CPU time of an input of size n,
2n and 4n of its repeated part must grow at most ~3x per doubling — linear with room for
noise (quadratic is 4x, a backtracking pattern 5x to exponential).

CPU time (``time.process_time``), the minimum of several runs, one re-measure when a ratio
is over: the machine is shared, and the minimum of CPU time is what load disturbs least.
Below ``FLOOR`` seconds a ratio is timer noise, so costs are floored there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_RATIO_PER_DOUBLING = 3.0
REPEATS = 3
FLOOR = 0.002


def cpu_cost(fn: Callable[[object], object], arg: object, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn(arg)
        best = min(best, time.process_time() - start)
    return best


def doubling_ratios(fn: Callable[[object], object], make: Callable[[int], object], n: int) -> tuple[list[float], list[float]]:
    """(costs of n, 2n, 4n; the two ratios), re-measured once if a ratio is over the bound."""
    inputs = [make(n), make(2 * n), make(4 * n)]
    for _attempt in range(2):
        costs = [cpu_cost(fn, x) for x in inputs]
        ratios = [max(costs[i + 1], FLOOR) / max(costs[i], FLOOR) for i in range(2)]
        if max(ratios) <= MAX_RATIO_PER_DOUBLING:
            break
    return costs, ratios


def assert_linear(fn: Callable[[object], object], make: Callable[[int], object], n: int, what: str = "") -> None:
    costs, ratios = doubling_ratios(fn, make, n)
    assert max(ratios) <= MAX_RATIO_PER_DOUBLING, \
        f"{what or getattr(fn, '__name__', fn)}: CPU {[round(c * 1e3, 2) for c in costs]} ms for n={n},{2 * n},{4 * n}"
