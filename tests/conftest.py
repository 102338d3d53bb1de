"""Shared fixtures: tiny teachers saved as dfkd model files, tiny real-looking data."""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from dfkd.modelfile import ModelFile, save_model
from dfkd.models import create
from dfkd.spec import MNIST_SPEC
from dfkd.teacher import Teacher

KWARGS = {"num_classes": 10, "in_channels": 1, "input_size": 32}

# Test tensors are tiny: one thread is as fast, and it does not thrash when other jobs share the cores.
torch.set_num_threads(1)


def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> ModuleType:
    """`source` written as the user's own module `name` in tmp_path, importable as their code is (working folder,
    sys.path), and imported; it leaves sys.modules when the test ends."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, name, None)  # records the name as absent: teardown removes the module
    del sys.modules[name]
    importlib.invalidate_caches()
    return importlib.import_module(name)


def make_teacher_module(arch: str = "lenet5_bn", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create(arch, **KWARGS)
    # A few train-mode forwards give the BN layers non-trivial running statistics.
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 32, 32))
    return m.eval()


def assert_same_next_round(a, b) -> None:  # noqa: ANN001 - any two Methods
    """Two methods in the same state take the same next round: equal logs, equal students."""
    torch.manual_seed(5)
    la = a.round()
    torch.manual_seed(5)
    lb = b.round()
    assert la == lb
    for k, v in a.student.state_dict().items():
        assert torch.equal(v, b.student.state_dict()[k]), k


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("teachers") / "lenet5_bn.pt"
    save_model(path, make_teacher_module(), ModelFile("lenet5_bn", KWARGS, MNIST_SPEC, 10))
    return str(path)


@pytest.fixture(scope="session")
def bnfree_teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("teachers") / "lenet5.pt"
    save_model(path, make_teacher_module("lenet5"), ModelFile("lenet5", KWARGS, MNIST_SPEC, 10))
    return str(path)


@pytest.fixture
def tiny_teacher() -> Teacher:
    return Teacher(make_teacher_module(), MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KWARGS)


@pytest.fixture(scope="session")
def eval_npz(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    np.savez_compressed(path, x=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
                        y=rng.integers(0, 10, 64).astype(np.int64))
    return str(path)


ZSKD_FAST = {"di_batch": 32, "di_iters": 8, "lr_di": 0.05, "s_steps": 0}


@pytest.fixture(scope="session")
def sharp_teacher_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random LeNet-5-BN with large logits (varied, confident predictions), saved as a dfkd model file."""
    module = make_teacher_module()
    with torch.no_grad():
        module.classifier.weight.mul_(30)
    path = tmp_path_factory.mktemp("t") / "teacher.pt"
    save_model(path, module, ModelFile("lenet5_bn", KWARGS, MNIST_SPEC, 10))
    return str(path)


@pytest.fixture(scope="session")
def transfer_file(sharp_teacher_file: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small zskd transfer file made from `sharp_teacher_file` (256 impressions, no stored crop views)."""
    from dfkd.teacher import load_teacher
    from dfkd.transfer import synthesize

    out = tmp_path_factory.mktemp("x") / "transfer.npz"
    synthesize(load_teacher(sharp_teacher_file), "zskd", 256, out, params=ZSKD_FAST, seed=0, views=1)
    return str(out)


def synthesis_losses(method) -> list[float]:  # noqa: ANN001 - a Method with a latent synthesizer (cmi, fast, nayer)
    """Run one `method.synthesize()` and return the total synthesis loss of every generator step, in order."""
    seen: list[float] = []
    objective = method.synth.objective

    def spy(x, y):  # noqa: ANN001, ANN202
        losses, memo = objective(x, y)
        seen.append(float(losses["loss"].detach()))
        return losses, memo

    method.synth.objective = spy
    method.synthesize()
    return seen


def assert_learns_on_pool_images(m) -> None:  # noqa: ANN001 - a pool-served Method (cmi, fast, nayer)
    """Three rounds halve the student's KL to the teacher on images the first round put in the pool."""
    import copy

    from dfkd.losses import kl_div

    s0 = copy.deepcopy(m.student)
    m.round()
    x, _ = m.pool.sample(16)
    m.round(), m.round()
    with torch.no_grad():
        t = m.teacher(x)
        assert kl_div(m.student(x), t).item() < 0.5 * kl_div(s0(x), t).item()
    m.close()


def stop_in_round(monkeypatch: pytest.MonkeyPatch, method: str, call: int, signum: int = 2) -> None:
    """Raise stop signal `signum` (SIGINT) at the start of `method`'s `call`-th round, as a user's Ctrl-C would."""
    import signal

    from dfkd.methods import get_method

    cls = get_method(method)
    original, calls = cls.round, {"n": 0}

    def round_with_a_stop(self: object) -> object:
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signum)
        return original(self)

    monkeypatch.setattr(cls, "round", round_with_a_stop)


@pytest.fixture
def stop_signals_heard() -> Iterator[None]:
    """The stop signals at their defaults for a test that sends one: under `nohup` (a CI job started so) SIGHUP is
    ignored, and dfkd keeps an ignored signal ignored, as a run started with nohup must outlive its terminal."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s, handler in saved.items():
        if handler is signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
