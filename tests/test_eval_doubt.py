"""Evaluation data the teacher does not recognise is said, not silently scored: its size change and a warning."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd.cli.main import main
from dfkd.data import load_images
from dfkd.evaluate import data_doubt, doubtful_top1, size_note
from dfkd.spec import InputSpec

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "examples" / "mnist_lenet5.pt")  # 99.21 % on MNIST, recorded in the file


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """500 MNIST test images as they are (28 px), padded to 64 px, and padded sideways to 28x56 (height x width)."""
    d = np.load(ROOT / "examples" / "mnist_test.npz")
    x, y = d["x"][:500], d["y"][:500]
    root = tmp_path_factory.mktemp("mnist")
    padded = np.zeros((len(x), 64, 64), np.uint8)
    padded[:, 18:46, 18:46] = x
    wide = np.zeros((len(x), 28, 56), np.uint8)
    wide[:, :, 14:42] = x
    files = {"plain": x, "padded": padded, "wide": wide}
    for name, images in files.items():
        np.savez(root / f"{name}.npz", x=images, y=y)
    return {name: str(root / f"{name}.npz") for name in files}


def test_size_note_says_resized_or_stretched(mnist: dict[str, str]) -> None:
    spec = InputSpec(1, 32, (0.5,), (0.5,))
    assert size_note(load_images(mnist["plain"]), spec) == "28x28 resized to 32x32"
    assert size_note(load_images(mnist["wide"]), spec) == "28x56 stretched to 32x32"
    tall = InputSpec(1, 56, (0.5,), (0.5,), width=28)  # --input-size 56x28: height x width, as the note reads
    assert size_note(load_images(mnist["wide"]), tall) == "28x56 stretched to 56x28"
    assert size_note(load_images(mnist["plain"]), InputSpec(1, 28, (0.5,), (0.5,))) == ""
    # a channel conversion was done unsaid (colour images averaged for a grey teacher)
    grey = load_images(mnist["plain"])
    colour = replace(grey, x=grey.x.expand(-1, 3, -1, -1))
    assert size_note(colour, spec) == "colour averaged to grey, 28x28 resized to 32x32"
    assert size_note(grey, InputSpec(3, 28, (0.5,) * 3, (0.5,) * 3)) == "grey repeated to 3 channels"


@pytest.mark.parametrize(("top1", "k", "recorded", "warns"), [
    (0.30, 10, None, True), (0.40, 10, None, False), (0.55, 2, None, True), (0.70, 2, None, False),
    (0.003, 1000, None, True), (0.30, 1000, None, False),  # a weak teacher of many classes is not doubted
    (0.93, 10, 0.9921, True), (0.95, 10, 0.9921, False)])  # 5 points under its file's own record
def test_doubt_near_chance_or_far_under_the_record(top1: float, k: int, recorded: float | None,
                                                   warns: bool) -> None:
    got = data_doubt(top1, k, "--eval-data", "x.npz", "", recorded)
    assert (got is not None) == warns
    if warns:
        assert f"{100 * top1:.2f}%" in got and "x.npz" in got
        assert ("its file records 99.21%" in got) == (recorded is not None and top1 > doubtful_top1(k))


def test_evaluate_warns_on_padded_data_and_not_on_its_own(mnist: dict[str, str]) -> None:
    res = CliRunner().invoke(main, ["evaluate", "--model", DEMO, "--data", mnist["padded"]])
    assert res.exit_code == 0, res.output
    assert "warning: the model answers only" in res.output and "64x64 resized to 32x32" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--model", DEMO, "--data", mnist["wide"]])
    assert "its file records 99.21%" in res.output and "28x56 stretched to 32x32" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--model", DEMO, "--data", mnist["plain"]])
    assert res.exit_code == 0 and "warning" not in res.output
    assert "(500 images, 28x28 resized to 32x32)" in res.output


def _distill(teacher: str, data: str, out: Path) -> str:
    res = CliRunner().invoke(main, ["distill", "--teacher", teacher, "--method", "dfad", "--steps", "1", "-p",
                                    "batch_size=8", "--fid-every", "0", "--eval-data", data, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return res.output


def test_a_run_says_the_teachers_top1_and_warns_on_data_it_does_not_know(mnist: dict[str, str],
                                                                         tmp_path: Path) -> None:
    out = _distill(DEMO, mnist["padded"], tmp_path / "padded")
    assert "teacher on --eval-data: top-1" in out and "warning: the teacher answers only" in out
    events = [json.loads(a) for a in (tmp_path / "padded" / "metrics.jsonl").read_text().splitlines()]
    doubts = [e for e in events if e.get("event") == "eval_doubt"]
    assert len(doubts) == 1 and "64x64 resized to 32x32" in doubts[0]["message"]
    report = CliRunner().invoke(main, ["report", str(tmp_path / "padded")]).output
    assert "warning:  step 0: the teacher answers only" in report

    out = _distill(DEMO, mnist["plain"], tmp_path / "plain")
    assert "teacher on --eval-data: top-1 99." in out and "(500 images, 28x28 resized to 32x32)" in out
    assert "the teacher answers only" not in out
    events = (tmp_path / "plain" / "metrics.jsonl").read_text()
    assert "eval_doubt" not in events


def test_synthesize_warns_before_recording_a_doubtful_teacher_top1(mnist: dict[str, str], tmp_path: Path) -> None:
    """The transfer file's provenance records the teacher's top-1 on --eval-data: a doubtful one is said."""
    with pytest.warns(UserWarning, match="the teacher answers only .* 64x64 resized to 32x32"):
        res = CliRunner().invoke(main, ["synthesize", "--teacher", DEMO, "--method", "dfad", "--num", "8", "--steps",
                                        "0", "--eval-data", mnist["padded"], "--out", str(tmp_path / "t.npz")])
    assert res.exit_code == 0, res.output
    # the file says so too: it recorded the teacher at chance, with no caveat, for good
    report = CliRunner().invoke(main, ["report", str(tmp_path / "t.npz")]).output
    assert "near chance: likely not data of this teacher" in report, report


def test_a_resume_with_other_eval_data_checks_the_teacher_on_it(mnist: dict[str, str], tmp_path: Path) -> None:
    _distill(DEMO, mnist["plain"], tmp_path / "run")
    res = CliRunner().invoke(main, ["distill", "--resume", str(tmp_path / "run"), "--steps", "2", "--eval-data",
                                    mnist["padded"]])
    assert res.exit_code == 0, res.output
    assert "warning: the teacher answers only" in res.output
    events = [json.loads(a) for a in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "eval_doubt"] == [1]
    assert [e["step"] for e in events if "student/teacher_top1" in e] == [0, 1]


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST 0, 1, 2 as image folders named zero/one/two (train: 100 each), a test folder without "one", one with a
    class the model never had, a new class "three" and a test folder of zero, two and three."""
    from PIL import Image

    d = np.load(ROOT / "examples" / "mnist_test.npz")
    root = tmp_path_factory.mktemp("folders")
    names = {0: "zero", 1: "one", 2: "two", 3: "three"}
    for split, classes, first in (("train", (0, 1, 2), 0), ("test", (0, 2), 2000), ("odd", (0, 2), 2000),
                                  ("new", (3,), 0), ("test4", (0, 2, 3), 2000)):
        for c in classes:
            folder = root / split / (names[c] if split != "odd" or c != 2 else "nine")
            folder.mkdir(parents=True)
            for i, img in enumerate(d["x"][first:][d["y"][first:] == c][:100]):
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def test_image_folders_are_labelled_by_the_models_class_names(digit_folders: Path, tmp_path: Path) -> None:
    """A test folder without one of the training folder's classes was labelled by position ("two" as class 0, the
    model's "one"; "zero" as class 1, its "two"), and the teacher scored 0 %. By name, as it should."""
    with pytest.warns(UserWarning, match="class folders are read by name"):  # train-teacher's --eval-data too
        res = CliRunner().invoke(main, ["train-teacher", "--data", str(digit_folders / "train"), "--arch", "lenet5_bn",
                                        "--epochs", "5", "--batch-size", "16", "--eval-data",
                                        str(digit_folders / "test"), "--precision", "fp32", "--out",
                                        str(tmp_path / "t.pt")])
    assert res.exit_code == 0, res.output
    with pytest.warns(UserWarning, match="class folders are read by name"):
        out = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "t.pt"), "--data",
                                        str(digit_folders / "test"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["top1"] > 0.9
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "t.pt"), "--data",
                                    str(digit_folders / "odd")])
    assert res.exit_code == 2 and "class folder(s) nine name no class of the model" in res.output

    # dfkd extend: the test folder (three, two, zero in sorted order) is read as the extended model's 0..3 by name
    with pytest.warns(UserWarning, match="class folders are read by name"):
        res = CliRunner().invoke(main, ["extend", "--teacher", str(tmp_path / "t.pt"), "--data",
                                        str(digit_folders / "new"), "--eval-data", str(digit_folders / "test4"),
                                        "--out", str(tmp_path / "x.pt"), "--replay", "32", "--steps", "5",
                                        "--batch-size", "16", "--device", "cpu", "-p", "batch_size=16", "-p",
                                        "synth_batch_size=16", "-p", "iterations=2"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "x.extend" / "report.json").read_text())
    assert report["teacher"]["old"] > 0.9  # by position "three" was read as old class 0 ("one"): 67 %
    assert torch.load(tmp_path / "x.pt", weights_only=True)["class_names"] == ["one", "two", "zero", "three"]


