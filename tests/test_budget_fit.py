"""A synthesis recipe too slow for the run's time budget is cut to fit it, said once, and never under --steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfkd.config import DistillConfig
from dfkd.engine import distill
from dfkd.methods._budget import ROUND_SHARE, IterationPlanner


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_planner_fits_iterations_to_the_measured_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    import dfkd.methods._budget as budget

    clock, notes = Clock(), []
    monkeypatch.setattr(budget, "time", clock)
    planner = IterationPlanner("deepinversion", 2000, None, notes.append)
    assert planner.plan(None) == (None, None), "a step budget keeps the recipe, uncapped"
    assert planner.plan(600.0) == (None, ROUND_SHARE * 600.0), "speed unknown: the recipe, stopped at the cap"
    with planner.timing():
        planner.calls = 30
        clock.now += 30.0  # 1 s an iteration: 2000 would take 2000 s
    assert planner.plan(600.0) == (int(ROUND_SHARE * 600.0), ROUND_SHARE * 600.0)
    assert len(notes) == 1 and "2000 synthesis iterations" in notes[0] and "using 30" in notes[0]
    planner.plan(600.0)
    assert len(notes) == 1, "the note is said once"
    assert planner.plan(10_000_000.0)[0] == 2000, "never more than the recipe's"


def test_planner_respects_the_users_own_cap() -> None:
    planner = IterationPlanner("zskd", 100, 2.0, lambda m: None)
    assert planner.plan(600.0) == (None, 2.0)
    assert planner.plan(None) == (None, 2.0)


@pytest.mark.parametrize("method,params", [
    ("deepinversion", {"synth_batch_size": 8, "iterations": 1_000_000}),
    ("zskd", {"di_batch": 8, "di_iters": 1_000_000}),
])
def test_slow_synthesis_still_makes_student_steps(teacher_file: str, tmp_path: Path, method: str,
                                                  params: dict) -> None:
    # A recipe of 10^6 iterations per batch would take hours; a 3-second budget must still train the student.
    cfg = DistillConfig(teachers=(teacher_file,), method=method, steps=None, budget_minutes=0.05, out=str(tmp_path),
                        log_every=1, eval_every=1000, image_every=1000, ckpt_every=1000, fid_every=0,
                        params={"batch_size": 8, "s_steps": 2, **params})
    result = distill(cfg)
    assert result.finished and result.step >= 4, "at least two rounds of student steps"
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    notes = [e["message"] for e in events if e.get("event") == "note"]
    assert len(notes) == 1 and "1000000 synthesis iterations" in notes[0]
