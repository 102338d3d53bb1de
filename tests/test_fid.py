"""FID monitors: hand-made cases for each metric, BN-FID under DeepInversion, the Inception path, fid-stats."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dfkd.ensemble import load_teachers
from dfkd.errors import DfkdError
from dfkd.fid import BNFID, FIDStats, InceptionFID, InceptionUnavailable, TeacherFID, bn_fid, frechet_distance
from dfkd.hooks import FeatureTaps
from dfkd.losses import bn_deepinversion
from dfkd.modelfile import ModelFile, save_model
from dfkd.models import create
from dfkd.monitor import FIDMonitors, compute_fid_stats
from dfkd.spec import MNIST_SPEC
from dfkd.teacher import Teacher, load_teacher
from dfkd.teacher_options import TeacherOptions, load_with_options

KW = {"num_classes": 10, "in_channels": 1, "input_size": 32}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bn_teacher(data: torch.Tensor | None = None, seed: int = 0) -> Teacher:
    """A LeNet-5-BN whose BN running statistics are exactly those of `data` (one cumulative train forward)."""
    torch.manual_seed(seed)
    m = create("lenet5_bn", **KW)
    for bn in (x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)):
        bn.momentum = None
        bn.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(torch.randn(512, 1, 32, 32) if data is None else data)
    return Teacher(m.eval(), MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KW)


def test_frechet_distance_hand_computed() -> None:
    # N(0, 4) vs N(3, 1): (0-3)^2 + 4 + 1 - 2*sqrt(4*1) = 10
    a = FIDStats(np.array([0.0]), np.array([[4.0]]), "teacher")
    b = FIDStats(np.array([3.0]), np.array([[1.0]]), "teacher")
    assert frechet_distance(a, b) == pytest.approx(10.0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_hand_computed_1d_and_non_commuting() -> None:
    one = frechet_distance(FIDStats(np.zeros(1), np.array([[4.0]])), FIDStats(np.ones(1), np.array([[9.0]])))
    assert one == pytest.approx(1 + 4 + 9 - 2 * 6)  # (mu_a - mu_b)^2 + var_a + var_b - 2 sqrt(var_a var_b)
    # S_a = I, S_b = [[2, 1], [1, 2]] (eigenvalues 3 and 1): Tr sqrt(S_a S_b) = sqrt(3) + 1.
    d = frechet_distance(FIDStats(np.zeros(2), np.eye(2)), FIDStats(np.zeros(2), np.array([[2.0, 1.0], [1.0, 2.0]])))
    assert d == pytest.approx(2 + 4 - 2 * (np.sqrt(3) + 1))


def test_frechet_distance_agrees_with_pytorch_fid() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)) * 1.5 + 0.3
    sa, sb = (FIDStats(v.mean(0), np.cov(v, rowvar=False), "teacher") for v in (a, b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
        except TypeError as e:  # pytorch-fid 0.3 calls scipy's sqrtm(disp=False), which newer scipy removed
            if "disp" not in str(e):
                raise
            pytest.skip(f"the reference, pytorch-fid's calculate_frechet_distance, fails with this scipy: {e}")
    assert frechet_distance(sa, sb) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DfkdError, match="different dimensions"):
        frechet_distance(sa, FIDStats(np.zeros(3), np.eye(3), "teacher"))


def test_bn_fid_hand_computed_and_agrees_with_pytorch_fid() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # channel means (2, 0), biased variances (1, 0)
    rm, rv = torch.zeros(2), torch.tensor([4.0, 1.0])
    # channel 0: (2-0)^2 + (1-2)^2 = 5; channel 1: 0 + (0-1)^2 = 1 -> layer 3; a matching layer -> 0
    matching = (x, torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert float(bn_fid([(x, rm, rv), matching])) == pytest.approx(1.5)
    ref = FIDStats(rm.double().numpy(), np.diag(rv.double().numpy()), "teacher")
    syn = FIDStats(np.array([2.0, 0.0]), np.diag([1.0, 0.0]), "teacher")
    assert float(bn_fid([(x, rm, rv)])) == pytest.approx(frechet_distance(syn, ref) / 2, abs=1e-4)


def test_bn_fid_monitor_zero_on_the_data_and_grows_with_shift() -> None:
    data = torch.randn(512, 1, 32, 32)
    monitor = BNFID(bn_teacher(data))
    same, near, far = (monitor.measure(data + s) for s in (0.0, 0.5, 1.0))
    assert same < 1e-3
    assert near > 20 * same and far > 1.5 * near


def test_bn_fid_falls_while_pixels_are_inverted() -> None:
    teacher = bn_teacher(torch.rand(512, 1, 32, 32) * 2.0 - 0.5)
    monitor = BNFID(teacher)
    torch.manual_seed(1)
    x = torch.randn(16, 1, 32, 32).mul_(2.0).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    before = monitor.measure(x.detach())
    paths = teacher.bn_paths()
    with FeatureTaps(teacher.module, paths) as taps:
        for _ in range(30):
            teacher(x)
            loss = bn_deepinversion([(taps.inputs[p], *_running(teacher, p)) for p in paths])
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = monitor.measure(x.detach())
    assert after < 0.5 * before
    assert all(p.grad is None for p in teacher.parameters())


def _running(teacher: Teacher, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    m = teacher.module_at(path)
    return m.running_mean, m.running_var


def test_teacher_fid_zero_for_identical_and_grows_with_shift() -> None:
    teacher = bn_teacher()
    torch.manual_seed(2)
    x = torch.randn(200, 1, 32, 32)
    ref = FIDStats.from_features(TeacherFID(teacher).features(x), "teacher")
    assert ref.mu.shape == (120,) and ref.sigma.shape == (120, 120)
    fid = TeacherFID(teacher, ref)
    same, fresh = fid.measure(x), fid.measure(torch.randn(200, 1, 32, 32))
    near, far = fid.measure(x + 0.5), fid.measure(x + 1.5)
    assert abs(same) < 1e-3
    assert fresh < near < far


def test_teacher_fid_refuses_wrong_kind_or_dimension() -> None:
    teacher = bn_teacher()
    with pytest.raises(DfkdError, match="inception statistics"):
        TeacherFID(teacher, FIDStats(np.zeros(120), np.eye(120), "inception"))
    with pytest.raises(DfkdError, match="7-dimensional"):
        TeacherFID(teacher, FIDStats(np.zeros(7), np.eye(7), "teacher"))


class TinyExtractor(nn.Module):
    """Stands in for InceptionV3: records what it is fed, answers pytorch-fid's list of (B, D, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 6), nn.Tanh())
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append(x)
        return [self.net(x)[:, :, None, None]]


