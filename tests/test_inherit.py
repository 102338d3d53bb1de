"""Weight inheritance: the student starts as a slice of the teacher where it is the teacher made narrower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfkd.cli.main import main
from dfkd.errors import DfkdError
from dfkd.inherit import inherit, plan
from dfkd.modelfile import ModelFile, save_model
from dfkd.models import create
from dfkd.spec import MNIST_SPEC
from tests.conftest import KWARGS


def _doubled(half: torch.nn.Module, arch: str) -> torch.nn.Module:
    """`arch` at twice `half`'s width computing exactly what `half` computes: every channel twice, and every weight
    from a doubled input channel halved between its two copies."""
    big = create(arch, **KWARGS).eval()
    state = {}
    for name, t in big.state_dict().items():
        h = half.state_dict()[name]
        if t.ndim >= 2 and t.shape[1] == 2 * h.shape[1]:
            h = torch.cat([h / 2, h / 2], 1)
        if t.ndim >= 1 and t.shape[0] == 2 * h.shape[0]:
            h = torch.cat([h, h], 0)
        state[name] = h
    big.load_state_dict(state)
    return big


def _random_bn_stats(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("teacher_arch, half_arch", [("lenet5", "lenet5_half"), ("lenet5_bn", "lenet5_half_bn")])
def test_a_student_sliced_from_a_doubled_teacher_computes_what_the_teacher_computes(teacher_arch, half_arch):
    """The first channels, fan-in rescaled, and BatchNorm folded where the BN-free LeNet-5-half lacks it: exact."""
    torch.manual_seed(0)
    half = create(half_arch, **KWARGS).eval()
    _random_bn_stats(half, 1)
    teacher = _doubled(half, teacher_arch)
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), half(x), atol=1e-5)  # the construction itself
        student = create("lenet5_half", **KWARGS).eval()
        before = student(x)
        line = inherit(student, teacher, "auto", teacher_arch)
        after = student(x)
    assert not torch.allclose(before, teacher(x), atol=1e-2)
    assert torch.allclose(after, teacher(x), atol=1e-4)
    assert "10 tensors from " + teacher_arch in line and "3, 8, 60, 42" in line
    assert ("3 BatchNorm layers folded" in line) == (teacher_arch == "lenet5_bn")
    folded_on_a_copy = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    assert folded_on_a_copy == (3 if teacher_arch == "lenet5_bn" else 0)


def test_a_wider_residual_teacher_gives_its_first_channels():
    torch.manual_seed(0)
    teacher = create("wrn_16_2", **KWARGS).eval()
    student = create("wrn_16_1", **KWARGS)
    got = plan(student, teacher)
    assert set(got.tensors) == {k for k, v in student.state_dict().items() if v.is_floating_point()}
    w_t, w_s = teacher.state_dict()["block3.0.conv2.weight"], got.tensors["block3.0.conv2.weight"]
    assert torch.equal(w_s, w_t[:w_s.shape[0], :w_s.shape[1]] * (w_t.shape[1] / w_s.shape[1]))
    assert torch.equal(got.tensors["classifier.bias"], teacher.state_dict()["classifier.bias"])


def test_a_student_that_does_not_fit_starts_at_random_or_is_refused():
    teacher = create("lenet5", **KWARGS)
    student = create("wrn_16_1", **KWARGS)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    line = inherit(student, teacher, "auto", "lenet5")
    assert line.startswith("student init: random (") and "conv1.weight" in line
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    with pytest.raises(DfkdError, match="--student-init teacher: the student's conv1.weight .*--student-init random"):
        inherit(student, teacher, "teacher", "lenet5")
    assert inherit(student, None, "auto").startswith("student init: random (the run has no single teacher")
    # an ensemble: the advice was a narrower --student, which gave the same error
    with pytest.raises(DfkdError, match="no single teacher network to take weights from .*; use --student-init "
                                        "random, or distil one teacher$"):
        inherit(student, None, "teacher")
    wider = create("lenet5", **KWARGS)
    assert not plan(wider, create("lenet5_half", **KWARGS)).tensors  # a student wider than its teacher: no slice


def test_what_a_slice_cannot_carry_starts_at_random_with_the_reason():
    """BatchNorm inside TorchScript cannot be folded; an attention network's stacked q/k/v rows are no narrower net."""
    scripted = torch.jit.script(create("lenet5_bn", **KWARGS).eval())
    assert "TorchScript module does not allow" in inherit(create("lenet5_half", **KWARGS), scripted, "auto")
    assert "10 tensors from" in inherit(create("lenet5_half", **KWARGS), torch.jit.script(create("lenet5", **KWARGS)),
                                        "auto")  # nothing to fold: a TorchScript teacher is sliced
    timm = pytest.importorskip("timm")
    vit = {"img_size": 32, "patch_size": 8, "in_chans": 1, "num_classes": 10, "depth": 2}
    wide = timm.create_model("vit_tiny_patch16_224", embed_dim=64, num_heads=4, **vit)
    narrow = timm.create_model("vit_tiny_patch16_224", embed_dim=32, num_heads=2, **vit)
    assert "an attention network is not made narrower" in inherit(narrow, wide, "auto")
    shallow = timm.create_model("vit_tiny_patch16_224", embed_dim=64, num_heads=4, **{**vit, "depth": 1})
    assert plan(shallow, wide).left_out > 0 and plan(shallow, wide).tensors  # fewer blocks of the same width: taken


