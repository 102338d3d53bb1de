"""Model inversion: the synthesizer (generators/inversion.py) and DeepInversion, ADI and ZeroQ."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from dfkd.generators import InversionSynthesizer, balanced_targets
from dfkd.generators.inversion import warmup_cosine
from dfkd.losses import kl_div
from dfkd.methods import get_method
from dfkd.models import create
from dfkd.spec import MNIST_SPEC, InputSpec
from dfkd.teacher import Teacher

KW = {"num_classes": 10, "in_channels": 1, "input_size": 32}
SMALL = {"batch_size": 16, "synth_batch_size": 16, "iterations": 6, "s_steps": 4}


def make_teacher(arch: str = "lenet5_bn", seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    m = create(arch, **KW)
    m.train()
    with torch.no_grad():  # running statistics of a distribution that inputs can reach
        for _ in range(40):
            m(torch.randn(16, 1, 32, 32) * 0.5 + 0.3)
        m.classifier.weight.mul_(5)  # confident enough that KD has something to teach
    return Teacher(m.eval(), MNIST_SPEC, arch=arch, arch_kwargs=KW)


def make_method(name: str, seed: int = 0, teacher: Teacher | None = None, student: str = "lenet5_half", **params):
    teacher = teacher or make_teacher()
    cls = get_method(name)
    torch.manual_seed(seed)
    p = {**cls.default_params(teacher), **SMALL, **params}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(teacher, create(student, **KW), p, torch.device("cpu"))


def recorder(fn):
    """Wrap an objective so every call's input and losses are kept."""
    calls: list[tuple[torch.Tensor, dict]] = []

    def wrapped(x, y):
        losses = fn(x, y)
        calls.append((x.detach().clone(), {k: float(v.detach()) for k, v in losses.items()}))
        return losses

    return wrapped, calls


def synth(objective, **kw) -> InversionSynthesizer:
    args = {"batch_size": 8, "iterations": 5, "lr": 0.1, "jitter": 0, "flip_p": 0.0, **kw}
    return InversionSynthesizer(MNIST_SPEC, objective, 10, **args)


# --- the synthesizer -----------------------------------------------------------------------------------------
def test_bn_loss_decreases_while_optimising():
    method = make_method("deepinversion", iterations=20, lr_inv=0.25, oh=0.0)
    method.synth.objective, calls = recorder(method.synth.objective)
    method.synthesis_step()
    bn = [c[1]["loss/bn"] for c in calls]
    assert len(bn) == 20
    assert sum(bn[-5:]) / 5 < 0.7 * sum(bn[:5]) / 5, bn


@pytest.mark.parametrize("lowres", [0.0, 0.5])
def test_pixels_stay_in_valid_range(lowres):
    # A strong pull to huge pixel values: only clipping keeps them in range.
    s = synth(lambda x, y: {"loss": -(x * 1e3).sum()}, iterations=6, lr=1.0, lowres=lowres)
    x, _ = s.synthesize()
    assert torch.equal(MNIST_SPEC.clip(x), x)
    assert torch.isclose(x.max(), torch.tensor((1 - 0.1307) / 0.3081))
    free = synth(lambda x, y: {"loss": -(x * 1e3).sum()}, iterations=6, lr=1.0, clip=False)
    assert not torch.equal(MNIST_SPEC.clip(free.synthesize()[0]), free.pool.newest(8))


def test_best_batch_is_kept():
    scores = iter([5.0, 4.0, 1.0, 3.0, 2.0])

    def objective(x, y):
        return {"loss": x.mean() * 0 + next(scores) + 1e-3 * x.sum()}

    s = synth(objective, iterations=5)
    s.objective, calls = recorder(objective)
    x, losses = s.synthesize()
    assert float(losses["loss"]) == pytest.approx(1.0 + 1e-3 * calls[2][0].sum().item())
    assert torch.equal(x, calls[2][0]), "the batch that scored lowest, as it was before its step"
    assert torch.equal(s.pool.newest(8), x.half().float())


@pytest.mark.parametrize("n,k", [(1, 10), (7, 10), (10, 10), (13, 10), (256, 10), (257, 10), (5, 3), (100, 7)])
def test_balanced_targets_any_batch_size(n, k):
    y = balanced_targets(n, k)
    counts = torch.bincount(y, minlength=k)
    assert y.shape == (n,) and counts.sum() == n and int(y.max()) < k
    assert int(counts.max() - counts.min()) <= 1


