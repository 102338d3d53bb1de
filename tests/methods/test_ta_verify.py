"""TA-DFKD teacher verification (`-p ta_verify=true` of the GAN methods): the clean split, the refill, learning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfkd.cli.main import main
from dfkd.methods import get_method
from dfkd.methods._verify import MIN_KEEP, clean_mask, clean_probability, verification_loss, verified_batch
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from dfkd.teacher import Teacher
from dfkd.watch import generator_of
from tests.conftest import KWARGS, make_teacher_module

GAN_METHODS = ("dafl", "dfad", "dfq", "online", "zskt")


def hand_built(n_clean: int = 10, n_noisy: int = 6) -> torch.Tensor:
    """Logits the teacher is sure of (one class at +8) followed by ones it is not (three classes near a tie)."""
    sure = torch.zeros(n_clean, 10)
    sure[torch.arange(n_clean), torch.arange(n_clean) % 10] = 8.0
    unsure = torch.zeros(n_noisy, 10)
    unsure[:, :3] = torch.linspace(0.0, 0.3, n_noisy)[:, None] * torch.tensor([1.0, 0.5, 0.0])
    return torch.cat([sure, unsure])


def test_the_loss_is_the_teachers_cross_entropy_on_its_own_answer() -> None:
    t = hand_built()
    assert torch.allclose(verification_loss(t), -t.softmax(1).max(1).values.log(), atol=1e-6)


def test_confident_samples_are_clean_and_ambiguous_ones_are_dropped() -> None:
    mask = clean_mask(hand_built(), 0.5)
    assert mask.tolist() == [True] * 10 + [False] * 6
    shuffled = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clean_mask(hand_built()[shuffled], 0.5), mask[shuffled])  # per sample, not by position


def test_the_mixture_posterior_splits_two_clusters_and_the_threshold_applies_to_it() -> None:
    loss = torch.tensor([0.0, 0.02, 0.05, 0.04, 0.9, 1.0, 0.95, 0.97])
    p = clean_probability(loss)
    assert (p[:4] > 0.99).all() and (p[4:] < 0.01).all()
    middle = torch.tensor([0.0, 0.1, 0.45, 0.55, 0.9, 1.0])
    q = clean_probability(middle)
    assert q[0] > q[2] > q[3] > q[5]  # monotone in the loss
    assert clean_probability(torch.full((5,), 0.3)).tolist() == [1.0] * 5  # nothing to split: all clean


def test_at_least_min_keep_most_confident_samples_survive() -> None:
    t = hand_built()
    mask = clean_mask(t, 1.0)  # no posterior exceeds 1: only the floor is kept
    assert int(mask.sum()) == MIN_KEEP
    assert mask[verification_loss(t).argsort()[:MIN_KEEP]].all()


def test_the_student_batch_is_refilled_until_full() -> None:
    batches = [hand_built(4, 4), hand_built(4, 4), hand_built(4, 4)]
    drawn = []

    def draw(n: int) -> torch.Tensor:
        drawn.append(n)
        return batches[len(drawn) - 1]

    x, clean = verified_batch(draw, lambda t: t, 8, 0.5, max_draws=16)
    assert len(drawn) == 2 and x.shape == (8, 10) and clean == 0.5
    assert (x.max(1).values == 8.0).all()  # only the confident rows
    x, clean = verified_batch(lambda n: hand_built(1, 7), lambda t: t, 8, 0.5, max_draws=3)
    assert len(x) == 3 * MIN_KEEP  # the draw cap ends the refill with what was found


def sharp_teacher() -> Teacher:
    module = make_teacher_module()
    with torch.no_grad():  # a random teacher is nearly uniform; larger logits give it confident and unsure answers
        module.classifier.weight.mul_(20)
    return Teacher(module, MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KWARGS)


def build(name: str, **over):  # noqa: ANN201 - a GAN Method
    teacher = sharp_teacher()
    torch.manual_seed(0)
    cls = get_method(name)
    params = {**cls.default_params(teacher), **cls.quick, "ta_verify": True, **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(teacher, build_student("lenet5_half", KWARGS), params, torch.device("cpu"))


@pytest.mark.parametrize("name", GAN_METHODS)
def test_every_gan_method_takes_it_off_by_default_and_trains_on_clean_samples(name: str) -> None:
    assert get_method(name).default_params(None)["ta_verify"] is False
    m = build(name, batch_size=16)
    assert generator_of(m) is not None
    seen: list[torch.Tensor] = []
    forward = m.student_forward  # every student update's forward, whoever runs the loop
    m.student_forward = lambda x: seen.append(x) or forward(x)
    logs = m.round()
    assert seen and all(MIN_KEEP <= len(x) <= 16 for x in seen)
    assert 0 < float(logs["student/ta_clean"]) < 1
    assert m.ta_mask.dtype == torch.bool and m.ta_mask.any()  # the generator's loss saw its batch's split too

    def confidence(x: torch.Tensor) -> float:
        with torch.no_grad():
            return m.teacher(x).softmax(1).max(1).values.mean().item()

    raw = m.synth.sample(256)  # the teacher is surer of what the student saw than of the generator's raw output
    assert min(confidence(x) for x in seen) > confidence(raw), name
    m.close()


def test_dfad_with_verification_learns_on_a_tiny_teacher() -> None:
    m = build("dfad", batch_size=32, s_steps=2, lr_s=3e-3)
    torch.manual_seed(5)
    held_out = m.synth.sample(256)

    def agreement() -> float:
        m.student.eval()
        with torch.no_grad():
            a = (m.student(held_out).argmax(1) == m.teacher(held_out).argmax(1)).float().mean().item()
        m.student.train()
        return a

    before = agreement()
    for _ in range(4):
        m.round()
    after = agreement()
    m.close()
    assert after > before + 0.2 and after > 0.5, (before, after)


def test_the_option_is_documented_and_listed(teacher_file: str, tmp_path: Path) -> None:
    for name in GAN_METHODS:
        out = CliRunner().invoke(main, ["methods", "--params", name]).output
        assert "ta_verify" in out and "TA-DFKD" in out, name
    res = CliRunner().invoke(main, ["distill", "--teacher", teacher_file, "--method", "dfq", "--steps", "2",
                                    "-p", "batch_size=8", "-p", "s_steps=2", "-p", "ta_verify=true", "--device", "cpu",
                                    "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["params"]["ta_verify"] is True
    bad = CliRunner().invoke(main, ["distill", "--teacher", teacher_file, "--method", "dfq", "-p", "ta_threshold=2"])
    assert bad.exit_code == 2 and "ta_threshold" in bad.output