def test_the_teachers_own_architecture_is_copied_only_when_asked():
    """A student as large as the teacher would start as the teacher itself: auto leaves it random."""
    teacher, student = create("wrn_16_1", **KWARGS), create("wrn_16_1", **KWARGS)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert "the student is the teacher's own architecture" in inherit(student, teacher, "auto", "wrn_16_1")
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert "all of its weights" in inherit(student, teacher, "teacher", "wrn_16_1")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())


def _distill(args: list[str]) -> str:
    r = CliRunner().invoke(main, ["distill", "--method", "dfad", "--steps", "2", "-p", "batch_size=8", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_distill_starts_from_the_teacher_by_default_and_records_it(tmp_path: Path):
    torch.manual_seed(0)
    half = create("lenet5_half", **KWARGS).eval()
    teacher = _doubled(half, "lenet5")
    save_model(tmp_path / "t.pt", teacher, ModelFile("lenet5", KWARGS, MNIST_SPEC, 10))
    out = _distill(["--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "a"), "-p", "lr_s=1e-12",
                    "-p", "clip_s=1e-12"])
    assert "student init: 10 tensors from lenet5 (the first 3, 8, 60, 42 output channels" in out
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["student_init"] == "auto"
    report = CliRunner().invoke(main, ["report", str(tmp_path / "a")]).output
    assert "init:     10 tensors from lenet5 (the first 3, 8, 60, 42" in report
    payload = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    state = payload["state_dict"] if "state_dict" in payload else payload
    for name, t in half.state_dict().items():  # barely trained: still the half network the teacher doubles
        assert torch.allclose(state[name].float(), t, atol=1e-4), name
    out = _distill(["--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "b"), "--student-init", "random"])
    assert "student init" not in out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["student_init"] == "random"
    report = CliRunner().invoke(main, ["report", str(tmp_path / "b")]).output
    assert "init:     random (--student-init random)" in report


def test_a_shallower_library_student_takes_the_blocks_it_has():
    """torchvision's ResNet-18 in a ResNet-34: the same names for the blocks it has, the rest left out."""
    torchvision = pytest.importorskip("torchvision")
    teacher, student = torchvision.models.resnet34(num_classes=10), torchvision.models.resnet18(num_classes=10)
    got = plan(student, teacher)
    theirs = teacher.state_dict()
    assert got.tensors and not got.narrowed and got.left_out > 0 and not got.folded
    assert all(torch.equal(t, theirs[name]) for name, t in got.tensors.items())
    assert "layer1.2.conv1.weight" in theirs and "layer1.2.conv1.weight" not in got.tensors