def test_balanced_targets_spread_the_remainder():
    extra = set()
    for seed in range(20):
        torch.manual_seed(seed)
        extra.add(int(torch.bincount(balanced_targets(11, 10), minlength=10).argmax()))
    assert len(extra) > 3, "which class gets the 11th image is random, not always class 0"


def test_iteration_cap_stop_request_and_time_limit():
    calls = {"n": 0, "stop_at": None}

    def objective(x, y):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            s.request_stop()
        return {"loss": (x ** 2).mean()}

    s = synth(objective, iterations=50)
    s.synthesize(iterations=3)
    assert calls["n"] == 3
    calls.update(n=0, stop_at=4)
    s.synthesize()
    assert calls["n"] == 4, "stops right after the iteration that asked"
    calls.update(n=0, stop_at=None)
    s.synthesize(iterations=6)
    assert calls["n"] == 6, "a stop request does not outlive its batch"
    calls.update(n=0)
    s.time_limit = 0.0
    s.synthesize()
    assert calls["n"] == 1, "a time limit still lets one iteration run: a batch is never pure noise"


def test_low_resolution_stage_sees_2x2_blocks():
    s = synth(lambda x, y: {"loss": (x ** 2).mean()}, iterations=10, lowres=0.4)
    assert s.stages(10) == [(4, True), (6, False)]
    s.objective, calls = recorder(s.objective)
    s.synthesize()
    blocky = [torch.equal(x[..., ::2, ::2], x[..., 1::2, 1::2]) for x, _ in calls]
    assert blocky == [True] * 4 + [False] * 6


def test_warmup_then_cosine():
    assert [warmup_cosine(i, 10, 2) for i in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)


# --- the methods ---------------------------------------------------------------------------------------------
def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["deepinversion", "adi", "zeroq"])
def test_bn_free_teacher_one_warning_and_no_crash(name):
    teacher = make_teacher("lenet5")
    cls = get_method(name)
    p = {**cls.default_params(teacher), **SMALL}
    with pytest.warns(UserWarning) as caught:
        method = cls(teacher, create("lenet5_half", **KW), p, torch.device("cpu"))
        logs = method.round()
        method.round()
    bn_warnings = [w for w in caught if "BatchNorm" in str(w.message)]
    assert len(bn_warnings) == 1 and name in str(bn_warnings[0].message)
    assert logs["synth/bn"] > 0.0, "the BN term falls back to the input's normalisation statistics"
    assert all(math.isfinite(v) for v in logs.values())
    method.close()


def test_adi_competition_flows_through_the_live_student_into_the_inputs():
    method = make_method("adi", student="lenet5_bn", oh=0.0, bn=0.0, tv_l2=0.0, adi=1.0)
    method.student.train()
    x = torch.randn(8, 1, 32, 32, requires_grad=True)
    y = balanced_targets(8, 10)
    losses = method._objective(x, y)
    assert float(losses["loss"].detach()) == pytest.approx(float(losses["loss/adi"].detach()))
    losses["loss"].backward()
    grad = x.grad.clone()
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in method.student.parameters()), "synthesis never trains the student"
    assert all(p.requires_grad for p in method.student.parameters()), "the student is still trainable afterwards"
    with torch.no_grad():  # change the student: the competition must follow it (no frozen stand-in)
        for p in method.student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x.grad = None
    method._objective(x, y)["loss"].backward()
    assert not torch.allclose(x.grad, grad)


def test_synthesis_leaves_student_and_teacher_untouched():
    method = make_method("adi", student="lenet5_bn")  # a BN student: its running statistics must not move either
    student, teacher = snapshot(method.student), snapshot(method.teacher)
    method.synthesis_step()
    assert all(torch.equal(v, method.student.state_dict()[k]) for k, v in student.items())
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher.items())
    assert method.student.training and all(p.grad is None for p in method.teacher.parameters())
    assert "synth/adi" in method.round()


def test_pool_grows_one_batch_a_round_and_holds_teacher_logits():
    method = make_method("deepinversion")
    for r in range(1, 4):
        logs = method.round()
        assert logs["pool/images"] == 16 * r and method.synth.batches == r
    x, t_logits = method.pool.sample(16)
    with torch.no_grad():
        # the logits of exactly the stored images, themselves stored in the pool's float16
        assert torch.allclose(method.teacher(x), t_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["deepinversion", "adi", "zeroq"])
