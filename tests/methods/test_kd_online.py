"""KD on real data (kd) and online adversarial KD (online): data handling, learning, objectives, state, engine."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.data import load_images
from dfkd.engine import distill
from dfkd.errors import DfkdError
from dfkd.generators import RealData
from dfkd.methods import get_method
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from dfkd.teacher import Teacher
from tests.conftest import KWARGS, make_teacher_module


@pytest.fixture(scope="module")
def train_npz(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "train.npz"
    np.savez(path, x=rng.integers(0, 256, (48, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 48))
    return str(path)


def sharp_teacher(seed: int = 0) -> Teacher:
    module = make_teacher_module(seed=seed)
    with torch.no_grad():  # a random teacher is nearly uniform; larger logits give the student something to learn
        module.classifier.weight.mul_(20)
    return Teacher(module, MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KWARGS)


def build(name: str, seed: int = 0, **over):
    teacher = sharp_teacher()
    torch.manual_seed(seed)
    cls = get_method(name)
    params = {**cls.default_params(teacher), **cls.quick, **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(teacher, build_student("lenet5_half", KWARGS), params, torch.device("cpu"))


def agreement(method, x: torch.Tensor) -> float:
    with torch.no_grad():
        was = method.student.training
        method.student.eval()
        a = (method.student(x).argmax(1) == method.teacher(x).argmax(1)).float().mean().item()
        method.student.train(was)
    return a


# --- kd ---------------------------------------------------------------------------------------------------------
def test_kd_without_data_says_what_to_do():
    with pytest.raises(DfkdError, match="--data TRAIN"):
        build("kd")


def test_kd_refuses_data_of_another_model(tmp_path: Path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 2, 12]))
    with pytest.raises(DfkdError, match="labels run 0..12"):
        build("kd", data=str(path))


def test_real_data_epochs_cover_every_image_once_with_its_label(train_npz: str):
    data = load_images(train_npz)
    src = RealData(data, MNIST_SPEC, 16, torch.device("cpu"), augment=False)
    torch.manual_seed(0)
    seen = torch.cat([src.indices(16) for _ in range(3)])
    assert sorted(seen.tolist()) == list(range(48)) and src.epoch == 1
    src.indices(16)
    assert src.epoch == 2
    x, y = src.batch(8)
    idx = src.perm[src.pos - 8:src.pos]
    assert torch.equal(y, data.y[idx]) and x.shape == (8, 1, 32, 32)


def test_kd_loss_is_weighted_kd_plus_ce(train_npz: str):
    m = build("kd", data=train_npz)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    m._labels = torch.tensor([0, 1, 2, 3])
    losses = m.student_loss(s, t)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 4, 1), torch.softmax(t / 4, 1), reduction="batchmean") * 16
    ce = torch.nn.functional.cross_entropy(s, m._labels)
    assert losses["loss"].item() == pytest.approx(0.9 * kl.item() + 0.1 * ce.item(), rel=1e-5)


def test_kd_student_learns_the_teacher_on_real_images(train_npz: str):
    m = build("kd", data=train_npz, batch_size=16, ce=0.0, augment=False, lr_s=0.05)
    x = m.synth.batch(48)[0]
    before = agreement(m, x)
    for _ in range(40):
        m.round()
    after = agreement(m, x)
    assert after > before + 0.3, (before, after)
    m.close()


@pytest.mark.parametrize("objective", [{"feature_loss": ["at", "rkd"]}, {"feature_loss": "fitnet"},
                                       {"discriminator": "features"}])
def test_kd_takes_every_objective(train_npz: str, objective: dict):
    m = build("kd", data=train_npz, **objective)
    logs = m.round()
    assert all(np.isfinite(v) for v in logs.values())
    assert len([k for k in logs if k not in ("student/total", "student/kd", "student/ce")]) >= 1
    m.close()


def test_engine_kd_run_and_data_with_a_data_free_method(teacher_file: str, train_npz: str, tmp_path: Path):
    cfg = DistillConfig(teachers=(teacher_file,), method="kd", data=train_npz, steps=3, out=str(tmp_path / "kd"),
                        fid_every=0, params={"batch_size": 8})
    result = distill(cfg)
    assert result.finished and json.loads((result.run_dir / "config.json").read_text())["params"]["data"] == train_npz
    with pytest.raises(DfkdError, match="data-free; distill on real images with --method kd"):
        distill(DistillConfig(teachers=(teacher_file,), method="dfad", data=train_npz, steps=1,
                              out=str(tmp_path / "x")))


def test_cli_data_defaults_to_kd(teacher_file: str, train_npz: str, tmp_path: Path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["distill", "--teacher", teacher_file, "--data", train_npz, "--steps", "2",
                                  "-p", "batch_size=8", "--fid-every", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["method"] == "kd"


# --- online -----------------------------------------------------------------------------------------------------
def test_online_peer_is_a_fresh_student_and_both_learn():
    m = build("online", lr_s=0.05)
    assert not torch.equal(m.peer.classifier.weight, m.student.classifier.weight)
    x = m.synth.sample(16)
    first = {k: float(v.detach()) for k, v in m.student_step(x).items()}
    for _ in range(20):
        last = {k: float(v.detach()) for k, v in m.student_step(x).items()}
    assert last["loss/l1"] < 0.7 * first["loss/l1"], (first["loss/l1"], last["loss/l1"])
    assert last["loss/peer_l1"] < 0.7 * first["loss/peer_l1"], (first["loss/peer_l1"], last["loss/peer_l1"])
    assert {"loss/mutual", "loss/fool", "loss/d1", "loss/d2"} <= set(last)
    m.close()


def test_online_round_moves_both_students_critics_and_generator_never_teacher():
    m = build("online")
    snaps = [{k: v.clone() for k, v in net.state_dict().items()}
             for net in (m.peer, m.discs[0].net, m.discs[1].net, m.synth.generator)]
    m.round()
    for snap, net in zip(snaps, (m.peer, m.discs[0].net, m.discs[1].net, m.synth.generator)):
        assert any(not torch.equal(v, net.state_dict()[k]) for k, v in snap.items() if v.is_floating_point())
    assert all(p.grad is None for p in m.teacher.parameters())
    m.peer.zero_grad(set_to_none=True)
    m.generator_step()
    assert all(p.grad is None for p in m.peer.parameters()), "the generator's step leaves the peer alone"
    m.close()


def test_online_state_holds_the_second_student():
    a = build("online", seed=1)
    a.round()
    state = a.state_dict()
    assert set(state["extra"]) == {"peer", "opt_peer", "d1", "d2"}
    b = build("online", seed=2)
    b.load_state_dict(state)
    for k, v in a.peer.state_dict().items():
        assert torch.equal(v, b.peer.state_dict()[k]), k
    a.close(), b.close()
