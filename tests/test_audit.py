"""`dfkd audit`: copies of training images in a transfer file are flagged and shown; synthetic images pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dfkd.audit import audit, nearest, real_pixels
from dfkd.cli.main import main
from dfkd.data import ImageData, load_images
from dfkd.errors import DfkdError
from dfkd.membership import auc, loss_threshold_auc
from dfkd.teacher import load_teacher
from dfkd.transfer import load_transfer, save_transfer, teacher_probs

MNIST = Path(__file__).resolve().parents[1] / "examples" / "mnist_test.npz"
COPIED = [5, 17, 99, 1234]


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The owner's 'training' (3000 real digits) and held-out (1000) sets, cut from the shipped MNIST test set."""
    d = np.load(MNIST)
    folder = tmp_path_factory.mktemp("owner")
    np.savez(folder / "train.npz", x=d["x"][:3000], y=d["y"][:3000])
    np.savez(folder / "test.npz", x=d["x"][3000:4000], y=d["y"][3000:4000])
    return str(folder / "train.npz"), str(folder / "test.npz")


@pytest.fixture(scope="module")
def leaky_file(transfer_file: str, sharp_teacher_file: str, owner: tuple[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> str:
    """The synthetic file plus exact copies of 3 training images and one copy with +-2/255 noise."""
    data, teacher = load_transfer(transfer_file), load_teacher(sharp_teacher_file)
    train = real_pixels(load_images(owner[0]), data.spec)
    copies = train[COPIED].clone()
    noise = torch.randint(-2, 3, copies[-1].shape, generator=torch.Generator().manual_seed(0))
    copies[-1] = (copies[-1].int() + noise).clamp(0, 255).to(torch.uint8)
    x = torch.cat([data.x[:100], copies, data.x[100:]])
    out = tmp_path_factory.mktemp("leak") / "leaky.npz"
    save_transfer(out, x, teacher_probs(teacher, x, torch.device("cpu")), data.spec, "zskd", data.teacher_sha256)
    return str(out)


def test_nearest_matches_brute_force_in_small_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    q, r = torch.randint(0, 256, (37, 50), generator=g, dtype=torch.uint8), torch.randint(0, 256, (101, 50),
                                                                                         generator=g, dtype=torch.uint8)
    d, i = nearest(q, r, q_chunk=8, r_chunk=16)
    full = torch.cdist(q.double() / 255, r.double() / 255)
    assert torch.equal(i, full.argmin(1)) and torch.allclose(d.double(), full.min(1).values, atol=1e-4)


def test_copies_are_flagged_and_shown(leaky_file: str, sharp_teacher_file: str, owner: tuple[str, str],
                                      tmp_path: Path) -> None:
    png = tmp_path / "pairs.png"
    r = audit(leaky_file, owner[0], load_teacher(sharp_teacher_file), owner[1], png=png)
    assert r.verdict == "FAIL"
    flagged = r.pixel.flagged.tolist()
    assert sorted(flagged) == [100, 101, 102, 103]  # exactly the four copies, nothing synthetic
    assert [int(r.pixel.idx[i]) for i in [100, 101, 102, 103]] == COPIED
    assert flagged[-1] == 103  # the noisy copy is the farthest of them, and still flagged
    text = r.text()
    for i, j in zip([100, 101, 102], COPIED):
        assert f"synthetic #{i} ~ training #{j}" in text
    assert text.splitlines()[-1].startswith("verdict:  FAIL: 4 synthetic images")
    # The PNG starts with the closest pairs: synthetic copy, then the very training image it copies.
    img = np.asarray(Image.open(png).convert("L")).astype(int)
    tile = lambda k: img[2:34, 2 + 34 * k:34 + 34 * k]  # noqa: E731
    assert np.array_equal(tile(0), tile(1)) and img.shape == (4 * 34 + 2, 8 * 34 + 2)


def test_synthetic_file_passes(transfer_file: str, sharp_teacher_file: str, owner: tuple[str, str],
                               tmp_path: Path) -> None:
    r = audit(transfer_file, owner[0], load_teacher(sharp_teacher_file), owner[1], png=tmp_path / "p.png")
    assert r.verdict == "PASS" and len(r.pixel.flagged) == 0
    assert r.pixel.dist.min() > 5 * r.pixel.threshold  # far from a copy, not just under the line
    assert r.feature is not None and r.text().splitlines()[-1].startswith("verdict:  PASS")


def test_baseline_held_out_of_train_without_test(leaky_file: str, owner: tuple[str, str], tmp_path: Path) -> None:
    r = audit(leaky_file, owner[0], png=tmp_path / "p.png")
    assert r.n_train == 2000 and r.feature is None and "held out of --against" in r.text()
    assert r.verdict == "FAIL"  # the seeded split keeps at least two of the copied images in the reference set
    assert set(r.pixel.flagged.tolist()) <= {100, 101, 102, 103} and len(r.pixel.flagged) >= 2


def test_membership_auc() -> None:
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.ones(5), np.ones(7)) == 0.5
    teacher = load_teacher(Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5_bn.pt")
    d = load_images(MNIST)
    a, b = ImageData(d.x[:400], d.y[:400]), ImageData(d.x[400:800], d.y[400:800])
    assert abs(loss_threshold_auc(teacher, a, b) - 0.5) < 0.1  # neither set was trained on: nothing to tell
    assert loss_threshold_auc(teacher, a, a) == 0.5


def test_cli_exit_codes_and_errors(leaky_file: str, transfer_file: str, owner: tuple[str, str],
                                   tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["audit", leaky_file, "--against", owner[0], "--test", owner[1],
                               "--png", str(tmp_path / "a.png")])
    assert res.exit_code == 1 and "verdict:  FAIL" in res.output and (tmp_path / "a.png").is_file()
    res = runner.invoke(main, ["audit", transfer_file, "--against", owner[0], "--test", owner[1],
                               "--png", str(tmp_path / "b.png")])
    assert res.exit_code == 0 and "verdict:  PASS" in res.output
    res = runner.invoke(main, ["audit", transfer_file, "--against", str(tmp_path / "none.npz")])
    assert res.exit_code == 2 and "--against" in res.output and "no such file" in res.output
    res = runner.invoke(main, ["audit", transfer_file, "--against", owner[1]])
    assert res.exit_code == 2 and "give --test" in res.output
    with pytest.raises(DfkdError, match="--student needs --test"):
        audit(transfer_file, owner[0], student=load_teacher(
            Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5.pt"))
