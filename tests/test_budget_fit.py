"""A synthesis recipe too slow for the run's time budget is cut to fit it, said once, and never under --steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dfkd.config import DistillConfig
from dfkd.engine import Run, distill
from dfkd.generators.inversion import InversionSynthesizer
from dfkd.generators.latent import LatentSynthesizer, optimise_latent
from dfkd.methods import get_method
from dfkd.methods._budget import PROBE_STEPS, ROUND_SHARE, STUDENT_SHARE, IterationPlanner, StepPlanner
from dfkd.methods.nayer import NAYER
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from tests.conftest import KWARGS


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
    quick = StepPlanner("fast", notes.append)
    quick.step_seconds = 0.01  # 50 steps take 0.5 s: within the recipe's share of a 10-minute budget
    assert quick.cap(50, 600.0, 0.2) == 20, "the budget's last round is shorter"
    assert len(notes) == 1, "and that is the budget's end, not the recipe cut: no note"
    assert planner.plan(10_000_000.0)[0] == 2000, "never more than the recipe's"


def test_inversion_batch_stops_on_the_budgets_clock() -> None:
    # Under --budget-clock cpu a batch's time cap counts CPU seconds: the synthesizer reads the clock it is given.
    calls = []

    def objective(x, y):  # noqa: ANN001, ANN202 - an InversionObjective
        calls.append(1)
        return {"loss": x.square().mean()}

    synth = InversionSynthesizer(MNIST_SPEC, objective, 10, 4, 1000, 0.1)
    ticks = iter(range(0, 10_000, 10))
    synth.clock, synth.time_limit = lambda: float(next(ticks)), 25.0  # 10 "seconds" an iteration
    synth.synthesize()
    assert len(calls) == 3, "stopped once the given clock passed the cap, not after 1000 iterations"


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
    # on the CPU: on a GPU shared by the suite's workers, its first round's kernel warm-up alone can take 3 seconds
    cfg = DistillConfig(teachers=(teacher_file,), method=method, steps=None, budget_minutes=0.05, out=str(tmp_path),
                        device="cpu", log_every=1, eval_every=1000, image_every=1000, ckpt_every=1000, fid_every=0,
                        params={"batch_size": 8, "s_steps": 2, **params})
    result = distill(cfg)
    assert result.finished and result.step >= 4, "at least two rounds of student steps"
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    notes = [e["message"] for e in events if e.get("event") == "note"]
    assert len(notes) == 1 and "1000000 synthesis iterations" in notes[0]


def test_step_planner_fits_a_rounds_student_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    import dfkd.methods._budget as budget

    clock, notes = Clock(), []
    monkeypatch.setattr(budget, "time", clock)
    planner = StepPlanner("nayer", notes.append)
    assert planner.cap(400, None, None) == 400, "a step budget keeps the recipe"
    assert planner.cap(400, 600.0, 600.0) == PROBE_STEPS, "speed unknown: a short probing round"
    with planner.timing(PROBE_STEPS):
        clock.now += 2.0 * PROBE_STEPS  # 2 s a step: 400 would take 800 s, more than the whole budget
    assert planner.cap(400, 600.0, 600.0) == int(STUDENT_SHARE * 600.0 / 2.0)
    assert len(notes) == 1 and "400 student steps" in notes[0]
    assert planner.cap(400, 600.0, 21.0, reserve=10.0) == 5, "the round ends inside the time left"
    assert planner.cap(400, 600.0, 1.0) == 1, "at least one step"
    assert planner.cap(4, 600.0, 600.0) == 4, "never more than the recipe's"
    assert len(notes) == 1, "the note is said once"
    quick = StepPlanner("fast", notes.append)
    quick.step_seconds = 0.01  # 50 steps take 0.5 s: within the recipe's share of a 10-minute budget
    assert quick.cap(50, 600.0, 0.2) == 20, "the budget's last round is shorter"
    assert len(notes) == 1, "and that is the budget's end, not the recipe cut: no note"


def test_nayer_warmup_and_rounds_fit_a_time_budget(teacher_file: str, tmp_path: Path) -> None:
    # NAYER's paper warm-up (20 rounds of 10 batches, no student step) and its 400 student steps a round are hours
    # on a CPU at CIFAR size; here 1000 warm-up rounds and 10^6 steps a round must still fit a 3-second budget.
    params = {**NAYER.quick, "warmup_rounds": 1000, "gwp_loops": 3, "s_steps": 1_000_000}
    # on the CPU: a CPU-time budget does not count a GPU's work, and the GPU's first kernels are slow to start
    cfg = DistillConfig(teachers=(teacher_file,), method="nayer", steps=None, budget_minutes=0.05, device="cpu",
                        budget_clock="cpu", out=str(tmp_path), log_every=1, eval_every=1000, image_every=1000,
                        ckpt_every=1000, fid_every=0, params=params)
    result = distill(cfg)
    assert result.finished and result.step >= PROBE_STEPS, "the warm-up ended and the student trained"
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    notes = " | ".join(e["message"] for e in events if e.get("event") == "note")
    assert "warm-up" in notes and "1000000 student steps" in notes
    elapsed = max(e.get("perf/elapsed_s", 0.0) for e in events)
    assert elapsed < 3.0 * 2, f"the run overran its 3-second budget: {elapsed:.1f} s"


@pytest.mark.parametrize("method", ["cmi", "fast"])
def test_latent_rounds_fit_a_time_budget(teacher_file: str, tmp_path: Path, method: str) -> None:
    # CMI's CIFAR recipe (200 generator steps, then 400 student steps a round) makes one round longer than a
    # 10-minute CPU budget; here 10^6 of each must still give several rounds inside a 3-second budget.
    params = {"batch_size": 8, "synth_batch_size": 8, "g_steps": 1_000_000, "s_steps": 1_000_000}
    cfg = DistillConfig(teachers=(teacher_file,), method=method, steps=None, budget_minutes=0.05, out=str(tmp_path),
                        budget_clock="cpu", log_every=1, eval_every=1000, image_every=1000, ckpt_every=1000,
                        fid_every=0, params=params)  # CPU seconds: the budget does not shrink on a loaded machine
    result = distill(cfg)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    notes = " | ".join(e["message"] for e in events if e.get("event") == "note")
    assert result.finished and result.step > PROBE_STEPS, "more than the probing round"
    assert "1000000 synthesis iterations" in notes and "1000000 student steps" in notes
    elapsed = max(e.get("perf/elapsed_s", 0.0) for e in events)
    assert elapsed < 3.0 * 2, f"the run overran its 3-second budget: {elapsed:.1f} s"


@pytest.mark.parametrize("method,params", [
    ("deepinversion", {"synth_batch_size": 8, "iterations": 2}),
    ("zeroq", {"synth_batch_size": 8, "iterations": 2}),
    ("zskd", {"di_batch": 8, "di_iters": 2}),
])
def test_pool_rounds_student_steps_fit_a_time_budget(teacher_file: str, tmp_path: Path, method: str,
                                                     params: dict) -> None:
    # DeepInversion's 50 student steps a round took 5 minutes at 224 px, so a 1-minute budget ran 5: a round's
    # student steps must fit the budget as the latent methods' do. 20,000 here take a minute or more on a CPU.
    cfg = DistillConfig(teachers=(teacher_file,), method=method, steps=None, budget_minutes=0.05, out=str(tmp_path),
                        budget_clock="cpu", log_every=1, eval_every=1000, image_every=1000, ckpt_every=1000,
                        fid_every=0, params={"batch_size": 8, "s_steps": 20_000, **params})
    result = distill(cfg)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    notes = " | ".join(e["message"] for e in events if e.get("event") == "note")
    assert result.finished and result.step > PROBE_STEPS, "more than the probing round"
    assert "20000 student steps" in notes
    elapsed = max(e.get("perf/elapsed_s", 0.0) for e in events)
    assert elapsed < 3.0 * 2, f"the run overran its 3-second budget: {elapsed:.1f} s"


def test_gan_rounds_keep_the_recipes_student_steps(tiny_teacher) -> None:  # noqa: ANN001 - a Teacher
    # A GAN method's student steps per generator step are part of its recipe: a time budget does not cut them.
    cls = get_method("dfad")
    method = cls(tiny_teacher, build_student("lenet5_half", KWARGS), {**cls.default_params(tiny_teacher),
                                                                     **cls.quick, "s_steps": 50},
                 torch.device("cpu"))
    method.time_budget, method.time_left = 600.0, 600.0
    method.steps_planner.step_seconds = 10.0  # 50 steps would be 500 s
    assert method.student_steps_per_round == 50


@pytest.mark.parametrize("method", ["cmi", "fast", "nayer", "deepinversion", "zskd"])
def test_measured_speed_is_checkpointed(tiny_teacher, method: str) -> None:  # noqa: ANN001 - a Teacher
    # A resumed budget run plans its rounds at once from the checkpointed speed, not after a new probing round.
    def build():  # noqa: ANN202
        cls = get_method(method)
        params = {**cls.default_params(tiny_teacher), **cls.quick}
        return cls(tiny_teacher, build_student("lenet5_half", KWARGS), params,
                   torch.device("cpu"))

    a, b = build(), build()
    a.planner.iter_seconds, a.planner.calls = 0.25, 7
    if "steps_planner" in a.planners():
        a.steps_planner.step_seconds = 0.5
    b.load_state_dict(a.state_dict())
    assert b.planner.iter_seconds == 0.25 and b.planner.calls == 7
    assert b.planner.plan(600.0)[0] == min(b.planner.iterations, int(ROUND_SHARE * 600.0 / 0.25))
    if "steps_planner" in b.planners():
        assert b.steps_planner.cap(400, 600.0, 600.0) == int(STUDENT_SHARE * 600.0 / 0.5), "no probing round"


def test_rounds_that_end_far_past_the_budget_are_said(capsys: pytest.CaptureFixture[str]) -> None:
    # a ViT at 224 px: the first round's probe took 132 s of a 12-s budget, and nothing said so
    events: list[dict] = []
    log = SimpleNamespace(event=lambda step, **kw: events.append({"step": step, **kw}))
    run = SimpleNamespace(budget_seconds=lambda: 12.0, elapsed=132.6, longest_round=131.2, step=2)
    Run._say_overrun(run, log)
    said = "the rounds took 133 s of a 12-s budget: the budget is checked between rounds, and one took up to 131 s"
    assert f"note: step 2: {said}" in capsys.readouterr().err and events[0]["message"].startswith(said)
    for elapsed in (21.9, 600.0):  # within 10 s of a short budget; no time budget at all
        run.elapsed, run.budget_seconds = elapsed, (lambda: 12.0) if elapsed < 100 else (lambda: None)
        Run._say_overrun(run, log)
    # a resume with a smaller budget than the time already spent: no round of this process ran over it
    run.elapsed, run.longest_round, run.budget_seconds = 26.0, 0.0, lambda: 6.0
    Run._say_overrun(run, log)
    assert capsys.readouterr().err == "" and len(events) == 1
    notes: list[str] = []
    planner = IterationPlanner("fast", 5, None, notes.append)
    planner.iter_seconds = 0.1  # 5 iterations take 0.5 s, over 5 % of a 6-second budget
    planner.plan(6.0)
    assert "5 synthesis iterations per batch would take 0.5 s here" in notes[0]  # it said "0 s"


def test_latent_batch_stops_on_the_budgets_clock() -> None:
    # fast, cmi and nayer made a first batch of min(g_steps, 10) iterations whatever they cost: ten of a ViT's at
    # 224 px took two minutes of a 12-second budget; the batch now ends at the planner's cap, on the budget's clock
    class Gen(torch.nn.Module):
        nz = 4

        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 16)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.fc(z).view(-1, 1, 4, 4)

    calls = []

    def objective(x: torch.Tensor, y: torch.Tensor) -> tuple[dict, None]:
        calls.append(1)
        return {"loss": x.square().mean()}, None

    class Synth(LatentSynthesizer):
        def synthesize(self) -> None:  # the batch's loop is optimise_latent's, below
            raise NotImplementedError

    synth = Synth(Gen(), objective, None, 4, 1000, 10)
    ticks = iter(range(0, 10_000, 10))
    synth.clock, synth.time_limit = lambda: float(next(ticks)), 25.0  # 10 "seconds" an iteration
    z, y = synth.latents()
    optimise_latent(synth.generator, z, y, torch.optim.Adam([z], lr=0.1), objective, synth.steps,
                    stop=synth.stopper())
    assert len(calls) == 3 == synth.done_steps, "stopped once the given clock passed the cap, not after 1000"
    calls.clear()
    synth.time_limit = None
    optimise_latent(synth.generator, z, y, torch.optim.Adam([z], lr=0.1), objective, 7, stop=synth.stopper())
    assert len(calls) == 7 == synth.done_steps, "no limit: every iteration"
