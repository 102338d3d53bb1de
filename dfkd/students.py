"""Choosing and building the student.

The default student for a teacher (`student_arch(teacher, None)`), in this order:

1. A zoo teacher gets the pair of the data-free literature (`DEFAULT_STUDENT`: LeNet-5 -> LeNet-5-half,
   ResNet-34 -> ResNet-18, VGG-11 -> ResNet-18, WRN-40-2 -> WRN-16-1, ...).
2. A torchvision or timm ResNet-family teacher larger than ResNet-18 (ResNet-34/50/101/152, ResNeXt, Wide
   ResNet, timm's variants: at least `RESNET_TEACHER_PARAMS` parameters) gets ResNet-18 of the same library
   (`torchvision:resnet18` / `timm:resnet18`), with the teacher's classes.
3. Any other teacher (other library models, your own `module:callable`, TorchScript, torch.export, pickles,
   ResNet-18 and smaller ResNets, which a ResNet-18 student would not compress) gets the largest zoo student in
   `SIZED_STUDENTS` with at most `STUDENT_SHARE` of the teacher's parameters and at most its multiply-adds an image
   (the smallest one when none is that small); LeNets only below 64 px. The LeNet rungs are
   LeNet-5-half (~16K parameters), LeNet-5 at three-quarter width (`lenet5_3q`, ~35K) and LeNet-5 (~62K): without
   the middle one a 207K-parameter Fashion-MNIST CNN got the half, 7.6 % of its size, where the three-quarter
   LeNet reached 84.06 % top-1 against the half's 81.49 (fast, 5 CPU-minutes; teacher 90.49 %).

Zoo students are built at the teacher's channels and input size, in the ImageNet form (7x7 stride-2 stem and
max-pool, `imagenet_stem=True`) for inputs of `IMAGENET_SIZE` px and more and the CIFAR form below. `--student`
takes a zoo name, `torchvision:NAME` or `timm:NAME` (with `--student-arg KEY=VALUE` for constructor arguments);
the student's model file records it, so `dfkd evaluate` rebuilds it with no flags.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn

from dfkd.archs import arch_kind, build_model
from dfkd.cost import count_macs, multiply_adds
from dfkd.errors import DfkdError, first_line
from dfkd.models import MODELS
from dfkd.teacher import Teacher, teacher_size

#: The pairs of the data-free literature.
DEFAULT_STUDENT = {
    "lenet5": "lenet5_half",
    "lenet5_bn": "lenet5_half",
    "lenet5_half": "lenet5_half",
    "lenet5_half_bn": "lenet5_half",
    "lenet5_3q": "lenet5_half",
    "resnet34": "resnet18",
    "vgg11_bn": "resnet18",
    "wrn_40_2": "wrn_16_1",
    "wrn_40_1": "wrn_16_1",
    "wrn_16_2": "wrn_16_1",
    "wrn_16_1": "wrn_16_1",
    "mobilenet_v2_tiny": "mobilenet_v2_tiny",
}

#: Zoo students are built in the ImageNet form (strided stem + max-pool) from this input size on.
IMAGENET_SIZE = 64
#: ResNet-family library teachers at least this large get the library's ResNet-18 (11.2M parameters at 10 classes,
#: 11.7M at 1000; ResNet-34 21.3M): a ResNet-18 teacher itself gets a zoo student sized from it instead.
RESNET_TEACHER_PARAMS = 16_000_000
#: Share of an unknown teacher's parameters its default zoo student may have.
STUDENT_SHARE = 0.25
#: Zoo students for teachers without a known pair (ranked by their parameter count at the teacher's spec).
SIZED_STUDENTS = ("lenet5_half", "lenet5_3q", "lenet5", "mobilenet_v2_tiny", "wrn_16_1", "wrn_16_2", "wrn_40_2",
                  "resnet18")
_RESNET_FAMILY = re.compile(r"^(se)?(resnet|resnext|wide_resnet)\d")


def student_arch(teacher: Teacher, requested: str | None,
                 student_args: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The student architecture name and its constructor arguments (classes, channels and size follow the teacher).

    Args:
        teacher: the loaded teacher.
        requested: `--student`: a zoo name, `torchvision:NAME` or `timm:NAME`; None for the default (module doc).
        student_args: `--student-arg` constructor arguments, added to (and overriding) the derived ones.
    """
    name = requested if requested is not None else default_student(teacher)
    kind = arch_kind(name)
    if kind == "module":
        raise DfkdError(f"--student {name}: use a zoo name ({', '.join(MODELS.names())}), torchvision:NAME or "
                        "timm:NAME")
    if kind == "zoo":
        MODELS.get(name)
        return name, {**zoo_kwargs(name, teacher), **(student_args or {})}
    return name, {**library_kwargs(name, teacher), **(student_args or {})}


def default_student(teacher: Teacher) -> str:
    """The documented default (module docstring) for `teacher`."""
    arch = teacher.arch or ""
    if arch in DEFAULT_STUDENT:
        return DEFAULT_STUDENT[arch]
    kind, _, lib_name = arch.partition(":")
    if kind in ("torchvision", "timm") and _RESNET_FAMILY.match(lib_name) and \
            teacher_size(teacher) >= RESNET_TEACHER_PARAMS:
        return f"{kind}:resnet18"
    return sized_student(teacher)


