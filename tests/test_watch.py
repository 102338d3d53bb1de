"""The mode-collapse watch: statistics of a synthetic batch, the detector, the warning and its remedies."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KWARGS
from torch import nn

import dfkd.runwatch
from dfkd.config import DistillConfig
from dfkd.data import load_images, to_model_input
from dfkd.endcheck import chance_threshold, collapsed_at_end, top1_agreement
from dfkd.engine import distill, resume
from dfkd.errors import DfkdError
from dfkd.generators import Generator, GeneratorSynthesizer
from dfkd.modelfile import load_model
from dfkd.models import MODELS
from dfkd.report import report
from dfkd.spec import MNIST_SPEC
from dfkd.teacher import Teacher
from dfkd.watch import (
    CollapseWatch,
    EpisodeWatch,
    batch_stats,
    effective_classes,
    remedy,
    reset_generator,
    stuck_remedy,
    student_stuck,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = str(ROOT / "examples" / "mnist_lenet5_bn.pt")
MNIST_TEST = str(ROOT / "examples" / "mnist_test.npz")
DEMO_SPEC = load_model(DEMO_TEACHER)[1].input_spec


def pixel_teacher() -> Teacher:
    """A teacher whose class is the brightest of the first ten pixels: what it sees is easy to steer."""
    lin = nn.Linear(32 * 32, 10, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, :10] = 10 * torch.eye(10)
    return Teacher(nn.Sequential(nn.Flatten(), lin), MNIST_SPEC)


class PixelGenerator(nn.Module):
    """G(z): images with one bright pixel, at `z`'s class (balanced) or always at pixel 0 (one class)."""

    def __init__(self, one_class: bool) -> None:
        super().__init__()
        self.one_class, self.nz = one_class, 4

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(len(z), 1, 32, 32)
        cls = torch.zeros(len(z), dtype=torch.long) if self.one_class else torch.arange(len(z)) % 10
        x.view(len(z), -1)[torch.arange(len(z)), cls] = 1.0
        return x + 0.01 * z[:, :1, None, None]


def test_effective_classes_counts_equally_frequent_classes() -> None:
    assert effective_classes(torch.tensor([64, 0, 0])) == pytest.approx(1.0)
    assert effective_classes(torch.tensor([5, 5, 5, 5])) == pytest.approx(4.0)
    assert 1.0 < effective_classes(torch.tensor([60, 2, 2])) < 2.0


def test_batch_stats_of_a_one_class_and_a_balanced_batch() -> None:
    teacher = pixel_teacher()
    z = torch.randn(40, 4)
    one = batch_stats(teacher(PixelGenerator(True)(z)), teacher(PixelGenerator(False)(z)))
    assert one["classes_covered"] == 1 and one["effective_classes"] == pytest.approx(1.0)
    assert one["teacher_confidence"] > 0.99 and one["student_agreement"] == pytest.approx(0.1)
    balanced = batch_stats(teacher(PixelGenerator(False)(z)))
    assert balanced["classes_covered"] == 10 and balanced["effective_classes"] == pytest.approx(10.0)


@pytest.mark.parametrize("one_class", [True, False])
def test_detector_fires_on_one_class_and_stays_quiet_on_balanced(one_class: bool) -> None:
    teacher, gen = pixel_teacher(), PixelGenerator(one_class)
    watch = CollapseWatch(10, fraction=0.5, patience=3)
    fired = [watch.update(batch_stats(teacher(gen(torch.randn(32, 4))))["effective_classes"], 32)
             for _ in range(20)]
    assert fired == ([False, False, True] + [False] * 17 if one_class else [False] * 20)


def test_one_warning_per_episode_and_a_new_one_after_recovery() -> None:
    watch = CollapseWatch(10, fraction=0.5, patience=2)
    seq = [1.0] * 5 + [9.0] + [1.0] * 3 + [9.0] * 2 + [1.0] * 2
    fired = [watch.update(e, 64) for e in seq]
    # a single healthy check does not end the episode; two in a row do, and the next collapse warns again
    assert [i for i, f in enumerate(fired) if f] == [1, 12]
    assert watch.episodes == 2


