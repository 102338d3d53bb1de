"""Transfer data worth shipping: class-balanced generator samples, stored teacher-labelled views, and the
receiver's schedule length chosen from the file's size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import dfkd.methods.transfer as transfer_method
from dfkd.build import build_method
from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.engine import distill
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.spec import MNIST_SPEC
from dfkd.synthesis import Balance
from dfkd.teacher import Teacher, load_teacher
from dfkd.transfer import from_pixels, load_transfer, synthesize


@pytest.fixture
def linear_teacher() -> Teacher:
    """A random linear teacher that puts an untrained generator's samples in every class, unevenly."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
    with torch.no_grad():
        module[1].weight.mul_(50)
    return Teacher(module, MNIST_SPEC)


# --- class balance ------------------------------------------------------------------------------------------------
def test_generator_samples_are_class_balanced(linear_teacher: Teacher, tmp_path: Path) -> None:
    built = build_method("dfad", linear_teacher, {"batch_size": 16}, torch.device("cpu"), 0, "lenet5_half",
                         min_s_steps=0)
    with torch.no_grad():
        raw = torch.bincount(linear_teacher(built.method.synth.sample(1000)).argmax(1), minlength=10)
    assert raw.max() > 1.5 * raw.min() > 0, raw  # sampled as is, the generator's classes are uneven
    data = synthesize(linear_teacher, "dfad", 103, tmp_path / "b.npz", params={"batch_size": 16}, steps=0,
                      student="lenet5_half")
    counts = torch.bincount(data.probs.argmax(1), minlength=10).tolist()
    assert sorted(counts) == [10] * 7 + [11] * 3 and counts[:3] == [11] * 3, counts
    assert data.provenance["class_balanced"] is True and data.provenance["views"] == 1
    res = CliRunner().invoke(main, ["report", str(tmp_path / "b.npz")])
    assert res.exit_code == 0 and "class-balanced" in res.output and "views an image" not in res.output


def test_balance_keeps_quotas_resumes_and_gives_up_after_its_limit() -> None:
    one_hot = torch.eye(3)
    b = Balance(4, 3)
    assert b.quota.tolist() == [2, 1, 1]
    kept = b.keep(one_hot[[0, 0, 0, 1, 1]])
    assert kept.tolist() == [0, 1, 3] and b.counts.tolist() == [2, 1, 0]
    again = Balance(4, 3, b.state_dict())
    assert again.keep(one_hot[[0, 1, 2]]).tolist() == [2] and again.counts.tolist() == [2, 1, 1]
    starved = Balance(2, 2)
    starved.keep(one_hot[[0, 0], :2])
    with pytest.warns(UserWarning, match=r"classes \[1\] too rarely"):
        kept = starved.keep(one_hot[[0] * 40, :2])  # past BALANCE_DRAWS x num samples: take what comes
    assert len(kept) == 40 and starved.gave_up and not again.gave_up
    assert Balance(2, 2, starved.state_dict()).gave_up, "a resumed run knows it gave up"


