"""Fitting a synthesis recipe's iterations per batch into a run's wall-clock budget.

A paper's iterations per synthesized batch (2000 for DeepInversion, 1500 for ZSKD on CIFAR) can take longer on a
CPU than a whole short run, which would then make no student step at all. Under a time budget a batch may take at
most `ROUND_SHARE` of it: the first batch stops at that cap (its speed is unknown), and later batches get as many
iterations as the measured speed fits, with the recipe's schedule spread over them. The run prints a note when
this cuts the recipe. A step budget (`--steps`) is never cut, so step-budgeted runs stay exactly reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: The largest share of a wall-clock budget one synthesized batch may take (a run makes >= 1 / ROUND_SHARE rounds).
ROUND_SHARE = 0.05


class IterationPlanner:
    """Plans the iterations of each synthesized batch from the measured speed and the run's time budget.

    Args:
        method: the method's name, for the note.
        iterations: the recipe's iterations per batch.
        synth_seconds: the user's own cap on one batch's seconds (None: none).
        notice: where the one-line note goes when the recipe is cut.
    """

    def __init__(self, method: str, iterations: int, synth_seconds: float | None,
                 notice: Callable[[str], None]) -> None:
        self.method, self.iterations, self.synth_seconds, self.notice = method, int(iterations), synth_seconds, notice
        self.calls = 0  # iterations counted in the batch being made (the caller counts them)
        self.iter_seconds: float | None = None
        self._noted = False

    def plan(self, time_budget: float | None) -> tuple[int | None, float | None]:
        """(iterations for the next batch or None for the recipe's, seconds it may take or None for no cap)."""
        if time_budget is None:
            return None, self.synth_seconds
        cap = min(ROUND_SHARE * time_budget, self.synth_seconds or math.inf)
        if self.iter_seconds is None:
            return None, cap
        n = max(1, min(self.iterations, int(cap / self.iter_seconds)))
        if n < self.iterations and not self._noted:
            self._noted = True
            self.notice(f"{self.method}: {self.iterations} synthesis iterations per batch would take "
                        f"{self.iterations * self.iter_seconds:.0f} s here, more than {ROUND_SHARE:.0%} of the "
                        f"{time_budget / 60:g}-minute budget; using {n} per batch (a larger --budget-minutes, "
                        "--steps or a faster device keeps the recipe's)")
        return n, cap

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Measure the batch made inside: seconds per counted iteration."""
        self.calls, start = 0, time.perf_counter()
        yield
        if self.calls:
            self.iter_seconds = (time.perf_counter() - start) / self.calls