def test_threshold_follows_what_a_batch_can_show() -> None:
    # 100 classes, batches of 16: at most 16 classes per batch, so 7 effective classes is not a collapse
    assert not CollapseWatch(100, patience=1).update(9.0, 16)
    assert CollapseWatch(100, patience=1).update(7.0, 16)
    assert CollapseWatch(2, patience=1).update(1.0, 64), "two classes: one class alone is a collapse"


def test_reset_generator_redraws_weights_and_clears_adam() -> None:
    synth = GeneratorSynthesizer(Generator(MNIST_SPEC, nz=8, ngf=4), lambda x, y: {"loss": x.square().mean()}, 4,
                                 1e-2)
    synth.synthesize()
    before = [p.clone() for p in synth.generator.parameters()]
    assert synth.optimizer.state
    reset_generator(synth)
    assert not synth.optimizer.state
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.generator.parameters()))


# --- in a run ---------------------------------------------------------------------------------------------
def collapse_cfg(teacher_file: str, out: Path, device: str = "auto", **params) -> DistillConfig:
    return DistillConfig(teachers=(teacher_file,), method="dfad", steps=24, out=str(out), log_every=2, device=device,
                         eval_every=100, ckpt_every=100, image_every=100, fid_every=0,
                         params={"batch_size": 8, "s_steps": 2, "watch_every": 2, "collapse_patience": 3,
                                 "select_every": 0, **params})


