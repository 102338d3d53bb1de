"""Recipes per input kind: LeNet CPU recipes unchanged, the papers' CIFAR settings at 3 x 32, ImageNet from 64 px."""

from __future__ import annotations

import pytest
from torch import nn

from dfkd.methods import get_method, list_methods
from dfkd.methods._recipes import LARGE_BATCH, input_kind
from dfkd.spec import CIFAR10_SPEC, MNIST_SPEC, InputSpec
from dfkd.teacher import Teacher, is_small_teacher

IMAGENET_SPEC = InputSpec(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATA_FREE = [m for m in list_methods() if m not in ("kd", "transfer")]


def teacher(spec: InputSpec, params: int) -> Teacher:
    """A linear classifier of about `params` parameters (recipes look at the spec and the size only)."""
    width = max(1, params // (spec.channels * spec.size * spec.size))
    return Teacher(nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.size * spec.size, width),
                                 nn.Linear(width, 10)), spec)


CIFAR_T, IMAGENET_T = teacher(CIFAR10_SPEC, 2_000_000), teacher(IMAGENET_SPEC, 2_000_000)


def test_input_kinds() -> None:
    assert [input_kind(s) for s in (MNIST_SPEC, CIFAR10_SPEC, InputSpec(3, 64, (0.5,) * 3, (0.5,) * 3),
                                    IMAGENET_SPEC, None)] == ["mnist", "cifar", "imagenet", "imagenet", None]
    assert not is_small_teacher(CIFAR_T) and not is_small_teacher(IMAGENET_T)


@pytest.mark.parametrize("method", DATA_FREE)
def test_imagenet_size_batches_fit(method: str) -> None:
    p = get_method(method).default_params(IMAGENET_T)
    batches = [p[k] for k in ("batch_size", "synth_batch_size", "di_batch") if p.get(k)]
    assert max(batches) <= 100, f"{method} at 224 px: batches {batches}"


def test_papers_cifar_and_imagenet_settings() -> None:
    dafl = get_method("dafl")
    assert dafl.default_params(CIFAR_T)["batch_size"] == 1024 and dafl.default_params(CIFAR_T)["nz"] == 1000
    assert dafl.default_params(IMAGENET_T)["batch_size"] == LARGE_BATCH
    dfad = get_method("dfad").default_params(IMAGENET_T)
    assert (dfad["batch_size"], dfad["lr_s"], dfad["nz"]) == (64, 0.05, 256)  # DFAD's 224 px Caltech-101 setting
    assert get_method("dfad").default_params(CIFAR_T)["batch_size"] == 256
    fast = get_method("fast").default_params(IMAGENET_T)
    assert (fast["g_steps"], fast["synth_batch_size"], fast["lr_meta"], fast["is_maml"], fast["T"]) == \
        (50, 100, 1e-4, 0, 5.0)
    assert get_method("fast").default_params(CIFAR_T)["g_steps"] == 5
    di = get_method("deepinversion").default_params(IMAGENET_T)
    assert (di["iterations"], di["batch_size"], di["jitter"]) == (3000, 64, 30)
    assert get_method("adi").default_params(IMAGENET_T)["iterations"] == 3000
    assert get_method("zskd").default_params(CIFAR_T)["pool_size"] == 40_000
    assert get_method("zskd").default_params(IMAGENET_T)["di_batch"] == LARGE_BATCH
    assert get_method("cmi").default_params(CIFAR_T)["g_steps"] == 200


#: The measured CPU recipes a LeNet-scale MNIST teacher gets (the demo's numbers rest on them).
LENET = {"dafl": {"batch_size": 64, "lr_g": 0.2}, "dfad": {"batch_size": 64, "lr_g": 1e-2, "clip_s": None},
         "dfq": {"batch_size": 64, "lr_s": 2e-3},
         "cmi": {"g_steps": 40, "batch_size": 128, "lr_s": 0.05, "clip_s": 1.0},
         "fast": {"synth_batch_size": 64, "lr_s": 0.05, "g_steps": 5, "clip_s": 1.0},
         "deepinversion": {"iterations": 100, "batch_size": 128}, "zeroq": {"iterations": 100},
         "zskd": {"di_iters": 100, "pool_size": 24_000}, "zskt": {"batch_size": 128},
         "adi": {"iterations": 100}, "online": {"adv": 0.01, "batch_size": 64},
         "nayer": {"s_steps": 50, "lr_s": 0.05, "clip_s": 1.0}}


@pytest.mark.parametrize("method", sorted(LENET))
def test_lenet_cpu_recipes_are_unchanged(method: str, tiny_teacher: Teacher) -> None:
    p = get_method(method).default_params(tiny_teacher)
    assert {k: p[k] for k in LENET[method]} == LENET[method]