def test_student_learns_from_the_pool(name):
    teacher = make_teacher()
    held_out = make_method(name, seed=99, teacher=teacher).synth.synthesize()[0]
    method = make_method(name, seed=0, teacher=teacher, lr_s=0.05, s_steps=10)

    def gap() -> float:
        with torch.no_grad():
            return float(kl_div(method.student(held_out), teacher(held_out)))

    before = gap()
    for _ in range(5):
        method.round()
    assert gap() < 0.7 * before, (before, gap())


def test_state_round_trip_through_weights_only_checkpoint():
    a = make_method("adi", seed=1)
    a.round()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_method("adi", seed=2)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert len(b.pool) == len(a.pool) and b.synth.batches == 1
    torch.manual_seed(5)
    la = a.round()
    torch.manual_seed(5)
    lb = b.round()
    assert la == lb and torch.equal(a.last_images, b.last_images)


class _SpecOnly:
    """A teacher as recipes see it: a spec, (no) parameters and a forward pass of no multiply-adds: a cheap one."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def parameters(self) -> list:
        return []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def test_defaults_scale_with_the_teacher():
    di, zq = get_method("deepinversion"), get_method("zeroq")
    paper = di.default_params()
    assert (paper["batch_size"], paper["iterations"], paper["T"], paper["s_steps"]) == (256, 2000, 3.0, 50)
    cifar = di.default_params(_SpecOnly(InputSpec(3, 32, (0.5,), (0.25,))))
    assert (cifar["batch_size"], cifar["iterations"], cifar["lowres"]) == (256, 2000, 0.0)
    mnist = di.default_params(_SpecOnly(MNIST_SPEC))
    assert mnist["iterations"] < 500 and mnist["batch_size"] <= 256
    # The LeNet priors that make the demo teacher's inversions digit-like (CPU recipe); CIFAR keeps the paper's.
    assert (mnist["first_bn"], mnist["tv_l2"], mnist["jitter"], mnist["lowres"]) == (1.0, 3e-2, 4, 0.5)
    assert mnist["recipe"] == "cpu" and cifar["recipe"] == "paper"
    assert (cifar["first_bn"], cifar["tv_l2"], cifar["jitter"], cifar["inv_schedule"]) == (1.0, 2.5e-5, 2, "constant")
    assert get_method("adi").default_params(_SpecOnly(MNIST_SPEC))["tv_l2"] == 3e-2
    imagenet = di.default_params(_SpecOnly(InputSpec(3, 224, (0.5,), (0.25,))))
    assert imagenet["lowres"] == pytest.approx(2 / 3) and imagenet["jitter"] == 30 and imagenet["flip_p"] == 0.5
    assert get_method("adi").default_params()["adi"] == 0.2
    assert zq.default_params()["lr_inv"] == 0.5 and zq.default_params(_SpecOnly(MNIST_SPEC))["iterations"] < 500


def test_zeroq_is_label_free_unless_a_class_weight_is_given():
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    plain = make_method("zeroq")
    free = plain.inversion_loss(x, y)
    assert "loss/oh" not in free
    assert torch.allclose(free["loss"], free["loss/bn"] + free["loss/input"])
    with_oh = make_method("zeroq", oh=2.0).inversion_loss(x, y)
    ce = torch.nn.functional.cross_entropy(plain.teacher(x), y)
    assert torch.allclose(with_oh["loss/oh"], ce, atol=1e-5)
    assert torch.allclose(with_oh["loss"], free["loss"] + 2.0 * ce, atol=1e-4)


def test_first_bn_multiplier_weights_the_first_layer_only():
    teacher = make_teacher()
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 10
    bn = [make_method("deepinversion", teacher=teacher, first_bn=w)._objective(x, y)["loss/bn"].item()
          for w in (0.0, 1.0, 10.0)]
    first = bn[1] - bn[0]  # the first BN layer's term: the others are in all three
    assert first > 0 and bn[0] > 0
    assert bn[2] == pytest.approx(bn[0] + 10 * first, rel=1e-5), "first_bn multiplies the first BN layer's term"
