"""The shipped demo files: the two MNIST teachers load as dfkd model files and classify the shipped test set."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfkd.data import load_images
from dfkd.evaluate import accuracy
from dfkd.teacher import load_teacher

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(("name", "arch", "top1"), [("mnist_lenet5_bn.pt", "lenet5_bn", 0.9953),
                                                     ("mnist_lenet5.pt", "lenet5", 0.9921)])
def test_demo_teacher_is_what_the_readme_says(name: str, arch: str, top1: float) -> None:
    teacher = load_teacher(EXAMPLES / name)
    assert teacher.fmt == "dfkd" and teacher.arch == arch and teacher.num_classes == 10
    data = load_images(EXAMPLES / "mnist_test.npz", "--eval-data")
    assert len(data.y) == 10_000
    assert accuracy(teacher.module, data, teacher.spec, "cpu")["top1"] == pytest.approx(top1, abs=5e-5)


CIFAR_TEST = EXAMPLES.parent.parent / "shared" / "data" / "cifar10_test_jpeg.npz"


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="needs ../shared/data/cifar10_test_jpeg.npz beside the checkout")
def test_cifar10_demo_teacher_is_what_the_readme_says() -> None:
    teacher = load_teacher(EXAMPLES / "cifar10_wrn16_1.pt")
    assert teacher.fmt == "dfkd" and teacher.arch == "wrn_16_1" and teacher.num_classes == 10
    assert (teacher.spec.channels, teacher.spec.size) == (3, 32) and teacher.bn_paths()
    data = load_images(CIFAR_TEST, "--eval-data")
    assert len(data.y) == 10_000
    assert accuracy(teacher.module, data, teacher.spec, "cpu")["top1"] == pytest.approx(0.8103, abs=5e-5)