def test_inception_fid_with_injected_extractor() -> None:
    ext = TinyExtractor()
    torch.manual_seed(4)
    x01 = torch.rand(128, 1, 32, 32)
    x = MNIST_SPEC.normalize(x01)
    feature_only = InceptionFID(MNIST_SPEC, extractor=ext)
    ref = FIDStats.from_features(feature_only.features(x), "inception")
    seen = ext.seen[0]
    assert seen.shape[1] == 3 and seen.min() >= 0 and seen.max() <= 1  # denormalised, grey repeated to RGB
    assert torch.allclose(seen[:, 0], x01[:64, 0], atol=1e-5)
    fid = InceptionFID(MNIST_SPEC, ref, extractor=ext)
    same, near, far = (fid.measure(MNIST_SPEC.normalize((x01 * (1 - s)).clamp(0, 1))) for s in (0.0, 0.3, 0.6))
    assert abs(same) < 1e-4 and 0 < near < far
    with pytest.raises(DfkdError, match="teacher statistics"):
        InceptionFID(MNIST_SPEC, FIDStats(np.zeros(6), np.eye(6), "teacher"), extractor=ext)


def test_missing_inception_weights_warn_once_and_the_run_goes_on(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_fid.inception

    tried = []

    def offline(*args: object, **kwargs: object) -> nn.Module:
        tried.append(1)
        raise OSError("Name or service not known")  # what an offline download attempt raises

    monkeypatch.setattr(pytorch_fid.inception, "InceptionV3", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ref = tmp_path / "incep.npz"
    FIDStats(np.zeros(2048), np.eye(2048), "inception").save(ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitors = FIDMonitors.for_run(bn_teacher(), str(ref))
    msgs = [str(w.message) for w in caught if "Inception" in str(w.message)]
    assert len(msgs) == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in msgs[0] and str(tmp_path / "hub" / "checkpoints") in msgs[0]
    assert msgs[0].startswith("Inception FID skipped: ") and "dfkd downloads nothing" in msgs[0]
    assert [m.tag for m in monitors.monitors] == ["bn"]
    assert not tried  # nothing may be downloaded at run time: pytorch-fid's constructor would fetch the weights
    with pytest.raises(InceptionUnavailable, match="needs pytorch-fid's InceptionV3 weights"):
        InceptionFID(MNIST_SPEC)


def test_stats_file_round_trip_and_pytorch_fid_files(tmp_path: Path) -> None:
    s = FIDStats(np.arange(3.0), np.eye(3) * 2, "teacher")
    s.save(tmp_path / "s.npz")
    back = FIDStats.load(tmp_path / "s.npz")
    assert back.features == "teacher" and np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)
    np.savez(tmp_path / "pf.npz", mu=np.zeros(4), sigma=np.eye(4))  # pytorch-fid's own layout
    assert FIDStats.load(tmp_path / "pf.npz").features == "inception"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DfkdError, match="not a readable"):
        FIDStats.load(tmp_path / "bad.npz")
    with pytest.raises(DfkdError, match="no such file"):
        FIDStats.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("mu, sigma, why", [
    (np.full(4, np.nan), np.eye(4), "NaN or infinite"),  # logged fid/teacher NaN, silently
    (np.zeros(4), np.eye(4) * np.nan, "NaN or infinite"),  # a linalg.eigh traceback at the first evaluation
    (np.zeros(4), -np.eye(4), "negative eigenvalues"),
    (np.zeros(4), np.triu(np.ones((4, 4))), "not symmetric")])
def test_stats_that_are_no_gaussian_are_refused(tmp_path: Path, mu: np.ndarray, sigma: np.ndarray, why: str) -> None:
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=sigma, features=np.array("teacher"))
    with pytest.raises(DfkdError, match=f"--fid-ref {tmp_path / 'bad.npz'}: .*{why}.*`dfkd fid-stats`"):
        FIDStats.load(tmp_path / "bad.npz")
    rank_one = np.outer(np.arange(4.0), np.arange(4.0))  # a covariance of few samples: singular, still a covariance
    np.savez(tmp_path / "ok.npz", mu=np.zeros(4), sigma=rank_one, features=np.array("teacher"))
    assert FIDStats.load(tmp_path / "ok.npz").sigma.shape == (4, 4)