@pytest.fixture
def one_class_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GAN generator emits the same image (plus its gradient path), so the teacher sees one class."""
    original = GeneratorSynthesizer.step_on

    def constant(self, z, y):
        x, losses = original(self, z, y)
        return torch.zeros_like(x) + 0.5, losses

    monkeypatch.setattr(GeneratorSynthesizer, "step_on", constant)


def test_a_run_whose_generator_collapses_says_so_once(teacher_file: str, tmp_path: Path, one_class_generator: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = distill(collapse_cfg(teacher_file, tmp_path / "r")).run_dir
    err = capsys.readouterr().err
    assert err.count("mode collapse") == 1
    assert "-p balance=" in err and "-p collapse_action=reset" in err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "collapse"]
    assert len(events) == 1 and events[0]["step"] == 6 and events[0]["effective_classes"] == 1.0
    assert sum("synthetic/effective_classes" in r for r in records) == 12
    assert "mode collapse" in report(run).text()


def test_a_collapse_over_short_resumes_claims_no_more_steps_than_the_run_has(
        teacher_file: str, tmp_path: Path, one_class_generator: None) -> None:
    # each resume's end adds a check closer than the interval: "for 250 steps" was said at step 80
    cfg = replace(collapse_cfg(teacher_file, tmp_path / "r", watch_every=10, collapse_patience=2), steps=2)
    run = distill(cfg).run_dir
    for steps in (4, 6, 8):
        resume(run, steps=steps)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    said = [(r["step"], int(r["message"].split(" steps ")[0].rsplit(" ", 1)[1])) for r in records
            if r.get("event") == "collapse"]
    assert said and all(claimed <= step for step, claimed in said), said
    ends = [r["step"] for r in records if r.get("event") == "collapse" and r.get("at_end")]
    text = report(run).text()  # the report said "step 8:", as if mid-run
    assert ends and all(f"step {step} (end of run): dfad: mode collapse" in text for step in ends)


def test_real_images_of_one_class_are_named_as_the_data_not_as_a_synthesis(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # kd on real images of one digit: the teacher sees one class, and the remedy is the data, not a generator
    with np.load(MNIST_TEST) as d:
        threes = d["x"][d["y"] == 3][:64]
    data = tmp_path / "threes.npz"
    np.savez(data, x=threes, y=np.full(len(threes), 3))
    cfg = replace(collapse_cfg(DEMO_TEACHER, tmp_path / "r"), method="kd", steps=12, data=str(data))
    run = distill(cfg).run_dir
    err = capsys.readouterr().err
    assert err.count("mode collapse") == 1
    assert "kd: mode collapse: the batches of --data have covered about 1.0 of 10 classes" in err
    assert "give the run images of every class" in err
    assert "synthesis" not in err and "GAN" not in err and "synthetic" not in err and "--method auto" not in err
    assert "the batches of --data" in report(run).text()


def test_a_student_that_did_not_learn_from_the_users_images_is_sent_to_them() -> None:
    from types import SimpleNamespace

    from dfkd.endcheck import not_learned_message

    method = SimpleNamespace(name="kd", reads="--data", objectives=[], p={"recipe": "cpu", "clip_s": 1.0})
    message = not_learned_message(method, SimpleNamespace(), torch.device("cpu"), 0.1, 10, False, 40)
    assert message.startswith("kd: the student agrees with the teacher on 10.0% of its latest batch of --data")
    assert message.endswith("or images of every class the teacher knows in --data")
    assert "another method" not in message and "--method auto" not in message


def test_a_transfer_file_of_few_classes_is_sent_back_to_synthesize() -> None:
    from types import SimpleNamespace

    from dfkd.methods import get_method
    from dfkd.watch import collapse_message

    method = SimpleNamespace(name="transfer", reads=get_method("transfer").reads, p={"collapse_action": "warn"})
    message = collapse_message(method, {"effective_classes": 2.0, "teacher_confidence": 0.9}, 10, 150)
    assert message.startswith("transfer: mode collapse: the batches of --transfer-data have covered about 2.0 of 10")
    assert "make it again with more iterations per batch or with another method (dfkd synthesize)" in message


def test_a_collapse_that_ends_says_so_after_its_warning(teacher_file: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import dfkd.runwatch as runwatch

    checks = iter([1.0] * 3 + [9.0] * 100)  # effective classes of the checks at steps 2, 4, 6, then healthy

    def scripted(t_logits, s_logits=None):
        return {**batch_stats(t_logits, s_logits), "effective_classes": next(checks)}

    monkeypatch.setattr(runwatch, "batch_stats", scripted)
    run = distill(collapse_cfg(teacher_file, tmp_path / "r", collapse_fraction=0.2)).run_dir
    err = capsys.readouterr().err
    assert "mode collapse" in err and "recovered from the mode collapse warned at step 6" in err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["step"]) for r in records if r.get("event", "").startswith("collapse")]
    assert events == [("collapse", 6), ("collapse_recovered", 12)]  # three healthy checks end the episode
    assert "[recovered by step 12]" in report(run).text()

    # stopped inside the episode and resumed: the recovery still names the step that warned
    checks = iter([1.0] * 4 + [9.0] * 100)
    first = distill(replace(collapse_cfg(teacher_file, tmp_path / "s", collapse_fraction=0.2), steps=8)).run_dir
    resume(first, steps=24)
    events = [(r["event"], r["step"], r.get("since")) for r in map(json.loads, (first / "metrics.jsonl").open())
              if r.get("event", "").startswith("collapse")]
    assert events == [("collapse", 6, None), ("collapse_recovered", 14, 6)]


@pytest.fixture
def balanced_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GAN generator emits real test digits, all ten classes in turn (plus its gradient path)."""
    digits = load_images(MNIST_TEST, "test")
    order = torch.cat([(digits.y == c).nonzero()[:10, 0] for c in range(10)]).view(10, 10).T.flatten()  # 0-9, 0-9..
    balanced = to_model_input(digits.x[order], DEMO_SPEC)
    original = GeneratorSynthesizer.step_on

    def real(self, z, y):
        x, losses = original(self, z, y)
        return x * 0 + balanced[: x.shape[0]].to(x.device), losses

    monkeypatch.setattr(GeneratorSynthesizer, "step_on", real)


