"""ZSKD: class similarity and Dirichlet concentrations by hand, both betas really used, impressions, learning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.generators import ImagePool
from dfkd.generators.dirichlet import (
    DirichletSynthesizer,
    class_similarity,
    concentration,
    dirichlet_targets,
    impression_loss,
)
from dfkd.methods import get_method
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from dfkd.teacher import Teacher
from tests.conftest import KWARGS, make_teacher_module


def sharp_teacher(seed: int = 0) -> Teacher:
    """A random LeNet-5-BN with larger logits: its predictions vary, so a student has something to learn."""
    module = make_teacher_module(seed=seed)
    with torch.no_grad():
        module.classifier.weight.mul_(30)
    return Teacher(module, MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KWARGS)


def build(seed: int = 0, **over):
    teacher = sharp_teacher()
    cls = get_method("zskd")
    torch.manual_seed(seed)
    params = {**cls.default_params(teacher), **cls.quick, **over}
    return cls(teacher, build_student("lenet5_half", KWARGS), params, torch.device("cpu"))


# --- similarity and concentration, by hand ----------------------------------------------------------------------
def test_class_similarity_hand_made_three_classes() -> None:
    # Class vectors (2, 0), (0, 3), (-1, 0): unit vectors e1, e2, -e1; cosines [[1,0,-1],[0,1,0],[-1,0,1]];
    # min-max over the whole matrix maps -1 -> 0, 0 -> 0.5, 1 -> 1 (the lengths 2, 3, 1 must not matter).
    w = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    expected = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])
    assert torch.allclose(class_similarity(w), expected, atol=1e-6)


def test_concentration_hand_computed() -> None:
    sim = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])
    # Row-wise min-max: row 0 stays [1, .5, 0]; row 1 [.5, 1, .5] becomes [0, 1, 0]; then beta * row + 1e-4.
    assert torch.allclose(concentration(sim, 1.0)[0], torch.tensor([1.0001, 0.5001, 0.0001]))
    assert torch.allclose(concentration(sim, 1.0)[1], torch.tensor([0.0001, 1.0001, 0.0001]))
    assert torch.allclose(concentration(sim, 0.1)[0], torch.tensor([0.1001, 0.0501, 0.0001]))


def test_dirichlet_targets_are_distributions_with_the_right_mean() -> None:
    torch.manual_seed(0)
    sim = class_similarity(torch.randn(10, 84))
    classes = torch.full((4000,), 3)
    y = dirichlet_targets(sim, classes, 1.0)
    assert torch.isfinite(y).all() and (y >= 0).all()
    assert torch.allclose(y.sum(1), torch.ones(4000), atol=1e-5)
    alpha = concentration(sim, 1.0)[3]
    assert torch.allclose(y.mean(0), alpha / alpha.sum(), atol=0.02)  # E[Dir(a)] = a / sum(a)


def test_beta_point_one_is_peakier_than_beta_one() -> None:
    torch.manual_seed(0)
    sim = class_similarity(torch.randn(10, 84))
    classes = torch.arange(2000) % 10
    smooth, peaky = dirichlet_targets(sim, classes, 1.0), dirichlet_targets(sim, classes, 0.1)
    assert torch.allclose(peaky.sum(1), torch.ones(2000), atol=1e-5) and torch.isfinite(peaky).all()

    def entropy(p: torch.Tensor) -> float:
        return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())

    assert peaky.max(1).values.mean() > smooth.max(1).values.mean() + 0.2
    assert entropy(peaky) < entropy(smooth) - 0.5


def test_synthesizer_really_uses_both_betas_half_each() -> None:
    # The public code's quirk re-normalises the 0.1 matrix back to 1; here odd samples must be visibly peakier.
    torch.manual_seed(0)
    teacher = sharp_teacher()
    synth = DirichletSynthesizer(teacher, MNIST_SPEC, class_similarity(teacher.module.classifier.weight),
                                 ImagePool(8), batch_size=8, iterations=1, lr=0.01)
    y = synth.targets(2000)
    smooth, peaky = y[0::2].max(1).values.mean(), y[1::2].max(1).values.mean()
    assert peaky > smooth + 0.2
    classes_smooth = torch.bincount(y[0::2].argmax(1), minlength=10)
    assert (classes_smooth > 0).all(), "every class gets targets"


def test_same_seed_same_targets() -> None:
    sim = class_similarity(torch.randn(10, 16, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(4)
    a = dirichlet_targets(sim, torch.arange(20) % 10, 0.1)
    torch.manual_seed(4)
    assert torch.equal(a, dirichlet_targets(sim, torch.arange(20) % 10, 0.1))


# --- impressions --------------------------------------------------------------------------------------------------
def test_impression_loss_hand_computed() -> None:
    logits, y = torch.tensor([[20.0, 0.0]]), torch.tensor([[0.25, 0.75]])
    p = F.softmax(logits / 20, dim=1)  # softmax([1, 0])
    expected = -(0.25 * p[0, 0].log() + 0.75 * p[0, 1].log())
    assert impression_loss(logits, y, 20.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_input_optimisation_lowers_ce_and_stays_in_range() -> None:
    torch.manual_seed(0)
    teacher = sharp_teacher()
    synth = DirichletSynthesizer(teacher, MNIST_SPEC, class_similarity(teacher.module.classifier.weight),
                                 ImagePool(64), batch_size=16, iterations=25, lr=0.05)
    x, losses = synth.synthesize()
    assert losses["loss/ce"] < losses["loss/ce_start"] - 0.05
    assert torch.allclose(MNIST_SPEC.clip(x), x) and x.shape == (16, 1, 32, 32)
    assert all(p.grad is None for p in teacher.parameters())
    assert len(synth.pool) == 16


# --- the method -----------------------------------------------------------------------------------------------------
def test_defaults_are_the_paper_scaled_for_small_teachers() -> None:
    cls = get_method("zskd")
    paper = cls.default_params()
    assert (paper["di_iters"], paper["lr_di"], paper["di_T"], paper["T"], paper["betas"]) == (1500, 1e-3, 20.0, 20.0,
                                                                                             [1.0, 0.1])
    small = cls.default_params(sharp_teacher())
    assert small["di_iters"] < 1500 and small["T"] == 20.0


def test_round_fills_pool_and_logs_both_phases() -> None:
    method = build()
    logs = method.round()
    logs = method.round()
    assert len(method.pool) == 16 and logs["pool/images"] == 16.0
    assert {"synth/ce", "synth/ce_start", "student/ce"} <= set(logs)


def test_teacher_without_final_linear_is_a_clear_error() -> None:
    teacher = Teacher(make_teacher_module(), MNIST_SPEC, fmt="torchscript", source="t.ts")
    cls = get_method("zskd")
    with pytest.raises(DfkdError, match="final Linear layer"):
        cls(teacher, build_student("lenet5_half", KWARGS), {**cls.default_params(), **cls.quick},
            torch.device("cpu"))


def test_state_round_trip_keeps_the_pool() -> None:
    a = build(seed=1)
    a.round()
    b = build(seed=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert len(a.pool) == len(b.pool) and torch.equal(a.pool.newest(len(a.pool)), b.pool.newest(len(b.pool)))
    torch.manual_seed(7)
    la = a.round()
    torch.manual_seed(7)
    assert la == b.round()


def test_student_steps_see_augmented_views() -> None:
    method = build()
    seen: list[torch.Tensor] = []
    augment = method.augment
    method.augment = lambda x: seen.append(x) or augment(x)
    method.round()
    assert len(seen) == method.p["s_steps"] and seen[0].shape == (8, 1, 32, 32)


def test_student_learns_to_agree_with_the_teacher() -> None:
    # No augmentation here: a random teacher labels nearly every crop/flip of an impression as one class, so its
    # labels of augmented views would teach nothing about the impressions themselves.
    method = build(seed=0, di_batch=32, di_iters=10, lr_di=0.05, s_steps=25, batch_size=32, pool_size=512,
                   lr_s=3e-3, augment="none")
    torch.manual_seed(123)
    held_out, _ = method.synth.optimise(method.synth.targets(128))  # impressions the student never trains on

    def agreement() -> float:
        method.student.eval()
        with torch.no_grad():
            a = (method.student(held_out).argmax(1) == method.teacher(held_out).argmax(1)).float().mean().item()
        method.student.train()
        return a

    before = agreement()
    for _ in range(10):
        method.round()
    after = agreement()
    assert after > before + 0.2 and after > 0.4, (before, after)