def test_fid_stats_writes_mu_sigma_of_the_teacher_features(tmp_path: Path) -> None:
    from dfkd.cli.main import main

    teacher = bn_teacher()
    save_model(tmp_path / "t.pt", teacher.module, ModelFile("lenet5_bn", KW, MNIST_SPEC, 10))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 50))
    res = CliRunner().invoke(main, ["fid-stats", str(tmp_path / "d.npz"), str(tmp_path / "ref.npz"),
                                    "--features", "teacher", "--teacher", str(tmp_path / "t.pt"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "ref.npz") as d:
        assert d["mu"].shape == (120,) and d["sigma"].shape == (120, 120) and str(d["features"]) == "teacher"
        assert np.allclose(d["sigma"], d["sigma"].T) and math.isfinite(float(d["mu"].sum()))
    direct = compute_fid_stats(tmp_path / "d.npz", tmp_path / "again.npz", "teacher", teacher=tmp_path / "t.pt",
                               device="cpu", batch_size=16)  # batching does not change the statistics
    assert np.allclose(direct.mu, np.load(tmp_path / "ref.npz")["mu"], atol=1e-5)
    res = CliRunner().invoke(main, ["fid-stats", str(tmp_path / "d.npz"), str(tmp_path / "x.npz"),
                                    "--features", "teacher"])
    assert res.exit_code == 2 and "needs --teacher" in res.output
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.int64))
    res = CliRunner().invoke(main, ["fid-stats", str(tmp_path / "empty.npz"), str(tmp_path / "e.npz"),
                                    "--features", "teacher", "--teacher", str(tmp_path / "t.pt"), "--device", "cpu"])
    assert res.exit_code == 2 and "holds 0 image(s)" in res.output and not (tmp_path / "e.npz").exists()


