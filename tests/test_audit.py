"""`dfkd audit`: copies of training images in a transfer file are flagged and shown; synthetic images pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import KWARGS, make_teacher_module
from PIL import Image

import dfkd.audit
from dfkd.audit import audit, nearest, real_pixels
from dfkd.cli.main import main
from dfkd.data import ImageData, load_images
from dfkd.errors import DfkdError
from dfkd.membership import auc, loss_threshold_auc
from dfkd.modelfile import ModelFile, save_model
from dfkd.models import create
from dfkd.spec import CIFAR10_SPEC, MNIST_SPEC
from dfkd.teacher import Teacher, load_teacher
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
    assert r.n_train == 3000 and r.feature is None and "1000 images of --against against the rest" in r.text()
    # the held-out images were left out of the search too: copies of them went unseen (a file of them PASSed), and
    # a copy named its index in the shuffled rest, not in --against
    assert r.verdict == "FAIL" and sorted(r.pixel.flagged.tolist()) == [100, 101, 102, 103]
    assert [int(r.pixel.idx[i]) for i in [100, 101, 102, 103]] == COPIED
    held = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:1000]
    assert set(COPIED) & set(held.tolist())  # the case that went unseen: a copy of a held-out image


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
    res = runner.invoke(main, ["audit", str(tmp_path), "--against", owner[0]])  # a folder was "no such file"
    assert res.exit_code == 2 and "is a folder; give a transfer .npz file" in res.output
    res = runner.invoke(main, ["audit", transfer_file, "--against", str(tmp_path / "none.npz")])
    assert res.exit_code == 2 and "--against" in res.output and "no such file" in res.output
    res = runner.invoke(main, ["audit", transfer_file, "--against", owner[1]])
    assert res.exit_code == 2 and "give --test" in res.output
    with pytest.raises(DfkdError, match="--student needs --test"):
        audit(transfer_file, owner[0], student=load_teacher(
            Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5.pt"))


def _npz(path: Path, x: np.ndarray) -> str:
    np.savez(path, x=x, y=np.arange(len(x)) % 10)
    return str(path)


def test_test_that_overlaps_against_is_refused(leaky_file: str, owner: tuple[str, str], tmp_path: Path) -> None:
    # --test = --against: every held-out distance is 0, the threshold 0, and the copies in the file would PASS.
    with pytest.raises(DfkdError, match=r"--test .*train\.npz: 3000 of its 3000 images are also in --against .*"
                                        r"held out of training"):
        audit(leaky_file, owner[0], test=owner[0], png=tmp_path / "p.png")
    train, test = np.load(owner[0])["x"], np.load(owner[1])["x"]
    overlap = _npz(tmp_path / "overlap.npz", np.concatenate([train[:20], test[20:]]))  # 2 % of --test
    with pytest.raises(DfkdError, match="20 of its 1000 images are also in --against"):
        audit(leaky_file, owner[0], test=overlap, png=tmp_path / "p.png")
    # Without --test, an --against full of duplicates gives the held-out split the same zero baseline.
    doubled = _npz(tmp_path / "doubled.npz", np.concatenate([train[:1500], train[:1500]]))
    with pytest.raises(DfkdError, match=r"--against .*doubled\.npz: \d+ of the 1000 images held out .* duplicates"):
        audit(leaky_file, doubled, png=tmp_path / "p.png")


def test_a_few_duplicates_are_left_out_of_the_baseline(leaky_file: str, owner: tuple[str, str],
                                                       tmp_path: Path) -> None:
    train, test = np.load(owner[0])["x"], np.load(owner[1])["x"]
    few = _npz(tmp_path / "few.npz", np.concatenate([train[:5], test[5:]]))  # 0.5 %: real datasets hold a few
    clean = _npz(tmp_path / "clean.npz", test[5:])
    r, c = audit(leaky_file, owner[0], test=few, png=tmp_path / "p.png"), audit(leaky_file, owner[0], test=clean,
                                                                                png=tmp_path / "p.png")
    assert "5 identical to training images left out" in r.text() and r.verdict == "FAIL"
    assert r.pixel.threshold == c.pixel.threshold and len(r.pixel.baseline) == 995


def test_png_path_is_checked_before_the_audit(transfer_file: str, owner: tuple[str, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*a: object) -> None:
        raise AssertionError("the audit ran before --png was checked")

    monkeypatch.setattr(dfkd.audit, "_pixel_space", no_work)
    (tmp_path / "notes.txt").write_text("a file")
    for png, msg in [(tmp_path, "is a directory"), (tmp_path / "notes.txt" / "a.png", "notes.txt is a file, not a"),
                     (tmp_path / "nowhere" / "a.png", "does not exist"), (tmp_path / "a.foo", "PIL writes no '.foo'")]:
        with pytest.raises(DfkdError, match=f"--png {png}: .*{msg}"):
            audit(transfer_file, owner[0], test=owner[1], png=png)


def test_empty_image_sets_and_wrong_channels_are_named(transfer_file: str, owner: tuple[str, str],
                                                        tmp_path: Path) -> None:
    empty = _npz(tmp_path / "empty.npz", np.zeros((0, 28, 28), np.uint8))
    runner = CliRunner()
    for args, flag in [(["--against", empty, "--test", owner[1]], "--against"),
                       (["--against", owner[0], "--test", empty], "--test")]:
        res = runner.invoke(main, ["audit", transfer_file, *args, "--png", str(tmp_path / "a.png")])
        assert res.exit_code == 2 and f"error: {flag} {empty}: holds no images" in res.output, res.output
    five = _npz(tmp_path / "five.npz", np.zeros((50, 5, 32, 32), np.uint8))  # averaged to one channel, PASSed
    for args, flag in [(["--against", five, "--test", owner[1]], "--against"),
                       (["--against", owner[0], "--test", five], "--test")]:
        res = runner.invoke(main, ["audit", transfer_file, *args, "--png", str(tmp_path / "a.png")])
        assert res.exit_code == 2 and f"error: {flag} {five}: images have 5 channels" in res.output, res.output


def test_teacher_of_other_input_shape_is_refused(transfer_file: str, owner: tuple[str, str], tmp_path: Path) -> None:
    rgb = Teacher(create("lenet5_bn", **{**KWARGS, "in_channels": 3}), CIFAR10_SPEC, source="rgb.pt")
    with pytest.raises(DfkdError, match=r"--teacher rgb\.pt: takes 3x32x32 inputs, but TRANSFER .* holds 1x32x32"):
        audit(transfer_file, owner[0], rgb, owner[1], png=tmp_path / "p.png")


def test_broken_student_is_named_student(transfer_file: str, owner: tuple[str, str], tmp_path: Path) -> None:
    m = make_teacher_module("lenet5")
    with torch.no_grad():
        m.classifier.weight.fill_(float("nan"))
    save_model(tmp_path / "nan.pt", m, ModelFile("lenet5", KWARGS, MNIST_SPEC, 10))
    res = CliRunner().invoke(main, ["audit", transfer_file, "--against", owner[0], "--test", owner[1], "--student",
                                    str(tmp_path / "nan.pt"), "--png", str(tmp_path / "a.png")])
    assert res.exit_code == 2 and f"error: --student {tmp_path / 'nan.pt'}: gives non-finite" in res.output, res.output


def test_student_of_fewer_classes_is_refused(transfer_file: str, owner: tuple[str, str], tmp_path: Path) -> None:
    # a 5-class student against 0-9 labels: "IndexError: Target 9 is out of bounds"
    five = Path(__file__).resolve().parents[1] / "examples" / "mnist04_lenet5_bn.pt"
    res = CliRunner().invoke(main, ["audit", transfer_file, "--against", owner[0], "--test", owner[1], "--student",
                                    str(five), "--png", str(tmp_path / "a.png")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: --student {five}: has 5 classes, but --against {owner[0]} has labels 0..9" in res.output
    assert not (tmp_path / "a.png").exists()


def test_a_file_of_the_users_is_never_overwritten(transfer_file: str, owner: tuple[str, str], tmp_path: Path) -> None:
    photo, own = tmp_path / "my_photo.png", tmp_path / "pairs.png"
    Image.new("L", (4, 4), 7).save(photo)
    before = photo.read_bytes()
    with pytest.raises(DfkdError, match=f"--png {photo}: already exists .* give --png ANOTHER.png or remove it"):
        audit(transfer_file, owner[0], test=owner[1], png=photo)
    assert photo.read_bytes() == before
    audit(transfer_file, owner[0], test=owner[1], png=own)
    audit(transfer_file, owner[0], test=owner[1], png=own)  # its own picture, of the same file: drawn again
    other = tmp_path / "other.npz"
    other.write_bytes(Path(transfer_file).read_bytes())
    with pytest.raises(DfkdError, match="already exists and is not a picture dfkd drew from this input"):
        audit(str(other), owner[0], test=owner[1], png=own)
    # ... nor by another file of the same name in another folder (a picture beside its input is known by the name,
    # so that a moved folder keeps its pictures; one elsewhere only by the input's path)
    (tmp_path / "d2").mkdir()
    same_name = tmp_path / "d2" / Path(transfer_file).name
    same_name.write_bytes(Path(transfer_file).read_bytes())
    with pytest.raises(DfkdError, match="already exists and is not a picture dfkd drew from this input"):
        audit(str(same_name), owner[0], test=owner[1], png=own)
