"""The GAN-generator methods keep their papers' settings, and LeNet-scale teachers get the measured CPU recipe."""

from __future__ import annotations

import pytest

from dfkd.methods import get_method
from dfkd.models import create
from dfkd.spec import CIFAR10_SPEC, MNIST_SPEC
from dfkd.teacher import Teacher, is_small_teacher
from tests.conftest import make_teacher_module

PAPER = {
    "dfad": {"batch_size": 512, "s_optimizer": "sgd", "lr_s": 0.01, "lr_g": 1e-3, "s_steps": 5},
    "dafl": {"batch_size": 512, "s_optimizer": "adam", "lr_s": 2e-3, "lr_g": 0.2},
    "dfq": {"batch_size": 256, "s_optimizer": "sgd", "lr_s": 0.1, "lr_g": 1e-3, "s_steps": 10},
}
CPU = {
    "dfad": {"batch_size": 64, "s_optimizer": "adam", "lr_s": 2e-3, "lr_g": 1e-2, "s_steps": 5},
    "dafl": {"batch_size": 64, "s_optimizer": "adam", "lr_s": 2e-3, "lr_g": 0.2},
    "dfq": {"batch_size": 64, "s_optimizer": "adam", "lr_s": 2e-3, "lr_g": 1e-3, "s_steps": 10},
}


def subset(params: dict, keys: dict) -> dict:
    return {k: params[k] for k in keys}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings_without_a_teacher(name: str) -> None:
    assert subset(get_method(name).default_params(), PAPER[name]) == PAPER[name]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_lenet_scale_teacher_gets_the_cpu_recipe_and_keeps_the_losses(name: str) -> None:
    teacher = Teacher(make_teacher_module(), MNIST_SPEC, arch="lenet5_bn")
    assert is_small_teacher(teacher)
    params = get_method(name).default_params(teacher)
    assert subset(params, CPU[name]) == CPU[name]
    loss_keys = {"oh", "ie", "a", "bn", "balance", "adv"} & set(params)
    paper = get_method(name).default_params()
    assert {k: params[k] for k in loss_keys} == {k: paper[k] for k in loss_keys}


def test_large_teacher_keeps_the_paper_cifar_settings() -> None:
    teacher = Teacher(create("resnet18", num_classes=10), CIFAR10_SPEC, arch="resnet18")
    assert not is_small_teacher(teacher)
    dfad = get_method("dfad").default_params(teacher)
    assert (dfad["batch_size"], dfad["s_optimizer"], dfad["lr_s"], dfad["lr_g"]) == (256, "sgd", 0.1, 1e-3)
    dfq = get_method("dfq").default_params(teacher)
    assert (dfq["batch_size"], dfq["lr_s"]) == (256, 0.1)


def test_online_critic_weight_is_cut_for_lenet_scale_teachers_only() -> None:
    teacher = Teacher(make_teacher_module(), MNIST_SPEC, arch="lenet5_bn")
    assert get_method("online").default_params()["adv"] == 1.0
    small = get_method("online").default_params(teacher)
    assert small["adv"] == 0.01
    assert subset(small, CPU["dfad"]) == CPU["dfad"]  # and DFAD's CPU recipe underneath
