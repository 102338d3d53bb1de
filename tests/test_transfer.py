"""The privacy split: synthesize -> transfer .npz -> distill --transfer-data, with and without the teacher."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd import outpaths, transfer_parts
from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.engine import distill, resume
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.methods._recipes import recipe_lines
from dfkd.methods.transfer import NoTeacher
from dfkd.modelfile import load_model
from dfkd.models import create
from dfkd.spec import MNIST_SPEC, InputSpec
from dfkd.students import build_student
from dfkd.synthesis import spread
from dfkd.teacher import Teacher, load_teacher
from dfkd.transfer import check_teacher_fits, from_pixels, load_transfer, save_transfer, synthesize
from tests.conftest import KWARGS, make_teacher_module


def agreement(student: torch.nn.Module, teacher: Teacher, x: torch.Tensor) -> float:
    student.eval()
    with torch.no_grad():
        return (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()


# --- the file -----------------------------------------------------------------------------------------------------
def test_file_holds_images_soft_labels_and_spec(transfer_file: str, sharp_teacher_file: str) -> None:
    with np.load(transfer_file, allow_pickle=False) as d:
        assert d["x"].dtype == np.uint8 and d["x"].shape == (256, 1, 32, 32)
        assert (int(d["channels"]), int(d["size"])) == (1, 32)
        assert np.allclose(d["mean"], MNIST_SPEC.mean) and np.allclose(d["std"], MNIST_SPEC.std)
        assert str(d["method"]) == "zskd" and int(d["num_classes"]) == 10
        assert np.array_equal(d["y"], d["probs"].argmax(1))
    data = load_transfer(transfer_file)
    teacher = load_teacher(sharp_teacher_file)
    assert data.spec == MNIST_SPEC and data.teacher_sha256 == teacher.sha256
    with torch.no_grad():  # the labels belong to exactly the stored (8-bit) pixels
        expected = torch.softmax(teacher(from_pixels(data.x, data.spec)), 1)
    assert torch.allclose(data.probs, expected, atol=1e-5)
    assert torch.allclose(torch.softmax(data.logits(torch.arange(4)), 1), data.probs[:4], atol=1e-6)


def test_generator_method_is_trained_then_sampled(teacher_file: str, tmp_path: Path) -> None:
    data = synthesize(load_teacher(teacher_file), "dfad", 20, tmp_path / "g.npz", params={"batch_size": 8}, steps=2)
    assert len(data) == 20 and data.method == "dfad"


def test_bad_requests_are_clear_errors(teacher_file: str, tmp_path: Path) -> None:
    t = load_teacher(teacher_file)
    with pytest.raises(DfkdError, match="cannot make one"):
        synthesize(t, "transfer", 8, tmp_path / "a.npz")
    with pytest.raises(DfkdError, match="positive"):
        synthesize(t, "zskd", 0, tmp_path / "a.npz")
    assert not (tmp_path / "a.npz").exists()


def test_a_second_synthesize_of_one_file_is_refused_while_the_first_runs(teacher_file: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # the second took the first's live parts as its own to resume; both assembled into one .tmp name, and the first
    # said "wrote" of a truncated file
    t, out = load_teacher(teacher_file), tmp_path / "a.npz"
    make = functools.partial(synthesize, t, "dfad", 40, out, params={"batch_size": 8}, steps=1)
    with monkeypatch.context() as m:
        m.setattr("dfkd.synthesis._collect", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            make()  # stopped: its parts folder stays, as a running synthesis's does
    folder = transfer_parts.parts_folder(out)
    with outpaths.folder_lock(folder, "the first process"):
        with pytest.raises(DfkdError, match=rf"--out {out}: process {os.getpid()} is making this file"):
            make()
        with pytest.raises(DfkdError, match=rf"--out {out}: process {os.getpid()} is making this file"):
            synthesize(t, "dfad", 40, out, params={"batch_size": 8}, steps=1, seed=5)  # not "delete the folder"
    assert not out.exists()
    assert len(make()) == 40 and not folder.exists()


def test_a_file_the_disk_cannot_hold_is_refused_before_work(teacher_file: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # a --num no disk holds was started and failed when the disk filled, hours later; 40 images of 1x32x32 with
    # 10 labels take 2 x 40 x 1,072 bytes
    monkeypatch.setattr(transfer_parts.shutil, "disk_usage", lambda p: SimpleNamespace(free=80_000))
    with pytest.raises(DfkdError, match=rf"--num 40: the images need about 84 KiB on disk at {tmp_path} \(the "
                                        r"parts, then the file made from them\) and 78 KiB are free"):
        synthesize(load_teacher(teacher_file), "dfad", 40, tmp_path / "a.npz", params={"batch_size": 8}, steps=1)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(transfer_parts.shutil, "disk_usage", lambda p: SimpleNamespace(free=90_000))
    assert len(synthesize(load_teacher(teacher_file), "dfad", 40, tmp_path / "a.npz", params={"batch_size": 8},
                          steps=1)) == 40


@pytest.mark.parametrize("damage,match", [
    ("missing", "no such file"), ("truncate", "truncated or corrupt"), ("plain", "not a dfkd transfer file"),
    ("probs", "probability row"), ("shape", "uint8 of shape"), ("names", "recorded class names are damaged"),
])
def test_corrupt_or_wrong_files_are_clear_errors(transfer_file: str, tmp_path: Path, damage: str, match: str) -> None:
    path = tmp_path / "bad.npz"
    data = load_transfer(transfer_file)
    if damage == "truncate":
        path.write_bytes(Path(transfer_file).read_bytes()[:500])
    elif damage == "plain":
        np.savez(path, x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, np.int64))
    elif damage == "probs":
        save_transfer(path, data.x, data.probs * 2, data.spec, "zskd", "")
    elif damage == "shape":
        save_transfer(path, data.x, data.probs, InputSpec(3, 32, (0.5,), (0.5,)), "zskd", "")
    elif damage == "names":  # two names for ten classes: a student would record them and read folders by them
        save_transfer(path, data.x, data.probs, data.spec, "zskd", "", {"teacher": {"class_names": ["a", "b"]}})
    with pytest.raises(DfkdError, match=match):
        load_transfer(path)


def test_mismatched_teacher_and_config_are_clear_errors(transfer_file: str, teacher_file: str, tmp_path: Path) -> None:
    data = load_transfer(transfer_file)
    colour = Teacher(create("lenet5_bn", num_classes=10, in_channels=3, input_size=32).eval(),
                     InputSpec(3, 32, (0.5,), (0.5,)), source="rgb.pt")
    with pytest.raises(DfkdError, match="takes 3x32x32 images"):
        check_teacher_fits(colour, data)
    other = Teacher(make_teacher_module(seed=5), MNIST_SPEC, source="other.pt", sha256="ab" * 32)
    with pytest.warns(UserWarning, match="made from another teacher "):
        check_teacher_fits(other, data)
    base = {"transfer_data": transfer_file, "steps": 2, "fid_every": 0, "out": str(tmp_path / "r")}
    with pytest.raises(DfkdError, match="needs --student"):
        distill(DistillConfig(method="transfer", **base))
    with pytest.raises(DfkdError, match="drop --method"):
        distill(DistillConfig(method="dfad", student="lenet5_half", **base))
    with pytest.raises(DfkdError, match="give --transfer-data"):
        get_method("transfer")(NoTeacher(data), build_student("lenet5_half", KWARGS), get_method(
            "transfer").default_params(), torch.device("cpu"))
    # the teacher's features: the advice was "use --feature-loss sp/rkd" (which failed too) or "save it as a model"
    for params, flag in (({"feature_loss": "at"}, "--feature-loss at"), ({"feature_loss": "sp"}, "--feature-loss sp"),
                         ({"discriminator": "features"}, "--discriminator features")):
        with pytest.raises(DfkdError, match=f"^{flag}: a --transfer-data run without --teacher has no teacher "
                                            "features to match; add --teacher FILE"):
            distill(DistillConfig(method="transfer", student="lenet5_half", params=params, **base))
    with pytest.raises(DfkdError, match="^--student-init teacher: a --transfer-data run without --teacher has no "
                                        "teacher weights"):  # the student started at random, unsaid
        distill(DistillConfig(method="transfer", student="lenet5_half", student_init="teacher", **base))
    assert not (tmp_path / "r").exists()
    # a run started so before that check goes on: its resume was refused, and so were both fixes the error named
    run = distill(DistillConfig(method="transfer", student="lenet5_half", **base)).run_dir
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["student_init"] = "teacher"
    torch.save(ckpt, run / "checkpoint.pt")
    assert resume(run, steps=3).step == 3
    with pytest.raises(DfkdError, match="the run has no --teacher .*a resume cannot add one"):  # "(; compared by"
        resume(run, steps=4, fixed={"teachers": (teacher_file,)})


# --- distilling from the file -----------------------------------------------------------------------------------
def test_student_from_file_alone_agrees_with_teacher(transfer_file: str, sharp_teacher_file: str,
                                                     tmp_path: Path) -> None:
    # Hidden from the run: the teacher file is elsewhere and the run never opens it.
    result = distill(DistillConfig(method="transfer", transfer_data=transfer_file, student="lenet5_half", steps=150,
                                   fid_every=0, out=str(tmp_path / "run"), params={"lr_s": 3e-3}))
    student, meta = load_model(result.run_dir / "student.pt")
    data = load_transfer(transfer_file)
    assert meta.input_spec == MNIST_SPEC and meta.provenance["teacher_sha256"] == data.teacher_sha256
    teacher = load_teacher(sharp_teacher_file)
    x = from_pixels(data.x, data.spec)
    fresh = build_student("lenet5_half", KWARGS)
    top = torch.bincount(data.probs.argmax(1), minlength=10).max().item() / len(data)
    got = agreement(student, teacher, x)
    assert got > max(top, agreement(fresh, teacher, x)) + 0.15, (got, top)


def test_recipe_line_of_a_run_from_the_file_alone_names_the_files_recipe(transfer_file: str,
                                                                           sharp_teacher_file: str) -> None:
    # It said "teacher 1x32x32 inputs (mnist kind), 0 parameters; method transfer has no CPU recipe".
    cls = get_method("transfer")
    alone = NoTeacher(load_transfer(transfer_file))
    line = recipe_lines(cls, alone, cls.default_params(alone))[0]
    assert "transfer file records" in line and "0 parameters" not in line, line
    teacher = load_teacher(sharp_teacher_file)
    assert "with --teacher" in recipe_lines(cls, teacher, cls.default_params(teacher))[0]


def test_teacher_given_recomputes_logits(transfer_file: str, sharp_teacher_file: str) -> None:
    teacher = load_teacher(sharp_teacher_file)
    cls = get_method("transfer")
    params = {**cls.default_params(teacher), **cls.quick, "transfer_data": transfer_file}
    method = cls(teacher, build_student("lenet5_half", KWARGS), params, torch.device("cpu"))
    method.round()
    with torch.no_grad():
        assert torch.allclose(method.last_logits, teacher(method.last_images))
    assert all(p.grad is None for p in teacher.parameters())


def test_state_round_trip_and_resume_refuses_a_changed_file(transfer_file: str, tmp_path: Path) -> None:
    data = load_transfer(transfer_file)
    cls = get_method("transfer")
    params = {**cls.default_params(), **cls.quick, "transfer_data": transfer_file}

    def build(seed: int):
        torch.manual_seed(seed)
        return cls(NoTeacher(data), build_student("lenet5_half", KWARGS), params, torch.device("cpu"))

    a = build(1)
    a.round()
    b = build(2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    torch.manual_seed(3)
    la = a.round()
    torch.manual_seed(3)
    assert la == b.round()
    state = a.state_dict()
    state["extra"]["data_sha256"] = "0" * 64
    with pytest.raises(DfkdError, match="changed since"):
        build(4).load_state_dict(state)


def test_resume_a_transfer_run(transfer_file: str, tmp_path: Path) -> None:
    local = tmp_path / "t.npz"
    shutil.copy(transfer_file, local)
    cfg = DistillConfig(method="transfer", transfer_data=str(local), student="lenet5_half", steps=40, fid_every=0,
                        ckpt_every=20, log_every=10, out=str(tmp_path / "full"), params={"s_steps": 10},
                        deterministic=True)
    full = distill(cfg)
    cls = get_method("transfer")
    original, calls = cls.round, {"n": 0}

    def dying_round(self):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 4:  # step 30 is logged, the last checkpoint is step 20's
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "round", dying_round)
        with pytest.raises(KeyboardInterrupt):
            distill(dataclasses.replace(cfg, out=str(tmp_path / "run")))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 20
    assert resume(tmp_path / "run").step == 40
    a = torch.load(full.run_dir / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run equals the uninterrupted one"


# --- the command line -----------------------------------------------------------------------------------------------
def test_cli_round_trip(teacher_file: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "transfer.npz"
    res = runner.invoke(main, ["synthesize", "--teacher", teacher_file, "--method", "zskd", "--num", "24", "--out",
                               str(out), "-p", "di_batch=8", "-p", "di_iters=2", "-p", "s_steps=0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "24 images" in res.output and out.exists()
    res = runner.invoke(main, ["distill", "--transfer-data", str(out), "--steps", "4", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "needs --student" in res.output
    res = runner.invoke(main, ["distill", "--transfer-data", str(out), "--student", "lenet5_half", "--steps", "4",
                               "--fid-every", "0", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "student.pt").exists()
    res = runner.invoke(main, ["distill", "--transfer-data", str(tmp_path / "nope.npz"), "--student", "lenet5_half"])
    assert res.exit_code == 2 and "no such file" in res.output


def test_another_teacher_is_named_by_every_member_of_an_ensemble() -> None:
    # an ensemble's hash is its members' joined: the warning showed the first twelve characters only, the same as the
    # file's when that member made it ("sha256 a4fa290a23f2..., --teacher is a4fa290a23f2...")
    data = SimpleNamespace(spec=MNIST_SPEC, num_classes=10, teacher_sha256="a" * 64, path="t.npz")
    ensemble = SimpleNamespace(spec=MNIST_SPEC, num_classes=10, sha256="a" * 64 + "," + "b" * 64, source="a.pt,b.pt")
    with pytest.warns(UserWarning, match=r"made from another teacher \(sha256 a{12}\.\.\., --teacher is a{12}\.\.\. "
                                         r"\+ b{12}\.\.\.\)"):
        check_teacher_fits(ensemble, data)


def test_a_cut_batch_keeps_every_class_it_can() -> None:
    # DeepInversion's batch of 256 targets holds the classes in blocks: --num 200 kept its first 200, classes 0-7
    blocks = torch.nn.functional.one_hot(torch.arange(256) * 10 // 256, 10).float()
    keep = spread(blocks, 200)
    assert len(keep) == 200 and keep.tolist() == sorted(keep.tolist())
    assert torch.bincount(blocks[keep].argmax(1), minlength=10).tolist() == [20] * 10
    assert spread(blocks, 300).tolist() == list(range(256))
    few = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0, 1]), 3).float()  # a class with fewer images: all kept
    assert spread(few, 3).tolist() == [0, 1, 4]
