"""The mode-collapse watch: statistics of a synthetic batch, the detector, the warning and its remedies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dfkd.config import DistillConfig
from dfkd.engine import distill
from dfkd.errors import DfkdError
from dfkd.generators import Generator, GeneratorSynthesizer
from dfkd.report import report
from dfkd.spec import MNIST_SPEC
from dfkd.teacher import Teacher
from dfkd.watch import CollapseWatch, batch_stats, effective_classes, reset_generator


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
def collapse_cfg(teacher_file: str, out: Path, **params) -> DistillConfig:
    return DistillConfig(teachers=(teacher_file,), method="dfad", steps=24, out=str(out), log_every=2,
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


def test_a_healthy_run_is_quiet(teacher_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the lenient threshold makes any batch that is not a single class healthy
    run = distill(collapse_cfg(teacher_file, tmp_path / "r", collapse_fraction=0.01)).run_dir
    assert "mode collapse" not in capsys.readouterr().err
    assert "collapse" not in (run / "metrics.jsonl").read_text()


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