def test_teacher_statistics_of_another_teacher_file_are_refused(tmp_path: Path) -> None:
    # a reference made with another teacher of the same feature width was used without a word (fid/teacher 543.8)
    save_model(tmp_path / "t.pt", bn_teacher().module, ModelFile("lenet5_bn", KW, MNIST_SPEC, 10))
    torch.manual_seed(7)
    save_model(tmp_path / "other.pt", create("lenet5_bn", **KW), ModelFile("lenet5_bn", KW, MNIST_SPEC, 10))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 20))
    compute_fid_stats(tmp_path / "d.npz", tmp_path / "ref.npz", "teacher", teacher=tmp_path / "t.pt", device="cpu")
    ref = FIDStats.load(tmp_path / "ref.npz")
    assert ref.teacher_sha256 == load_teacher(tmp_path / "t.pt").sha256
    TeacherFID(load_teacher(tmp_path / "t.pt"), ref)  # its own teacher
    with pytest.raises(DfkdError, match="made with another teacher file .*make them with this teacher"):
        TeacherFID(load_teacher(tmp_path / "other.pt"), ref)
    ref.teacher_sha256 = ""  # a file from before the hash was kept: no way to tell
    TeacherFID(load_teacher(tmp_path / "other.pt"), ref)
    # an ensemble's features are its first teacher's: that teacher's statistics were refused (its sha256 is the
    # members' joined), with a fix fid-stats could not follow (it takes one teacher)
    ref = FIDStats.load(tmp_path / "ref.npz")
    TeacherFID(load_teachers([tmp_path / "t.pt", tmp_path / "other.pt"]), ref)
    with pytest.raises(DfkdError, match=r"the first --teacher \(.*other.pt\), whose features it uses, is"):
        TeacherFID(load_teachers([tmp_path / "other.pt", tmp_path / "t.pt"]), ref)


def test_teacher_statistics_of_other_inputs_are_refused(tmp_path: Path) -> None:
    # the same images at 28 px were taken by a 32-px run without a word: 17 times the distance of two real sets
    save_model(tmp_path / "t.pt", bn_teacher().module, ModelFile("lenet5_bn", KW, MNIST_SPEC, 10))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 20))
    other = TeacherOptions(channels=1, size=28, mean=(0.1307,), std=(0.3081,))
    compute_fid_stats(tmp_path / "d.npz", tmp_path / "r28.npz", "teacher", teacher=tmp_path / "t.pt",
                      options=other, device="cpu")
    ref = FIDStats.load(tmp_path / "r28.npz")
    assert ref.teacher_input == "1x28x28, mean [0.1307], std [0.3081]"
    with pytest.raises(DfkdError, match=r"made from inputs 1x28x28, .* the run's teacher takes 1x32x32"):
        TeacherFID(load_teacher(tmp_path / "t.pt"), ref)
    TeacherFID(load_with_options(tmp_path / "t.pt", other), ref)  # the run given the same inputs


def test_stats_with_a_scalar_mean_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", mu=np.float64(1.0), sigma=np.eye(1))  # len() of unsized object: a traceback
    with pytest.raises(DfkdError, match=r"mu \(\), sigma \(1, 1\): not FID statistics dfkd understands"):
        FIDStats.load(tmp_path / "s.npz")


def test_monitors_measure_in_chunks_of_the_batch_size_with_the_same_values() -> None:
    teacher = bn_teacher()
    torch.manual_seed(4)
    x = torch.randn(100, 1, 32, 32) * 1.3 + 0.2
    ref = FIDStats.from_features(TeacherFID(teacher).features(torch.randn(200, 1, 32, 32)), "teacher")
    monitors = FIDMonitors([BNFID(teacher), TeacherFID(teacher, ref)])
    whole = monitors.measure(x)
    sizes: list[int] = []
    handle = teacher.module.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
    try:
        chunked = monitors.measure(x, chunk=16)
    finally:
        handle.remove()
    assert max(sizes) == 16 and sum(sizes) >= 100, "every forward holds at most `chunk` images"
    for tag, v in whole.items():
        assert chunked[tag] == pytest.approx(v, rel=1e-4), tag
