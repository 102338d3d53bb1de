"""Choosing and building the student."""

from __future__ import annotations

from torch import nn

from dfkd.errors import DfkdError
from dfkd.models import MODELS, create
from dfkd.teacher import Teacher

#: The pairs of the data-free literature (METHODS.md §10, §14).
DEFAULT_STUDENT = {
    "lenet5": "lenet5_half",
    "lenet5_bn": "lenet5_half",
    "lenet5_half": "lenet5_half",
    "lenet5_half_bn": "lenet5_half",
    "resnet34": "resnet18",
    "resnet18": "resnet18",
    "vgg11_bn": "resnet18",
    "wrn_40_2": "wrn_16_1",
    "wrn_40_1": "wrn_16_1",
    "wrn_16_2": "wrn_16_1",
    "wrn_16_1": "wrn_16_1",
    "mobilenet_v2_tiny": "mobilenet_v2_tiny",
}


def student_arch(teacher: Teacher, requested: str | None) -> tuple[str, dict]:
    """The student architecture name and its kwargs (classes, channels and size follow the teacher)."""
    if requested is None:
        requested = DEFAULT_STUDENT.get(teacher.arch or "")
        if requested is None:
            raise DfkdError(f"--teacher {teacher.source}: no default student for a {teacher.arch or teacher.fmt} "
                            f"teacher; choose one with --student ({', '.join(MODELS.names())})")
    MODELS.get(requested)
    kwargs = {"num_classes": teacher.num_classes, "in_channels": teacher.spec.channels,
              "input_size": teacher.spec.size}
    return requested, kwargs


def build_student(name: str, kwargs: dict) -> nn.Module:
    return create(name, **kwargs)