def test_a_healthy_run_is_quiet(tmp_path: Path, balanced_generator: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Batches of all ten classes, which the demo teacher reads right (about 8 effective classes in a batch of
    8 on any device): no warning, at the detector's default threshold."""
    run = distill(collapse_cfg(DEMO_TEACHER, tmp_path / "r")).run_dir
    assert "mode collapse" not in capsys.readouterr().err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "collapse" not in (run / "metrics.jsonl").read_text()
    assert min(r["synthetic/effective_classes"] for r in records if "synthetic/effective_classes" in r) > 6


def test_reset_remedy_redraws_the_generator_when_an_episode_starts(teacher_file: str, tmp_path: Path,
                                                                   one_class_generator: None) -> None:
    run = distill(collapse_cfg(teacher_file, tmp_path / "r", collapse_action="reset")).run_dir
    events = [json.loads(x).get("event") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("generator_reset") == 1 and events.index("generator_reset") == events.index("collapse") + 1


def test_balance_term_joins_the_generator_loss(teacher_file: str, tmp_path: Path) -> None:
    run = distill(collapse_cfg(teacher_file, tmp_path / "r", balance=5.0, watch_every=0)).run_dir
    assert any("loss/gen/balance" in x for x in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize(("params", "match"), [({"collapse_action": "retry"}, "use warn or reset"),
                                               ({"collapse_fraction": 0}, "collapse_fraction=0"),
                                               ({"collapse_action": "reset"}, "no GAN generator")])
def test_bad_watch_settings_are_refused(teacher_file: str, tmp_path: Path, params: dict, match: str) -> None:
    cfg = collapse_cfg(teacher_file, tmp_path / "r", **params)
    if params.get("collapse_action") == "reset":
        cfg = DistillConfig(**{**cfg.__dict__, "method": "deepinversion",
                               "params": {"batch_size": 4, "iterations": 2, "collapse_action": "reset"}})
    with pytest.raises(DfkdError, match=match):
        distill(cfg)


# --- at the end of a run (dfkd.endcheck) ------------------------------------------------------------------
@pytest.mark.parametrize(("recent", "in_episode", "warns"), [
    ([True], False, True), ([True, True], False, True), ([False, True, True], False, True),
    ([False, False, False, True, True], False, False), ([True, True, False], False, False),
    ([False, False], False, False),
    ([True, True, True], True, False)])
def test_a_run_ends_collapsed_when_most_of_its_last_checks_were(recent: list[bool], in_episode: bool,
                                                                warns: bool) -> None:
    watch = CollapseWatch(10, patience=5)
    for collapsed in recent:
        watch.update(1.0 if collapsed else 9.0, 64)
    watch.in_episode = in_episode  # an episode in progress has warned already
    assert collapsed_at_end(watch) == warns


@pytest.mark.parametrize(("steps", "watch_every"), [(4, 2), (6, 50)])
def test_a_short_run_that_collapses_warns_at_its_end(teacher_file: str, tmp_path: Path, one_class_generator: None,
                                                     capsys: pytest.CaptureFixture[str], steps: int,
                                                     watch_every: int) -> None:
    # two checks (or only the end's, the run being shorter than one interval): fewer than the patience of 3
    cfg = replace(collapse_cfg(teacher_file, tmp_path / "r", watch_every=watch_every), steps=steps)
    run = distill(cfg).run_dir
    err = capsys.readouterr().err
    assert err.count("mode collapse") == 1 and f"step {steps} (end of run): dfad: mode collapse" in err
    assert "-p balance=" in err
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    collapses = [e for e in events if e.get("event") == "collapse"]
    assert len(collapses) == 1 and collapses[0]["at_end"] and collapses[0]["effective_classes"] == 1.0
    assert "mode collapse" in report(run).text()


def test_a_short_balanced_run_ends_without_a_collapse_warning(teacher_file: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = replace(collapse_cfg(teacher_file, tmp_path / "r", collapse_fraction=0.01), steps=4, device="cpu")
    run = distill(cfg).run_dir
    assert "mode collapse" not in capsys.readouterr().err
    assert "collapse" not in (run / "metrics.jsonl").read_text()


def test_chance_threshold_and_agreement() -> None:
    assert chance_threshold(10) == pytest.approx(0.15) and chance_threshold(2) == pytest.approx(0.6)
    assert chance_threshold(1000) == pytest.approx(0.0015)
    labels = torch.arange(100) % 10
    at_chance = torch.nn.functional.one_hot(torch.zeros(100, dtype=torch.long), 10).float()  # always class 0
    assert top1_agreement(at_chance, labels) == pytest.approx(0.1)
    assert top1_agreement(at_chance, labels) <= chance_threshold(10)
    assert top1_agreement(torch.nn.functional.one_hot(labels, 10).float(), labels) == 1.0
    # synthetic sets are labelled unevenly: a student answering the dominant class everywhere is still at chance
    skewed = torch.cat([torch.zeros(60, dtype=torch.long), torch.arange(40) % 9 + 1])
    assert top1_agreement(at_chance, skewed) == pytest.approx(0.1)  # plain agreement: 60 %, far above 15 %


@pytest.fixture
def student_from_teacher(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The run's student starts as the teacher (learned), or with its classes rolled by one (agrees on none)."""
    import dfkd.engine

    original, how = dfkd.engine.build_method, {"roll": False}

    def build(*args, **kwargs):
        built = original(*args, **kwargs)
        state = {k: v.clone() for k, v in args[1].module.state_dict().items()}
        if how["roll"]:
            last = [k for k in state if k.endswith(".weight")][-1].removesuffix(".weight")
            for k in (f"{last}.weight", f"{last}.bias"):
                state[k] = state[k].roll(1, 0)
        built.method.student.load_state_dict(state)
        return built

    monkeypatch.setattr(dfkd.engine, "build_method", build)
    return how


@pytest.mark.parametrize("heldout", [True, False])
@pytest.mark.parametrize("learned", [True, False])
def test_a_student_at_chance_is_told_it_has_not_learned(teacher_file: str, tmp_path: Path, heldout: bool,
                                                        learned: bool, student_from_teacher: dict[str, bool],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    student_from_teacher["roll"] = not learned
    cfg = replace(collapse_cfg(teacher_file, tmp_path / "r", collapse_fraction=0.01, lr_s=1e-9,
                               select_every=2 if heldout else 0, heldout_chunk=32),
                  steps=4, student="lenet5_bn", student_args=KWARGS)
    run = distill(cfg).run_dir
    err = capsys.readouterr().err
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    warned = [e for e in events if e.get("event") == "not_learned"]
    if learned:
        assert not warned and "has not learned" not in err
        return
    where = "held-out synthetic images" if heldout else "its latest synthetic batch"
    assert err.count("has not learned") == 1
    assert f"warning: step 4: dfad: the student agrees with the teacher on 0.0% of {where}, about chance (10.0%)" \
        in err
    assert "--steps" in err and "--method auto" in err
    assert len(warned) == 1 and warned[0]["heldout"] == heldout and warned[0]["images"] == (64 if heldout else 8)
    assert "has not learned" in report(run).text()



@pytest.fixture(scope="module")
def mnist_slice(tmp_path_factory: pytest.TempPathFactory) -> str:
    """500 MNIST test images: data the demo teacher recognises (and a student at chance does not)."""

    data = np.load(MNIST_TEST)
    path = tmp_path_factory.mktemp("eval") / "mnist500.npz"
    np.savez(path, x=data["x"][:500], y=data["y"][:500])
    return str(path)


@pytest.mark.parametrize("case", ["hidden", "learned", "said_already"])
def test_a_student_at_chance_on_eval_data_is_told_so_when_the_synthetic_images_hid_it(
        tmp_path: Path, case: str, mnist_slice: str, student_from_teacher: dict[str, bool],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # ZSKD's Dirichlet images on a CIFAR-10 WRN-16-1 (81 %): the student agreed with the teacher on them and
    # answered 13.5 % of the test set right, and nothing said so

    student_from_teacher["roll"] = case != "learned"
    agreement = {"hidden": 0.9, "said_already": 0.0}.get(case)  # on synthetic images: over or under the line
    if agreement is not None:
        monkeypatch.setattr(dfkd.runwatch.RunWatch, "_agreement", lambda self, model: (agreement, 64, True))
    cfg = replace(collapse_cfg(DEMO_TEACHER, tmp_path / "r", lr_s=1e-9), steps=4, student="lenet5_bn",
                  student_args=KWARGS, eval_data=mnist_slice)
    run = distill(cfg).run_dir
    err = capsys.readouterr().err
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    warned = [e for e in events if e.get("event") == "not_learned"]
    if case == "learned":
        assert not warned and "has not learned" not in err
        return
    assert err.count("has not learned") == 1 and len(warned) == 1, "one warning, from one of the two checks"
    if case == "said_already":  # the data-free check warned: the eval data's adds nothing
        assert "of --eval-data" not in err and "on" not in warned[0]
        return
    top1, teacher = warned[0]["top1"], warned[0]["teacher_top1"]
    assert top1 <= chance_threshold(10) < 0.9 < teacher and warned[0]["on"] == "eval_data"
    assert (f"warning: step 4: dfad: the student answers {100 * top1:.2f}% of --eval-data {mnist_slice} right, "
            f"about chance (10.0%; the teacher {100 * teacher:.2f}%): it has not learned in 4 steps, though it "
            "agrees with the teacher on 90.0% of the synthetic images") in err
    assert "--method auto" in err
    assert "answers" in report(run).text()


# --- a student whose activations died (dfkd.watch.student_stuck) ------------------------------------------------
def test_a_dead_student_is_stuck_and_a_fresh_one_is_not() -> None:
    teacher, z = pixel_teacher(), torch.randn(64, 4)
    t_logits = teacher(PixelGenerator(False)(z))
    dead = torch.tensor([0.3, -1.0, 2.0] + [0.0] * 7).expand(64, 10)  # the same logits for every image
    stats = batch_stats(t_logits, dead)
    assert stats["student_classes"] == pytest.approx(1.0) and stats["student_spread"] == pytest.approx(0.0)
    assert student_stuck(stats)
    same = PixelGenerator(True)(torch.zeros(64, 4))  # one image 64 times: nobody's logits can change
    assert not student_stuck(batch_stats(teacher(same), dead)), "identical images say nothing of the student"
    torch.manual_seed(0)
    fresh = MODELS.get("lenet5_half")(**KWARGS).eval()
    with torch.no_grad():
        fresh_stats = batch_stats(t_logits, fresh(torch.randn(64, 1, 32, 32)))
    # at initialisation it may give one answer to nearly everything, but its logits move with the image
    assert fresh_stats["student_spread"] > 0.05 and not student_stuck(fresh_stats)


def test_the_stuck_remedy_names_the_objectives_weight_when_one_is_on() -> None:
    from types import SimpleNamespace

    plain = SimpleNamespace(p={"lr_s": 0.05}, objectives=[])
    assert "-p lr_s=0.01; now 0.05" in stuck_remedy(plain) and "--feature-weight" not in stuck_remedy(plain)
    with_at = SimpleNamespace(p={"lr_s": 0.05}, objectives=[SimpleNamespace(name="at", weight=500.0)])
    assert "--feature-weight; now at 500" in stuck_remedy(with_at)
    assert "-p clip_s=1" in stuck_remedy(plain)  # an unclipped student: clipping is the other remedy
    assert "clip_s" not in stuck_remedy(SimpleNamespace(p={"lr_s": 0.05, "clip_s": 1.0}, objectives=[]))


def test_a_pool_methods_collapse_remedy_names_its_iterations_setting() -> None:
    # fast's collapse on a ViT teacher said "more iterations per batch" without the setting's name; -p g_steps=10
    # (twice its 5) was what helped there
    from types import SimpleNamespace

    pool_served = SimpleNamespace(synth=None)
    assert "more iterations per batch (-p g_steps=10)" in remedy(pool_served, {"g_steps": 5})
    assert "(-p iterations=4000)" in remedy(pool_served, {"g_steps": 1, "iterations": 2000})  # DeepInversion's
    assert "(-p di_iters=3000)" in remedy(pool_served, {"g_steps": 1, "di_iters": 1500})  # ZSKD's, not g_steps
    assert "more iterations per batch, or try" in remedy(pool_served, {})


def test_the_collapse_remedy_under_torchrun_leaves_out_the_reset_it_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    # under torchrun the warning advised -p collapse_action=reset, which a resume there refused
    from types import SimpleNamespace

    import dfkd.watch

    gan = SimpleNamespace(synth="a generator")
    monkeypatch.setattr(dfkd.watch, "generator_of", lambda method: method.synth)
    assert "collapse_action=reset" in remedy(gan, {"balance": 0.0, "collapse_action": "warn"})
    assert "collapse_action=reset" in remedy(SimpleNamespace(synth=None), {"g_steps": 5})
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert remedy(gan, {"balance": 0.0, "collapse_action": "warn"}) == "raise the class-balance weight (-p balance=5)"
    assert "collapse_action" not in remedy(SimpleNamespace(synth=None), {"g_steps": 5})


def test_episode_watch_state_round_trips() -> None:
    watch = EpisodeWatch(patience=3)
    for bad in (True, True):
        watch.record(bad)
    again = EpisodeWatch(patience=3)
    again.load_state_dict(watch.state_dict())
    assert again.record(True) and watch.record(True), "the third bad check starts the episode in both"


@pytest.fixture
def dead_student(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """The run's student has every weight zero (the same logits for every image), or starts as the teacher."""
    import dfkd.engine

    original, how = dfkd.engine.build_method, {"dead": True}

    def build(*args, **kwargs):
        built = original(*args, **kwargs)
        with torch.no_grad():
            if how["dead"]:
                for p in built.method.student.parameters():
                    p.zero_()
            else:
                built.method.student.load_state_dict(args[1].module.state_dict())
        return built

    monkeypatch.setattr(dfkd.engine, "build_method", build)
    return how


@pytest.mark.parametrize("dead", [True, False])
def test_a_run_whose_student_died_says_so_once_while_it_runs(teacher_file: str, tmp_path: Path, dead: bool,
                                                              dead_student: dict[str, bool],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    dead_student["dead"] = dead
    cfg = replace(collapse_cfg(teacher_file, tmp_path / "r", collapse_fraction=0.01, lr_s=1e-9),
                  student="lenet5_bn", student_args=KWARGS)
    run = distill(cfg).run_dir
    err = capsys.readouterr().err
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stuck = [e for e in events if e.get("event") == "student_stuck"]
    if not dead:
        assert not stuck and "given one answer" not in err
        return
    assert err.count("given one answer") == 1 and len(stuck) == 1 and stuck[0]["step"] == 6
    assert "warning: step 6: dfad: the student has given one answer to every synthetic image for 6 steps" in err
    assert "-p lr_s=" in err and stuck[0]["student_spread"] == 0.0
    learned = [e for e in events if e.get("event") == "not_learned"]
    assert len(learned) == 1 and "steps; try -p clip_s=1 (the student died during the run" in learned[0]["message"]
    assert "given one answer" in report(run).text()


@pytest.mark.parametrize("objective", [False, True])
def test_the_not_learned_remedy_names_the_objectives_weight_first_when_one_is_on(objective: bool) -> None:
    from types import SimpleNamespace

    from dfkd.endcheck import remedy

    objectives = [SimpleNamespace(name="at", weight=500.0)] if objective else []
    method = SimpleNamespace(name="fast", p={"recipe": "cpu"}, objectives=objectives)
    tips = remedy(method, SimpleNamespace(auto_choice=None), torch.device("cpu"))
    assert tips.startswith("try a smaller --feature-weight") == objective and "--method auto" in tips
    died = remedy(method, SimpleNamespace(auto_choice=None), torch.device("cpu"), died=True)
    assert died.startswith("try -p clip_s=1 (the student died during the run") and "clip_s" not in tips
    clipped = SimpleNamespace(name="fast", p={"recipe": "cpu", "clip_s": 1.0}, objectives=objectives)
    assert "clip_s" not in remedy(clipped, SimpleNamespace(auto_choice=None), torch.device("cpu"), died=True)


def test_the_not_learned_message_of_a_method_on_real_images_blames_no_synthetic_image() -> None:
    # --method kd on --data: "the synthetic images do not carry what the teacher knows of real ones", of real images
    from types import SimpleNamespace

    from dfkd.endcheck import not_learned_on_data_message

    cfg = SimpleNamespace(eval_data="test.npz", auto_choice=None)
    kd = SimpleNamespace(name="kd", p={"recipe": "cpu"}, objectives=[], reads="--data")
    line = not_learned_on_data_message(kd, cfg, torch.device("cpu"), 0.12, 0.81, 10, 0.25, 40)
    assert "agrees with the teacher on 25.0% of the images of --data it was checked on;" in line
    assert "synthetic" not in line
    kd.reads = "--transfer-data"  # a transfer file's images are synthetic: the explanation stands
    assert "(the synthetic images do not carry" in not_learned_on_data_message(
        kd, cfg, torch.device("cpu"), 0.12, 0.81, 10, 0.25, 40)
    dfad = SimpleNamespace(name="dfad", p={"recipe": "cpu"}, objectives=[])
    assert "(the synthetic images do not carry" in not_learned_on_data_message(
        dfad, cfg, torch.device("cpu"), 0.12, 0.81, 10, 0.25, 40)
