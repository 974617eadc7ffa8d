"""One fuzz harness = a hypothesis strategy + a check that must hold for every value.

The same ``Harness`` object is collected by pytest (``as_test``, a small CI budget) and run
for minutes by ``bench/fuzz.py`` (``run_for``), which reports how many inputs were tried.

Zero hangs: every input runs under a wall-clock watchdog (SIGALRM, main thread only) that
raises ``Hang`` if the code under test does not return within ``hang_seconds``. Hypothesis'
own ``deadline`` is not used for this: it only measures a call *after* it returns (a real
hang never does), and on the shared CI machine its millisecond budget makes slow-but-correct
inputs flaky. Speed is judged in bench/, never by timed tests (README "Benchmarks").
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# CI budget per harness; KANMON_FUZZ_EXAMPLES overrides it (bench/fuzz.py uses batches).
CI_EXAMPLES = int(os.environ.get("KANMON_FUZZ_EXAMPLES", "0")) or None
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
             HealthCheck.large_base_example]


class Hang(AssertionError):
    """The code under test did not return within the harness' time limit."""


@contextmanager
def watchdog(seconds: float, what: str) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals only reach the main thread; pytest and bench/fuzz.py run there
        return

    def fire(_signum, _frame):
        raise Hang(f"{what}: no answer within {seconds:.1f} s (a hang)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Harness:
    name: str
    strategy: st.SearchStrategy
    check: Callable[[Any], None]
    ci_examples: int = 100          # small: the whole tests/fuzz suite stays well under 60 s
    hang_seconds: float = 10.0
    tried: int = field(default=0, compare=False)

    def run_one(self, value: Any) -> None:
        self.tried += 1
        with watchdog(self.hang_seconds, self.name):
            self.check(value)

    def _given(self, max_examples: int, seed: int | None = None, shrink: bool = True) -> Callable[[], None]:
        phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + ([Phase.shrink] if shrink else [])
        # database=None: the CI result depends on the code and the seed only, never on a
        # directory of remembered failures; print_blob shows how to reproduce a failure.
        run = settings(max_examples=max_examples, deadline=None, database=None, derandomize=seed is None,
                       suppress_health_check=_SUPPRESS, phases=phases, print_blob=True)(
            given(self.strategy)(self.run_one))
        if seed is not None:
            from hypothesis import seed as with_seed
            run = with_seed(seed)(run)
        return run

    def as_test(self) -> Callable[[], None]:
        run = self._given(CI_EXAMPLES or self.ci_examples)

        def test() -> None:
            run()

        test.__name__ = f"test_fuzz_{self.name.replace('-', '_')}"
        test.__doc__ = f"fuzz harness {self.name}: no crash, no hang, invariants hold"
        return test

    def run_for(self, seconds: float, batch: int = 200) -> tuple[int, float]:
        """Run fresh random batches until ``seconds`` have passed: (inputs tried, seconds)."""
        start = time.monotonic()
        self.tried = 0
        n = 0
        while time.monotonic() - start < seconds:
            self._given(batch, seed=int.from_bytes(os.urandom(4), "big") + n)()
            n += 1
        return self.tried, time.monotonic() - start
