"""`--method crossmodal`: paired files, the helper that makes them, learning modality B, resuming, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dfkd.engine
from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.data import load_images
from dfkd.engine import distill, resume
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy
from dfkd.modelfile import load_model
from dfkd.paired import load_paired, make_paired, to_modality
from dfkd.teacher import load_teacher
from tests.test_lifelong import train_toy_teacher, write


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("xm")
    train, test = write(d / "train.npz", range(4), 512, 11), write(d / "test.npz", range(4), 200, 12)
    make_paired(train, "edges", d / "pairs.npz")
    make_paired(test, "edges", d / "edges_test.npz", student_only=True)
    return {"teacher": train_toy_teacher(d / "t.pt", 4), "pairs": str(d / "pairs.npz"),
            "b_test": str(d / "edges_test.npz"), "a_test": test}


FAST = {"batch_size": 32, "s_optimizer": "adam", "lr_s": 2e-3, "schedule": "constant", "select_every": 0}


def run(files: dict[str, str], out: Path, steps: int, **params: object) -> DistillConfig:
    return DistillConfig(teachers=(files["teacher"],), method="crossmodal", data=files["pairs"], steps=steps,
                         out=str(out), eval_data=files["b_test"], fid_every=0, eval_every=1000, ckpt_every=5,
                         deterministic=True, params={**FAST, **params})


def test_make_paired_and_load(files: dict[str, str]) -> None:
    a, b = load_paired(files["pairs"])
    assert a.shape == b.shape == (512, 1, 28, 28) and a.dtype == b.dtype == torch.uint8
    assert not torch.equal(a, b) and torch.equal(b[:4], to_modality(a[:4], "edges"))
    grey = to_modality(torch.full((2, 3, 8, 8), 200, dtype=torch.uint8), "gray")
    assert grey.shape == (2, 1, 8, 8) and int(grey[0, 0, 0, 0]) == 200
    with np.load(files["b_test"]) as d:
        assert set(d.files) == {"x", "y"} and len(d["y"]) == 200


def test_student_learns_modality_b_from_the_teacher_on_a(files: dict[str, str], tmp_path: Path) -> None:
    teacher = load_teacher(files["teacher"])
    on_a = accuracy(teacher, load_images(files["a_test"]), teacher.spec, "cpu")["top1"]
    result = distill(run(files, tmp_path / "r", 60))
    assert on_a > 0.9
    assert result.metrics["top1"] > 0.85, result.metrics  # four classes: chance is 0.25
    student, meta = load_model(tmp_path / "r" / "student.pt")
    assert meta.provenance["method"] == "crossmodal"


def test_resume_continues_exactly(files: dict[str, str], tmp_path: Path) -> None:
    whole = distill(run(files, tmp_path / "a", 10))
    distill(run(files, tmp_path / "b", 5))
    resumed = resume(tmp_path / "b", steps=10)
    assert resumed.step == whole.step == 10
    a, b = (load_model(p / "student.pt")[0].state_dict() for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_feature_loss_applies_across_modalities(files: dict[str, str]) -> None:
    from dfkd.methods import get_method
    from dfkd.students import build_student

    teacher = load_teacher(files["teacher"])
    cls = get_method("crossmodal")
    params = {**cls.default_params(teacher), "data": files["pairs"], "batch_size": 8, "feature_loss": "fitnet"}
    student = build_student("lenet5_half", {"num_classes": 4, "in_channels": 1, "input_size": 32})
    method = cls(teacher, student, params, torch.device("cpu"))
    logs = method.round()
    assert logs["student/fitnet"] > 0 and logs["student/total"] > logs["student/kd"]
    method.close()


def test_pairs_stay_aligned_when_a_rank_keeps_a_slice() -> None:
    from dfkd.methods.crossmodal import PairedData
    from dfkd.spec import InputSpec

    spec = InputSpec(1, 8, (0.0,), (1.0,))
    ids = torch.arange(20, dtype=torch.uint8)
    a = ids.view(20, 1, 1, 1).expand(20, 1, 8, 8).contiguous()  # pair i: A and B are both the constant i
    b = ids.view(20, 1, 1, 1).expand(20, 3, 8, 8).contiguous()
    data = PairedData(a, b, spec, 8, torch.device("cpu"))
    data.data = type(data.data)(data.data.x[1::2], data.data.y[1::2])  # what dfkd.sources does on rank 1 of 2
    xa, xb = data.pair(8)
    pa, pb = (x.mean((1, 2, 3)).mul(255).round() for x in (xa, xb))
    assert torch.equal(pa, pb) and (pa % 2 == 1).all()


def test_refusals(files: dict[str, str], tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x_teacher=np.zeros((3, 8, 8), np.uint8), x_student=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DfkdError, match="pairs need equal"):
        load_paired(tmp_path / "bad.npz")
    with pytest.raises(DfkdError, match="needs arrays 'x_teacher'"):
        load_paired(files["a_test"])
    np.savez(tmp_path / "float.npz", x_teacher=np.zeros((3, 8, 8), np.uint8), x_student=np.zeros((3, 8, 8)))
    with pytest.raises(DfkdError, match=r"'x_student' must be uint8 .* got float64 \(3, 8, 8\)$"):  # as stored
        load_paired(tmp_path / "float.npz")
    res = CliRunner().invoke(main, ["distill", "--teacher", files["teacher"], "--method", "crossmodal", "--steps",
                                    "2", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and res.output.startswith("error: method crossmodal learns from paired images")
    assert not (tmp_path / "x" / "student.pt").exists()


def test_clip_s_clips_the_students_gradient(files: dict[str, str]) -> None:
    from dfkd.build import build_method

    teacher = load_teacher(files["teacher"])
    m = build_method("crossmodal", teacher, {"data": files["pairs"], **FAST, "s_steps": 2, "clip_s": 1e-4},
                     torch.device("cpu"), seed=0).method
    logs = m.round()
    grads = torch.stack([p.grad.norm() for p in m.student.parameters() if p.grad is not None])
    assert float(torch.linalg.vector_norm(grads)) <= 1e-4 * 1.001 < logs["student/grad_norm"]
    m.close()


def test_the_teachers_top1_on_the_students_sensor_is_no_doubt_about_the_data(
        files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # --eval-data is modality B by design: "the teacher answers only 78% ... check that they are images of its task
    # ... the student's accuracy on them says little" was said of every cross-modal run
    monkeypatch.setattr(dfkd.engine, "data_doubt", lambda *a, **k: "the teacher answers only 30% of it")
    result = distill(run(files, tmp_path / "r", 2))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "teacher on --eval-data: top-1" in capsys.readouterr().err
    assert any("student/teacher_top1" in r for r in records) and not any(r.get("event") == "eval_doubt"
                                                                          for r in records)