def test_a_student_of_a_transfer_file_keeps_the_teachers_class_names(digit_folders: Path, tmp_path: Path) -> None:
    """The transfer file did not carry the names: its student read the test folder by position ("two" as class 0)
    and scored 11 % while agreeing with the teacher on 97 %; `evaluate --teacher` scored the teacher so too."""
    res = CliRunner().invoke(main, ["train-teacher", "--data", str(digit_folders / "train"), "--arch", "lenet5_bn",
                                    "--epochs", "5", "--batch-size", "16", "--precision", "fp32", "--out",
                                    str(tmp_path / "t.pt")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["synthesize", "--teacher", str(tmp_path / "t.pt"), "--method", "zskd", "--num",
                                    "16", "-p", "s_steps=0", "-p", "di_iters=2", "-p", "di_batch=8", "--out",
                                    str(tmp_path / "s.npz")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["distill", "--transfer-data", str(tmp_path / "s.npz"), "--student",
                                    "lenet5_half", "--steps", "2", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    student = tmp_path / "run" / "student.pt"
    assert torch.load(student, weights_only=True)["class_names"] == ["one", "two", "zero"]
    # a student without names (an older file's) is scored with the folder read as its teacher names the classes
    payload = torch.load(student, weights_only=True)
    payload["class_names"] = None
    torch.save(payload, tmp_path / "nameless.pt")
    with pytest.warns(UserWarning, match="class folders are read by name"):
        out = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "nameless.pt"), "--teacher",
                                        str(tmp_path / "t.pt"), "--data", str(digit_folders / "test"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["teacher_top1"] > 0.9  # by position 0 %
    payload["class_names"] = ["two", "one", "zero"]
    torch.save(payload, tmp_path / "other.pt")
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "other.pt"), "--teacher",
                                    str(tmp_path / "t.pt"), "--data", str(digit_folders / "test")])
    assert res.exit_code == 2 and "class i of one is not class i of the other" in res.output
