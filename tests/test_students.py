"""The default student for any teacher, ImageNet-form zoo students, library students."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dfkd import DfkdError, InputSpec, ModelFile, load_model, save_model
from dfkd.config import DistillConfig
from dfkd.engine import distill
from dfkd.models import create
from dfkd.students import build_student, default_student, student_arch, student_line
from dfkd.teacher import Teacher

SPEC = {size: InputSpec(3, size, (0.5,), (0.25,)) for size in (32, 64)}


def _teacher(module, arch, size=32, channels=3):
    return Teacher(module.eval(), InputSpec(channels, size, (0.5,), (0.25,)), fmt="state_dict", arch=arch)


@pytest.mark.parametrize("size", [32, 64])
def test_library_resnets_get_the_library_resnet18(size):
    t = _teacher(torchvision.models.resnet34(weights=None, num_classes=10), "torchvision:resnet34", size)
    name, kw = student_arch(t, None)
    assert (name, kw) == ("torchvision:resnet18", {"num_classes": 10})
    assert build_student(name, kw)(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_timm_resnet_gets_timm_resnet18():
    timm = pytest.importorskip("timm")
    t = _teacher(timm.create_model("resnet34", pretrained=False, num_classes=5), "timm:resnet34")
    assert student_arch(t, None) == ("timm:resnet18", {"num_classes": 5})


@pytest.mark.parametrize("arch", ["torchvision:resnet18", "resnet18"])
def test_a_resnet18_teacher_gets_a_smaller_student(arch):
    module = torchvision.models.resnet18(weights=None, num_classes=10) if ":" in arch else create("resnet18")
    t = _teacher(module, arch, 64)
    name, kw = student_arch(t, None)
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (t, build_student(name, kw)))
    assert ":" not in name and name != "resnet18" and n_s <= 0.25 * n_t and kw["imagenet_stem"]
    line = student_line(t, None, name, build_student(name, kw))
    assert "the largest zoo student with at most 25% of the teacher's parameters" in line


def test_zoo_pairs_are_kept():
    t = _teacher(create("wrn_40_2", num_classes=10), "wrn_40_2")
    assert student_arch(t, None) == ("wrn_16_1", {"num_classes": 10, "in_channels": 3, "input_size": 32})


@pytest.mark.parametrize("size", [32, 64])
def test_unknown_teacher_gets_a_zoo_student_sized_from_it(size):
    t = _teacher(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), "torchvision:mobilenet_v3_small",
                 size)
    name, kw = student_arch(t, None)
    student = build_student(name, kw)
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (t, student))
    assert ":" not in name and n_s <= 0.25 * n_t  # the largest zoo student within a quarter of the teacher
    assert kw.get("imagenet_stem", False) == (size >= 64)
    tiny = Teacher(create("lenet5", num_classes=10, in_channels=3).eval(), SPEC[32], fmt="pickle")
    assert default_student(tiny) == "lenet5_half"  # nothing is a quarter of 62K parameters: the smallest


def _grey_teacher(net):
    return Teacher(net.eval(), InputSpec(1, 28, (0.5,), (0.25,)), fmt="state_dict", arch="mymod:Net")


def _mlp(*hidden):
    dims, layers = (784, *hidden), [torch.nn.Flatten()]
    for a, b in zip(dims, dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(dims[-1], 10))


@pytest.mark.parametrize(("width", "expected"), [(64, "lenet5_half"), (84, "lenet5_3q"), (112, "lenet5")])
def test_small_grey_teachers_climb_the_lenet_ladder(width, expected):
    # Two 5x5 convolutions of `width` channels and a linear head: 135K, 220K (a Fashion-MNIST CNN's size) and
    # 372K parameters, 21M-64M multiply-adds an image.
    net = torch.nn.Sequential(torch.nn.Conv2d(1, width, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(width, width, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(width * 49, 10))
    name, kw = student_arch(_grey_teacher(net), None)
    assert name == expected
    student = build_student(name, kw)
    assert sum(p.numel() for p in student.parameters()) <= 0.25 * sum(p.numel() for p in net.parameters())
    assert student(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_student_costs_no_more_than_its_teacher():
    # A 784-512-256 MLP: 536K parameters but 0.54M multiply-adds an image. A quarter of its parameters would admit
    # the MobileNetV2 (113K parameters, 13.5M multiply-adds at 28 px: 33 times fewer steps than a LeNet-5 in the
    # same CPU time, 61.6 % on MNIST against 97.6); the LeNet-5 (0.42M) is the largest that costs no more.
    t = _grey_teacher(_mlp(512, 256))
    name, kw = student_arch(t, None)
    assert name == "lenet5"
    assert "at most 25% of the teacher's parameters and no more multiply-adds an image" in \
        student_line(t, None, name, build_student(name, kw))
    cheap = _grey_teacher(_mlp(150))  # 119K parameters, 0.12M multiply-adds: below every zoo student's cost
    name, kw = student_arch(cheap, None)
    assert name == "lenet5_half" and "the smallest zoo student: none has" in \
        student_line(cheap, None, name, build_student(name, kw))


def test_the_run_says_which_student_and_why():
    pair = _teacher(create("lenet5", num_classes=10, in_channels=1), "lenet5", channels=1)
    half = build_student(*student_arch(pair, None))
    assert student_line(pair, None, "lenet5_half", half) == (
        "student network: lenet5_half (15,738 parameters, 25.5 % of the teacher's 61,706; the zoo pair for a lenet5 "
        "teacher; --student ARCH for another)")
    assert student_line(pair, "lenet5", "lenet5", build_student(*student_arch(pair, "lenet5"))).endswith(
        "(61,706 parameters, 100.0 % of the teacher's 61,706; --student)")
    big = _teacher(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10),
                   "torchvision:mobilenet_v3_small")
    name, kw = student_arch(big, None)
    assert "the largest zoo student with at most 25% of the teacher's parameters" in \
        student_line(big, None, name, build_student(name, kw))
    tiny = Teacher(create("lenet5", num_classes=10, in_channels=3).eval(), SPEC[32], fmt="pickle")
    assert "the smallest zoo student: none has at most 25%" in student_line(
        tiny, None, "lenet5_half", build_student(*student_arch(tiny, None)))


def test_zoo_students_take_the_imagenet_form_from_64_px():
    t = _teacher(create("resnet34", num_classes=10, input_size=64), "resnet34", 64)
    name, kw = student_arch(t, None)
    assert (name, kw["imagenet_stem"]) == ("resnet18", True)
    imagenet, cifar = build_student(name, kw), create("resnet18", num_classes=10, input_size=64)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert cifar.conv1.kernel_size == (3, 3)
    # The stem and max-pool cut the spatial size 4x before layer1: layer4 sees 2x2 instead of 8x8 at 64 px.
    feats = {}
    imagenet.layer4.register_forward_hook(lambda m, i, o: feats.update(i=o.shape[-1]))
    cifar.layer4.register_forward_hook(lambda m, i, o: feats.update(c=o.shape[-1]))
    imagenet(torch.randn(1, 3, 64, 64))
    cifar(torch.randn(1, 3, 64, 64))
    assert feats == {"i": 2, "c": 8}
    assert imagenet.state_dict().keys() == cifar.state_dict().keys()


@pytest.mark.parametrize("arch", ["resnet18", "wrn_16_1", "mobilenet_v2_tiny"])
def test_model_files_without_the_switch_still_load_in_cifar_form(tmp_path, arch):
    kwargs = {"num_classes": 10, "in_channels": 3, "input_size": 64}  # what an older dfkd wrote
    model = create(arch, **kwargs).eval()
    save_model(tmp_path / "m.pt", model, ModelFile(arch, kwargs, SPEC[64], 10))
    loaded, _ = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_requested_library_student_and_its_arguments():
    t = _teacher(create("lenet5", num_classes=10, in_channels=3), "lenet5")
    assert student_arch(t, "torchvision:resnet18", {"zero_init_residual": True}) == \
        ("torchvision:resnet18", {"num_classes": 10, "zero_init_residual": True})
    grey = _teacher(create("lenet5", num_classes=10, in_channels=1), "lenet5", channels=1)
    with pytest.raises(DfkdError, match="torchvision models take 3-channel images"):
        student_arch(grey, "torchvision:resnet18")
    with pytest.raises(DfkdError, match="--student mymod:Net: use a zoo name"):
        student_arch(t, "mymod:Net")


def test_a_student_argument_the_zoo_model_does_not_take_is_one_line_naming_the_student_flag():
    with pytest.raises(DfkdError, match=r"--student lenet5: could not build it .*bogus.*--student-arg KEY=VALUE"):
        build_student("lenet5", {"num_classes": 10, "in_channels": 1, "input_size": 32, "bogus": 1})


@pytest.mark.parametrize("student, args, says", [
    ("lenet5_half", {"num_classes": 7}, "gives shape (2, 7) for 2 inputs, where the teacher's 10 classes need (2, 10)"),
    ("torchvision:vit_b_16", {}, "does not run on the teacher's 3x32x32 inputs (Wrong image height!"),
])
def test_a_student_that_does_not_fit_the_teacher_is_refused_before_a_run(tmp_path, student, args, says):
    # both failed at the first training step with a traceback and left a run folder that looked resumable

    teacher = tmp_path / "t.pt"
    save_model(teacher, create("lenet5_bn", num_classes=10, in_channels=3, input_size=32),
               ModelFile("lenet5_bn", {"num_classes": 10, "in_channels": 3, "input_size": 32}, SPEC[32], 10))
    cfg = DistillConfig(teachers=(str(teacher),), method="dfad", steps=3, out=str(tmp_path / "run"), fid_every=0,
                        student=student, student_args=args, params={"batch_size": 8})
    with pytest.raises(DfkdError, match=f"^--student {student}: ") as e:
        distill(cfg)
    assert says in str(e.value) and not (tmp_path / "run").exists()


def test_a_teacher_no_zoo_student_fits_is_told_to_give_one() -> None:
    # an 8-px teacher: "model 'lenet5_half' needs inputs of at least 16x16 pixels", of a student the user never chose
    tiny = Teacher(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval(),
                   InputSpec(3, 8, (0.5,), (0.25,)))
    with pytest.raises(DfkdError, match=r"no default student takes the teacher's 3x8x8 inputs .*; give --student"):
        student_arch(tiny, None)
