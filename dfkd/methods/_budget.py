"""Fitting a recipe's rounds into a run's time budget (wall-clock or CPU seconds, as `--budget-clock` says).

A paper's iterations per synthesized batch (2000 for DeepInversion, 1500 for ZSKD on CIFAR) can take longer on a
CPU than a whole short run, which would then make no student step at all. Under a time budget a batch may take at
most `ROUND_SHARE` of it: the first batch stops at that cap (its speed is unknown), and later batches get as many
iterations as the measured speed fits, with the recipe's schedule spread over them. The run prints a note when
this cuts the recipe. A step budget (`--steps`) is never cut, so step-budgeted runs stay exactly reproducible.

`StepPlanner` does the same for a round's student steps (NAYER's 400 at batch 512 take longer than a 10-minute
CPU budget at CIFAR size): a round's student steps take at most `STUDENT_SHARE` of the budget and end inside the
time left, once a short first round (`PROBE_STEPS`) has measured their speed. `WARMUP_SHARE` bounds a method's
warm-up rounds, which make no student step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

#: The largest share of a time budget one synthesized batch may take (a run makes >= 1 / ROUND_SHARE rounds).
ROUND_SHARE = 0.05
#: The largest share of a time budget one round's student steps may take.
STUDENT_SHARE = 0.1
#: The largest share of a time budget a method's warm-up (rounds without student steps) may take.
WARMUP_SHARE = 0.2
#: Student steps of the first round under a time budget, before their speed is known: few, as a heavy teacher's
#: step takes seconds on a CPU (ten of a ViT's at 224 px took two minutes of a 12-second budget); every round is
#: timed again, so the next plan does not rest on these alone.
PROBE_STEPS = 2


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
                        f"{_seconds(self.iterations * self.iter_seconds)} s here, more than {ROUND_SHARE:.0%} of the "
                        f"{time_budget / 60:g}-minute budget; using {n} per batch (a larger --budget-minutes, "
                        "--steps or a faster device keeps the recipe's)")
        return n, cap

    def fit(self, synth: Any, time_budget: float | None, clock: Callable[[], float]) -> None:
        """Set the next batch of `synth`, a synthesizer that stops on a clock.

        Its `steps` (the plan's, else the recipe's), its `time_limit` (the plan's cap: the first batch, its speed
        unknown, ends there) and the `clock` that limit counts.
        """
        steps, synth.time_limit = self.plan(time_budget)
        synth.steps, synth.clock = steps or self.iterations, clock

    @contextmanager
    def timing(self, clock: Callable[[], float] | None = None) -> Iterator[None]:
        """Measure the batch made inside: seconds per counted iteration, on the budget's `clock` (default wall)."""
        clock = clock or time.perf_counter
        self.calls, start = 0, clock()
        yield
        if self.calls:
            self.iter_seconds = (clock() - start) / self.calls

    def state_dict(self) -> dict[str, Any]:
        """The measured speed (checkpointed, so a resumed run plans at once instead of probing again)."""
        return {"iter_seconds": self.iter_seconds, "calls": self.calls, "noted": self._noted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iter_seconds, self.calls = state.get("iter_seconds"), int(state.get("calls", 0))
        self._noted = bool(state.get("noted", False))

    @property
    def batch_seconds(self) -> float:
        """The expected seconds of the next batch (0 before the first is measured)."""
        return 0.0 if self.iter_seconds is None else self.iter_seconds * self.calls


class StepPlanner:
    """Caps a round's student steps so that rounds fit the run's time budget.

    Args:
        method: the method's name, for the note.
        notice: where the one-line note goes when the recipe's steps are cut.
    """

    def __init__(self, method: str, notice: Callable[[str], None]) -> None:
        self.method, self.notice = method, notice
        self.step_seconds: float | None = None
        self._noted = False

    def cap(self, steps: int, time_budget: float | None, time_left: float | None, reserve: float = 0.0) -> int:
        """The steps of the next round: `steps`, or fewer under a time budget (`reserve`: its synthesis seconds).

        Several processes (torchrun) keep the recipe's steps: their clocks differ, and every rank must step alike.
        """
        if time_budget is None or time_left is None or steps <= 0 or _distributed():
            return steps
        if self.step_seconds is None:
            return min(steps, PROBE_STEPS)
        share = int(STUDENT_SHARE * time_budget / self.step_seconds)  # the recipe's cut; the budget's end is not
        n = max(1, min(steps, share, int((time_left - reserve) / self.step_seconds)))
        if share < steps and not self._noted:
            self._noted = True
            self.notice(f"{self.method}: {steps} student steps a round would take "
                        f"{_seconds(steps * self.step_seconds)} s here, more than {STUDENT_SHARE:.0%} of the "
                        f"{time_budget / 60:g}-minute budget; using up to {max(1, share)} a round (a larger "
                        "--budget-minutes, --steps or a faster device keeps the recipe's)")
        return n

    @contextmanager
    def timing(self, steps: int, clock: Callable[[], float] | None = None) -> Iterator[None]:
        """Measure the `steps` student steps made inside, on the budget's `clock` (default wall)."""
        clock = clock or time.perf_counter
        start = clock()
        yield
        if steps:
            self.step_seconds = (clock() - start) / steps

    def state_dict(self) -> dict[str, Any]:
        """The measured speed (checkpointed, so a resumed run plans at once instead of probing again)."""
        return {"step_seconds": self.step_seconds, "noted": self._noted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_seconds, self._noted = state.get("step_seconds"), bool(state.get("noted", False))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _seconds(x: float) -> str:
    """Seconds as a note prints them: whole ones from 10 up, two significant digits under (not "0 s")."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"
