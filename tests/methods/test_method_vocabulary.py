"""The vocabulary every registered method passes for free: smoke, finiteness, gradients, determinism, state."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd.methods import get_method, list_methods
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from dfkd.teacher import Teacher
from tests.conftest import KWARGS, assert_same_next_round, make_teacher_module

METHODS = [m for m in list_methods() if m != "transfer"]


_DATA_DIR: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _data_dir(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202
    """Pytest's temporary folder (rotated by pytest), not one of our own left behind on every run."""
    _DATA_DIR["path"] = tmp_path_factory.mktemp("vocab")
    yield
    tiny_train_data.cache_clear()
    tiny_paired_data.cache_clear()


@functools.cache
def tiny_train_data() -> str:
    """A small random labelled .npz for methods that distill on real data (kd)."""
    path = _DATA_DIR["path"] / "train.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 40))
    return str(path)


@functools.cache
def tiny_paired_data() -> str:
    """A small random paired .npz (28 px grey A, 32 px colour B) for the cross-modal method."""
    path = _DATA_DIR["path"] / "paired.npz"
    rng = np.random.default_rng(1)
    np.savez(path, x_teacher=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
             x_student=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    return str(path)


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    teacher = Teacher(make_teacher_module(), MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KWARGS)
    torch.manual_seed(seed)
    cls = get_method(name)
    params = {**cls.default_params(teacher), **cls.quick}
    if "data" in params:
        params["data"] = tiny_paired_data() if name == "crossmodal" else tiny_train_data()
    student = build_student("lenet5_half", KWARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(teacher, student, params, torch.device("cpu"))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", METHODS)
def test_smoke_finite_losses(name: str) -> None:
    method = build(name)
    logs = method.round()
    assert logs, "a round reports its losses"
    assert all(math.isfinite(v) for v in logs.values()), logs
    assert method.last_images is not None and torch.isfinite(method.last_images).all()
    assert method.last_images.shape[1:] == (1, 32, 32)
    method.close()


@pytest.mark.parametrize("name", METHODS)
def test_learning_reaches_student_and_generator_never_teacher(name: str) -> None:
    method = build(name)
    teacher_before = snapshot(method.teacher)
    student_before = snapshot(method.student)
    gen = getattr(method.synth, "generator", None)
    gen_before = snapshot(gen) if gen is not None else None
    method.round()
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not method.teacher.training
    changed = [k for k, v in method.student.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, student_before[k])]
    assert changed, "the student's weights must move"
    if gen_before is not None:
        assert any(not torch.equal(v, gen.state_dict()[k]) for k, v in gen_before.items() if v.is_floating_point())
    method.close()


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_student(name: str) -> None:
    a, b = build(name, seed=3), build(name, seed=3)
    torch.manual_seed(11)
    a.round()
    torch.manual_seed(11)
    b.round()
    for k, v in a.student.state_dict().items():
        assert torch.equal(v, b.student.state_dict()[k]), k
    a.close(), b.close()


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip_reproduces_next_round(name: str) -> None:
    a = build(name, seed=1)
    a.round()
    state = copy.deepcopy(a.state_dict())
    b = build(name, seed=2)  # different init: everything must come from the state
    b.load_state_dict(state)
    assert_same_next_round(a, b)
    a.close(), b.close()


@pytest.mark.parametrize("name", METHODS)
def test_registered_with_paper_and_defaults(name: str) -> None:
    cls = get_method(name)
    assert cls.name == name and cls.paper and cls.summary
    assert cls.__doc__ and len(cls.__doc__.strip()) > 40
    assert set(cls.quick) <= set(cls.default_params()), "quick overrides must name real parameters"