def sized_student(teacher: Teacher) -> str:
    """The largest of SIZED_STUDENTS within STUDENT_SHARE of the teacher's parameters and no costlier than it.

    No costlier: at most the teacher's multiply-adds an image, where they can be counted. Parameters alone gave a
    784-512-256 MLP teacher (536K parameters, 0.54M multiply-adds) the MobileNetV2 (113K parameters, 13.5M
    multiply-adds at 28 px): a student 25 times slower than its teacher, which made 33 times fewer steps than a
    LeNet-5 (0.42M) in 5 CPU-minutes of fast and reached 61.57 % on MNIST (teacher 98.45) against the LeNet-5's
    97.64, 55.27 against 82.98 on Fashion-MNIST (teacher 86.49). Else the smallest.
    """
    names = [n for n in SIZED_STUDENTS if not (n.startswith("lenet") and teacher.spec.side >= IMAGENET_SIZE)]
    built = {n: m for n in names if (m := _built_or_none(n, teacher)) is not None}
    if not built:
        raise DfkdError(f"no default student takes the teacher's {teacher.spec.describe()} inputs (each zoo student "
                        "needs 16 px or more); give --student one that does (dfkd models, torchvision:NAME, timm:NAME)")
    sized = sorted((teacher_size(m), n) for n, m in built.items())
    fitting = [n for _, n in sized if _fits(built[n], teacher)]
    return fitting[-1] if fitting else sized[0][1]


def _built_or_none(name: str, teacher: Teacher) -> nn.Module | None:
    """Zoo student `name` for the teacher's inputs, or None where it cannot take them (a LeNet under 16 px)."""
    try:
        return build_student(name, zoo_kwargs(name, teacher))
    except DfkdError:
        return None


def _fits(student: nn.Module, teacher: Teacher) -> bool:
    """Whether `student` has at most STUDENT_SHARE of the teacher's parameters and its multiply-adds an image."""
    if teacher_size(student) > STUDENT_SHARE * teacher_size(teacher):
        return False
    cost = multiply_adds(teacher)  # None: the teacher's cannot be counted (a scripted one)
    return cost is None or (count_macs(student, teacher.spec) or 0) <= cost


def student_line(teacher: Teacher, requested: str | None, name: str, student: nn.Module) -> str:
    """What a run prints at start about its student: which one, its size beside the teacher's, and why."""
    n_s, n_t = teacher_size(student), teacher_size(teacher)
    size = f"{n_s:,} parameters" + (f", {100 * n_s / n_t:.1f} % of the teacher's {n_t:,}" if n_t else "")
    if requested is not None:
        return f"student network: {name} ({size}; --student)"
    if (teacher.arch or "") in DEFAULT_STUDENT:
        why = f"the zoo pair for a {teacher.arch} teacher"
    elif arch_kind(name) != "zoo":
        why = "the library's ResNet-18 for a ResNet-family teacher"
    elif _fits(build_student(name, zoo_kwargs(name, teacher)), teacher):  # fresh: `student` may hold QAT observers
        why = (f"the largest zoo student with at most {STUDENT_SHARE:.0%} of the teacher's parameters and no more "
               "multiply-adds an image")
    else:
        why = (f"the smallest zoo student: none has at most {STUDENT_SHARE:.0%} of the teacher's parameters and no "
               "more multiply-adds an image")
    return f"student network: {name} ({size}; {why}; --student ARCH for another)"


def zoo_kwargs(name: str, teacher: Teacher) -> dict[str, Any]:
    """A zoo model's arguments at the teacher's classes, channels and size (ImageNet form from IMAGENET_SIZE)."""
    kwargs: dict[str, Any] = {"num_classes": teacher.num_classes, "in_channels": teacher.spec.channels,
                              "input_size": teacher.spec.side}
    if teacher.spec.side >= IMAGENET_SIZE and "imagenet_stem" in inspect.signature(MODELS.get(name)).parameters:
        kwargs["imagenet_stem"] = True
    return kwargs


def library_kwargs(name: str, teacher: Teacher) -> dict[str, Any]:
    """A torchvision/timm model's arguments for the teacher's classes and channels."""
    channels = teacher.spec.channels
    if channels == 3:
        return {"num_classes": teacher.num_classes}
    if arch_kind(name) == "timm":
        return {"num_classes": teacher.num_classes, "in_chans": channels}
    raise DfkdError(f"--student {name}: torchvision models take 3-channel images but the teacher takes {channels}; "
                    "choose a zoo student (see `dfkd models`) or timm:NAME")


def build_student(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build the student `name` (zoo, torchvision:NAME or timm:NAME) with fresh weights."""
    return build_model(name, kwargs, flag="--student")


def check_student(net: nn.Module, teacher: Teacher, name: str) -> None:
    """Refuse a student that cannot take the teacher's inputs or gives other than its classes' logits.

    One forward of two blank inputs, in eval mode and without gradients (no statistic or RNG moves). A
    `--student-arg num_classes=7` for a 10-class teacher, or torchvision's vit_b_16 (224 px only) for a 32-px one,
    failed at the first training step with a traceback, leaving a run folder that looked resumable.
    """
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    k, inputs = teacher.num_classes, teacher.spec.describe()
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(teacher.spec.shape(2), device=device))
    except Exception as e:  # noqa: BLE001 - any failure: the student does not fit the teacher's inputs
        raise DfkdError(f"--student {name}: does not run on the teacher's {inputs} inputs ({first_line(e)}); pick "
                        "a student for them (dfkd models) or set its --student-arg") from None
    finally:
        net.train(was)
    if not torch.is_tensor(out) or tuple(out.shape) != (2, k):
        got = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
        raise DfkdError(f"--student {name}: gives {got} for 2 inputs, where the teacher's {k} classes need (2, {k}) "
                        "logits; drop --student-arg num_classes (the student takes the teacher's classes)")