def test_provenance_says_unbalanced_when_balance_gave_up(linear_teacher: Teacher, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import dfkd.synthesis as synthesis

    monkeypatch.setattr(synthesis, "BALANCE_DRAWS", 0)  # give up at once: the file is filled as sampled
    with pytest.warns(UserWarning, match="too rarely"):
        data = synthesize(linear_teacher, "dfad", 50, tmp_path / "u.npz", params={"batch_size": 16}, steps=0,
                          student="lenet5_half")
    assert data.provenance["class_balanced"] is False


# --- stored views -------------------------------------------------------------------------------------------------
def _is_crop_of(view: torch.Tensor, image: torch.Tensor, pad: int = 4) -> bool:
    """Whether `view` is `image` shifted by at most `pad` pixels (RandomCrop with padding): the overlap is equal."""
    s = image.shape[-1]
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            v = view[..., max(0, -dy):s - max(0, dy), max(0, -dx):s - max(0, dx)]
            i = image[..., max(0, dy):s - max(0, -dy), max(0, dx):s - max(0, -dx)]
            if torch.equal(v, i):
                return True
    return False


def test_latent_method_stores_views_each_labelled_by_the_teacher(sharp_teacher_file: str, tmp_path: Path) -> None:
    t = load_teacher(sharp_teacher_file)
    data = synthesize(t, "fast", 32, tmp_path / "v.npz", params=get_method("fast").quick)
    assert data.provenance["views"] == 4 and data.recipe["method_augment"] == "crop_flip"
    originals, views = data.x[:8], data.x[8:32].view(3, 8, *data.x.shape[1:])
    assert all(_is_crop_of(views[k, i], originals[i]) for k in range(3) for i in range(8))
    assert sum(torch.equal(views[k, i], originals[i]) for k in range(3) for i in range(8)) < 12  # mostly moved
    res = CliRunner().invoke(main, ["report", str(tmp_path / "v.npz")])
    assert res.exit_code == 0 and "4 views an image" in res.output, res.output
    with torch.no_grad():  # every view carries the teacher's label of its own pixels, not its original's
        expected = torch.softmax(t(from_pixels(data.x, data.spec)), 1)
    assert torch.allclose(data.probs, expected, atol=1e-5)
    plain = synthesize(t, "fast", 8, tmp_path / "p.npz", params=get_method("fast").quick, views=1)
    assert plain.provenance["views"] == 1 and torch.equal(plain.x, originals)  # the same seed, the same batch
    with pytest.raises(DfkdError, match="--views 0"):
        synthesize(t, "fast", 8, tmp_path / "z.npz", params=get_method("fast").quick, views=0)
    quick = [a for k, v in get_method("fast").quick.items() for a in ("-p", f"{k}={v}")]
    args = ["synthesize", "--teacher", sharp_teacher_file, "--method", "fast", "--num", "8", *quick, "--device", "cpu"]
    res = CliRunner().invoke(main, [*args, "--views", "2", "--out", str(tmp_path / "c.npz")])
    assert res.exit_code == 0, res.output
    assert load_transfer(tmp_path / "c.npz").provenance["views"] == 2
    res = CliRunner().invoke(main, [*args, "--views", "0", "--out", str(tmp_path / "d.npz")])
    assert res.exit_code == 2 and "--views" in res.output and not (tmp_path / "d.npz").exists()


# --- the receiver's schedule ----------------------------------------------------------------------------------------
def test_steps_for_file_are_epochs_within_bounds() -> None:
    f = transfer_method.steps_for_file
    assert f(10_000, 128) == 1954  # 25 epochs of 79 batches (the last one partial)
    assert f(256, 64) == transfer_method.MIN_STEPS
    assert f(10**9, 64) == transfer_method.MAX_STEPS


def test_run_from_a_file_without_steps_trains_epochs_of_it(transfer_file: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(transfer_method, "EPOCHS", 2)
    monkeypatch.setattr(transfer_method, "MIN_STEPS", 1)
    result = distill(DistillConfig(method="transfer", transfer_data=transfer_file, student="lenet5_half",
                                   fid_every=0, out=str(tmp_path / "auto"), params={"s_steps": 1}))
    assert result.step == 8  # 2 epochs over 256 images at the recipe's batch 64
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["steps"] == 8
    assert "steps: 8 (2 epochs over the 256 images" in capsys.readouterr().err
    given = distill(DistillConfig(method="transfer", transfer_data=transfer_file, student="lenet5_half", steps=3,
                                  fid_every=0, out=str(tmp_path / "given"), params={"s_steps": 1}))
    assert given.step == 3
    timed = distill(DistillConfig(method="transfer", transfer_data=transfer_file, student="lenet5_half",
                                  budget_minutes=0.002, fid_every=0, out=str(tmp_path / "timed")))
    assert json.loads((tmp_path / "timed" / "config.json").read_text())["steps"] is None and timed.step > 0


def test_rounds_run_the_methods_schedule_over_the_file(sharp_teacher_file: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Fast's adversarial term starts after its warm-up fraction of the run: collecting a file is that run.
    seen: list[tuple[float, bool]] = []
    fast = get_method("fast")
    original = fast.objective

    def spy(self, x, y):  # noqa: ANN001, ANN202
        seen.append((self.progress, self.progress >= self.p["warmup"]))
        return original(self, x, y)

    monkeypatch.setattr(fast, "objective", spy)
    synthesize(load_teacher(sharp_teacher_file), "fast", 128, tmp_path / "s.npz", params=fast.quick)
    progress = sorted({round(p, 4) for p, _ in seen})
    assert progress == [0.0, 0.25, 0.5, 0.75]  # 4 rounds of 8 images x 4 views
    assert any(adv for _, adv in seen) and not all(adv for _, adv in seen)
