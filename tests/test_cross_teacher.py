"""The cross-teacher benchmark's bookkeeping (resume, table) and its custom teachers as dfkd loads them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd.spec import InputSpec
from dfkd.students import build_student, student_arch
from dfkd.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # bench/'s scripts, and bench.teacher_nets as dfkd imports it
import cross_teacher as ct  # noqa: E402

ACC = {"a": 0.90, "b": 0.80}


def _cell(teacher: str, method: str, top1: float | None, **kw) -> dict:
    cell = {"teacher": teacher, "method": method, "budget_min": 5.0, **kw}
    return cell if top1 is None else {**cell, "top1": top1}


def test_finished_cells_are_stored_and_skipped_failed_ones_retried(tmp_path: Path) -> None:
    cells = [_cell("a", "dfad", None), _cell("a", "zskt", None), _cell("b", "dfad", None),
             _cell("b", "adi", None, skipped="needs BatchNorm (the teacher has none)")]
    done = {**cells[0], "top1": 0.5, "marker": 1}
    ct._write_json(tmp_path / "cells" / f"{ct.cell_key('a', 'dfad', 5.0, False)}.json", done)
    ct._write_json(tmp_path / "cells" / f"{ct.cell_key('a', 'zskt', 5.0, False)}.json",
                   {**cells[1], "error": "boom"})
    (tmp_path / "cells" / f"{ct.cell_key('b', 'dfad', 5.0, False)}.json").write_text("{trunc")  # a killed write

    todo = ct.pending(list(cells), tmp_path, smoke=False, force=False)
    assert todo == [1, 2]
    merged = list(cells)
    ct.pending(merged, tmp_path, smoke=False, force=False)
    assert merged[0]["marker"] == 1
    assert ct.pending(list(cells), tmp_path, smoke=False, force=True) == [0, 1, 2]
    assert ct.pending(list(cells), tmp_path, smoke=True, force=False) == [0, 1, 2]  # smoke cells are others


def test_table_only_trains_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = ct.TEACHERS["fmnist_lenet5"]
    monkeypatch.setattr(ct, "TEACHERS", {t.name: dataclasses.replace(t, file=tmp_path / "gone.pt")})
    ct._write_json(tmp_path / "teachers.json", {f"{t.name}:1": 0.80, f"{t.name}:2": 0.90,
                                                f"{t.name}:student:lenet5_half:4": 0.85})
    cell = {**_cell(t.name, "fast", 0.855), "student": "lenet5_half"}
    ct._write_json(tmp_path / "cells" / f"{ct.cell_key(t.name, 'fast', 5.0, False)}.json", cell)
    (tmp_path / "runs" / f"{t.name}--fast--5min").mkdir(parents=True)
    (tmp_path / "runs" / f"{t.name}--fast--5min" / "config.json").write_text(json.dumps({"student": "lenet5_half"}))

    def no_subprocess(*a, **k):
        raise AssertionError(f"--table-only ran {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(sys, "argv", ["cross_teacher.py", "--table-only", "--teachers", t.name, "--methods", "fast",
                                      "--out", str(tmp_path)])
    ct.main()
    md = (tmp_path / "cross_teacher.md").read_text()
    assert f"| fast | 95.0 | 95.0 ({t.name}) |" in md, "the last stored teacher accuracy, 90 %"
    assert "lenet5_half 85.00 (94.4)" in md, "the stored real-label reference"


def test_worst_teacher_and_best_method_ignore_unrun_cells() -> None:
    cells = [_cell("a", "dfad", 0.81), _cell("b", "dfad", 0.60), _cell("a", "fast", 0.88), _cell("b", "fast", None,
             error="x"), _cell("b", "zskt", 0.72)]
    assert ct.worst_teacher(cells, ACC, "dfad") == ("b", pytest.approx(75.0))
    assert ct.worst_teacher(cells, ACC, "fast") == ("a", pytest.approx(100 * 0.88 / 0.90))
    assert ct.worst_teacher(cells, ACC, "adi") is None
    assert ct.best_method(cells, ACC, "b") == ("zskt", pytest.approx(90.0))
    table = ct.grid_table(cells, ACC, ["a", "b"], ["dfad", "fast", "zskt", "adi"]).splitlines()
    assert table[2] == "| dfad | 90.0 | 75.0 | 75.0 (b) |"
    assert table[3] == "| fast | 97.8 | error | 97.8 (a) |"
    assert table[4] == "| zskt |  | 90.0 | 90.0 (b) |"
    assert table[6] == "| **best method** | fast (97.8) | zskt (90.0) | |"
    assert all(line.count("|") == table[0].count("|") for line in table)


@pytest.mark.parametrize("value, text", [(94.97, "94.97"), (94.94, "94.9"), (95.04, "95.0"), (89.96, "89.96"),
                                         (99.46, "99.46"), (99.44, "99.4"), (94.9996, "94.999"), (80.0, "80.0")])
def test_a_cell_under_a_mark_never_reads_as_on_it(value: float, text: str) -> None:
    assert ct.pct_text(value) == text


def test_grid_and_auto_tables_show_a_near_miss_with_the_decimals_it_needs() -> None:
    acc = {"a": 0.90}
    cells = [_cell("a", "fast", 0.8547), _cell("a", "auto", 0.85473, picked="fast")]  # 94.97 % of the teacher
    grid = ct.grid_table(cells, acc, ["a"], ["fast", "auto"]).splitlines()
    assert grid[2] == "| fast | 94.97 | 94.97 (a) |"
    assert grid[3] == "| auto | 94.97 (fast) | 94.97 (a) |"
    assert grid[4] == "| **best method** | fast (94.97) | |"
    assert ct.auto_table(cells, acc, ["a"]).splitlines()[2] == "| a | fast | 94.97 | fast | 94.97 |"


def test_selection_verdict_compares_the_written_student_with_its_candidates() -> None:
    base = {"selected": "ema at step 900 (held-out agreement: ...)", "top1_raw": 0.70, "top1_ema": 0.80}
    assert ct.selection_ok({**base, "top1": 0.80, "top1_best": 0.805})
    assert not ct.selection_ok({**base, "top1": 0.80, "top1_best": 0.83})
    assert not ct.selection_ok({**base, "top1": 0.70})
    assert ct.selection_ok({"selected": "", "top1": 0.7, "top1_raw": 0.7, "top1_ema": 0.9}) is None  # no choice


def test_cell_table_reads_a_run_log(tmp_path: Path) -> None:
    records = [{"step": 0, "student/teacher_top1": 0.9},
               {"step": 400, "event": "collapse", "message": "the generator covers 1.2 of 10 classes"},
               {"step": 900, "event": "finished", "selected": "raw at step 900 (held-out agreement: ...)",
                "student/top1": 0.45, "student/top1_raw": 0.45, "student/top1_ema": 0.47, "student/top1_best": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    summary = ct.run_summary(tmp_path)
    assert summary["collapse"] and summary["collapse_step"] == 400 and summary["teacher_top1"] == 0.9
    row = ct.cell_table([{**_cell("a", "dfad", None), **summary, "steps": 900}], ACC).splitlines()[2]
    assert row == "| a | dfad | 5 min | 45.00 | 50.0 | 45.00 / 47.00 / 60.00 | no | yes (step 400) | 900 | - |"
    coded = ct.cell_table([{**_cell("a", "dfad", None), **summary, "steps": 900, "code": "abc1234"}], ACC)
    assert coded.splitlines()[2].endswith("| 900 | abc1234 |")
    records.insert(2, {"step": 650, "event": "collapse_recovered", "since": 400, "message": "recovered"})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    summary = ct.run_summary(tmp_path)
    row = ct.cell_table([{**_cell("a", "dfad", None), **summary, "steps": 900}], ACC).splitlines()[2]
    assert "| yes (step 400, recovered by 650) |" in row


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path counts
    assert ct.code_version.__wrapped__(tmp_path) == ""  # not a git checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True)
    assert ct.code_version.__wrapped__(tmp_path) == head.stdout.strip()
    (tmp_path / "new.py").write_text("")  # untracked files are not the measured code
    assert ct.code_version.__wrapped__(tmp_path) == head.stdout.strip()
    (tmp_path / "f.py").write_text("a = 2\n")
    assert ct.code_version.__wrapped__(tmp_path) == head.stdout.strip() + "+changes"


def test_bn_methods_run_on_bn_free_teachers_marked_and_auto_waits_for_its_method() -> None:
    teachers = [ct.TEACHERS["fmnist_lenet5"], ct.TEACHERS["fmnist_cnn_bn"]]
    cells = ct.plan(teachers, ["deepinversion", "dfad", "auto"], 5.0, 10.0, have_auto=False)
    assert ["skipped" in c for c in cells] == [False, False, True, False, False, True]
    assert [bool(c.get("no_bn")) for c in cells] == [True, False, False, False, False, False]
    assert [c["budget_min"] for c in cells] == [5.0, 5.0, 10.0] * 2
    ran = [{**cells[0], "top1": 0.45}, {**cells[3], "top1": 0.8}]
    acc = {"fmnist_lenet5": 0.9, "fmnist_cnn_bn": 0.9}
    grid = ct.grid_table(ran, acc, ["fmnist_lenet5", "fmnist_cnn_bn"], ["deepinversion"]).splitlines()
    assert grid[2].startswith("| deepinversion | 50.0* | 88.9 | 50.0 (fmnist_lenet5) |")
    assert grid[-1].startswith("\\* a BatchNorm-statistics method on a BN-free teacher: its BN term matches the "
                               "synthetic input to the teacher's normalisation statistics")


@pytest.mark.parametrize("name", ["fmnist_cnn_bn", "mnist_caffe28", "fmnist_caffe28", "fmnist_cnn", "fmnist_vgg",
                                  "fmnist_mlp"])
def test_custom_teacher_loads_as_a_users_state_dict(name: str, tmp_path: Path, monkeypatch) -> None:
    t = ct.TEACHERS[name]
    cls = t.arch.split(":")[1]
    import bench.teacher_nets as nets

    torch.save(nets.NETS[cls]().state_dict(), tmp_path / "t.pt")
    flags = dict(zip(t.flags[::2], t.flags[1::2]))
    spec = InputSpec(1, 28, (float(flags["--mean"]),), (float(flags["--std"]),))
    teacher = load_teacher(tmp_path / "t.pt", arch=t.arch, spec=spec)
    assert bool(teacher.bn_paths()) == t.bn
    arch, kw = student_arch(teacher, None)
    assert build_student(arch, kw)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_the_wide_teacher_takes_only_its_non_square_input(tmp_path: Path) -> None:
    import bench.teacher_nets as nets
    from dfkd.errors import DfkdError

    torch.save(nets.WideCNN().state_dict(), tmp_path / "t.pt")
    spec = InputSpec(1, 28, (0.286,), (0.353,), width=56)
    assert nets.INPUT_SIZES["WideCNN"] == spec.hw
    teacher = load_teacher(tmp_path / "t.pt", arch="bench.teacher_nets:WideCNN", spec=spec)
    arch, kw = student_arch(teacher, None)
    assert build_student(arch, kw)(torch.zeros(2, 1, 28, 56)).shape == (2, 10)
    with pytest.raises(DfkdError, match="HxW"):
        load_teacher(tmp_path / "t.pt", arch="bench.teacher_nets:WideCNN", spec=InputSpec(1, 28, (0.286,), (0.353,)))


def test_the_vit_teacher_is_handed_over_as_a_users_timm_state_dict(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    import bench.teacher_nets as nets

    t = ct.TEACHERS["fmnist_vit"]
    torch.save(nets.vit().state_dict(), tmp_path / "t.pt")
    args = dict(t.flags[i + 1].split("=", 1) for i, f in enumerate(t.flags) if f == "--arch-arg")
    arch_args = {k: json.loads(v) for k, v in args.items()}
    assert t.arch == f"timm:{nets.VIT_NAME}" and arch_args == nets.VIT_ARGS  # the flags rebuild the trained net
    teacher = load_teacher(tmp_path / "t.pt", arch=t.arch, spec=InputSpec(1, 28, (0.286,), (0.353,)),
                           arch_args=arch_args)
    assert not teacher.bn_paths() and not t.bn and teacher.num_classes == 10
    assert student_arch(teacher, None)[0] == "lenet5_half"  # the three-quarter rung is over a quarter of its size


def test_custom_teacher_evaluates_through_the_cli_as_the_bench_calls_it(tmp_path: Path) -> None:
    t = ct.TEACHERS["fmnist_cnn_bn"]
    import bench.teacher_nets as nets

    torch.save(nets.FashionCNN().state_dict(), tmp_path / "t.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 255, (32, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 32))
    env = {**ct.run.child_env(1), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*ct.run.DFKD, "evaluate", "--model", str(tmp_path / "t.pt"), "--data",
                          str(tmp_path / "test.npz"), "--json", *t.flags], capture_output=True, text=True,
                         cwd=tmp_path, env=env)  # another folder: the module comes from PYTHONPATH, as in the bench
    assert out.returncode == 0, out.stderr
    assert 0.0 <= json.loads(out.stdout)["top1"] <= 1.0


def test_auto_runs_at_its_own_budget_in_every_grid_and_names_its_pick() -> None:
    assert ct.default_methods()[-1] == "auto" and "fast" in ct.default_methods()
    assert ct.parse(["--smoke"]).auto_budget == 0.1
    assert ct.parse([]).auto_budget == 10.0 and ct.parse([]).budget == 5.0
    teachers = [ct.TEACHERS["fmnist_lenet5"], ct.TEACHERS["fmnist_cnn_bn"]]
    cells = ct.plan(teachers, ["dfad", "auto"], 5.0, 10.0, have_auto=True)
    assert [(c["method"], c["budget_min"], "skipped" in c) for c in cells] == [("dfad", 5.0, False),
                                                                              ("auto", 10.0, False)] * 2
    ran = [_cell("a", "dfad", 0.81), _cell("a", "auto", 0.855, picked="dfad", budget_min=10.0),
           _cell("b", "dfad", 0.40), _cell("b", "auto", 0.76, picked="dfq, recipe cpu", budget_min=10.0)]
    grid = ct.grid_table(ran, ACC, ["a", "b"], ["dfad", "auto"]).splitlines()
    assert grid[3] == "| auto | 95.0 (dfad) | 95.0 (dfq, recipe cpu) | 95.0 (a) |"
    assert grid[4] == "| **best method** | dfad (90.0) | dfad (50.0) | |"  # auto's other budget is not compared
    autos = ct.auto_table(ran, ACC, ["a", "b"]).splitlines()
    assert autos[2:] == ["| a | dfad | 95.0 | dfad | 90.0 |", "| b | dfq, recipe cpu | 95.0 | dfad | 50.0 |"]
    rows = ct.cell_table([{**c, "steps": 10} for c in ran], ACC).splitlines()
    assert rows[2].startswith("| a | auto (dfad) | 10 min | 85.50 | 95.0 |")


def test_a_not_learned_warning_reaches_the_cell(tmp_path: Path) -> None:
    records = [{"step": 100, "event": "not_learned", "message": "dfad: the student agrees ... it has not learned"},
               {"step": 100, "event": "finished", "selected": "", "student/top1": 0.1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    summary = ct.run_summary(tmp_path)
    assert summary["not_learned"] and not summary["collapse"] and "has not learned" in summary["not_learned_message"]
    row = ct.cell_table([{**_cell("a", "dfad", None), **summary, "steps": 100}], ACC).splitlines()[2]
    assert row.endswith("| n/a | no; not learned | 100 | - |")
    # a student whose activations died is named in the cell with the step it was warned at
    stuck = {"step": 50, "event": "student_stuck", "message": "dfad: the student has given one answer ..."}
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [stuck, *records]))
    summary = ct.run_summary(tmp_path)
    row = ct.cell_table([{**_cell("a", "dfad", None), **summary, "steps": 100}], ACC).splitlines()[2]
    assert row.endswith("| n/a | no; student stuck (step 50); not learned | 100 | - |")


def record_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Cells run no process: each call of run.run_one records its extra flags and seed, and fails the cell."""
    seen: list[dict] = []

    def fake_run_one(teacher, method, minutes, ns, out, extra):  # noqa: ANN001, ANN202 - run.run_one's signature
        seen.append({"extra": list(extra), "seed": ns.seed})
        return {"method": method, "budget_min": minutes, "error": "not run"}

    monkeypatch.setattr(ct.run, "run_one", fake_run_one)
    return seen


def test_cells_run_with_param_are_stored_and_labelled_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--param recipe=paper` cells pass the setting to dfkd distill and never stand in for the default cells.
    seen = record_runs(monkeypatch)
    t = ct.TEACHERS["mnist_caffe28"]
    args = ct.parse(["--teachers", "mnist_caffe28", "--param", "recipe=paper", "--out", str(tmp_path)])
    cells = ct.plan([t], ["dfad"], 5.0, 10.0, True, args.param)
    assert cells[0]["params"] == ["recipe=paper"]
    ct.run_cell(t, cells[0], args, tmp_path)
    extra = seen[0]["extra"]
    assert extra[-2:] == ["-p", "recipe=paper"] and extra[:2] == ["--teacher-arch", "bench.teacher_nets:CaffeLeNet"]
    stored = json.loads((tmp_path / "cells" / "mnist_caffe28--dfad--5min--recipe=paper.json").read_text())
    assert stored["code"] == ct.code_version()  # the commit the cell measured
    ct._write_json(tmp_path / "cells" / f"{ct.cell_key('mnist_caffe28', 'dfad', 5.0, False)}.json",
                   {**cells[0], "top1": 0.9, "params": []})
    assert ct.pending(cells, tmp_path, smoke=False, force=False) == [0], "the default cell is not the variant's"
    assert ct.run.method_label({"method": "dfad", "params": ["recipe=paper"]}) == "dfad [recipe=paper]"
    with pytest.raises(SystemExit):
        ct.parse(["--param", "recipe"])


def test_a_teacher_missing_on_a_fresh_checkout_is_trained_before_it_is_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = dataclasses.replace(ct.TEACHERS["fmnist_lenet5"], file=tmp_path / "teachers" / "fmnist_lenet5.pt")
    trained = []

    def fake_ensure(teacher):  # noqa: ANN001, ANN202
        teacher.file.parent.mkdir(parents=True, exist_ok=True)
        teacher.file.write_bytes(b"weights")
        trained.append(teacher.name)
        return teacher.file

    monkeypatch.setattr(ct, "ensure_teacher", fake_ensure)
    monkeypatch.setattr(ct.run, "evaluate", lambda *a, **k: 0.9)
    assert ct.teacher_accuracy(t, tmp_path) == 0.9 and trained == ["fmnist_lenet5"]


@pytest.mark.parametrize(("flags", "suffix", "ran_with"), [
    (["--seed", "1"], "--seed1", lambda r: r["seed"] == 1),
    (["--student", "lenet5"], "--student-lenet5", lambda r: r["extra"][-2:] == ["--student", "lenet5"]),
])
def test_cells_of_another_seed_or_student_run_with_it_and_are_stored_apart(
        flags: list[str], suffix: str, ran_with, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # such a cell must not reuse (nor, with --force, overwrite) the default grid's cell
    seen = record_runs(monkeypatch)
    t = ct.TEACHERS["mnist_caffe28"]
    ct._write_json(tmp_path / "cells" / f"{ct.cell_key('mnist_caffe28', 'dfad', 5.0, False)}.json",
                   {"teacher": "mnist_caffe28", "method": "dfad", "budget_min": 5.0, "top1": 0.9})
    args = ct.parse(["--teachers", "mnist_caffe28", *flags, "--out", str(tmp_path)])
    cells = ct.plan([t], ["dfad"], 5.0, 10.0, True, args.param, args.seed, args.student)
    assert ct.pending(cells, tmp_path, smoke=False, force=False) == [0], "the default cell stood in"
    ct.run_cell(t, cells[0], args, tmp_path)
    assert len(seen) == 1 and ran_with(seen[0])
    assert (tmp_path / "cells" / f"mnist_caffe28--dfad--5min{suffix}.json").exists()
    assert json.loads((tmp_path / "cells" / "mnist_caffe28--dfad--5min.json").read_text())["top1"] == 0.9
    assert ct.pending(ct.plan([t], ["dfad"], 5.0, 10.0, True), tmp_path, smoke=False, force=False) == []


def test_student_reference_trains_the_cells_student_on_real_labels_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8), y=np.arange(40) % 10)
    t = ct.BenchTeacher("tiny", "MNIST", "lenet5", False, 28, tmp_path / "t.pt", data, "test", train_data=data)
    run_dir = tmp_path / "runs" / "tiny--dfad--5min"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"student": "lenet5_half"}))

    student = ct.cell_student(t, tmp_path)
    assert student == "lenet5_half"
    top1 = ct.student_reference(t, tmp_path, student, epochs=1)
    assert 0.0 <= top1 <= 1.0
    model = torch.load(tmp_path / "student_reference" / "tiny--lenet5_half.pt", weights_only=True)
    assert model["arch"] == "lenet5_half" and model["input_spec"]["size"] == 28  # the cells' student, at the input size

    def no_second_run(*a, **k):
        raise AssertionError("the reference is cached")

    monkeypatch.setattr(ct.subprocess, "run", no_second_run)
    assert ct.student_reference(t, tmp_path, student, epochs=1) == top1
    md = ct.teacher_table([t], {"tiny": 0.5}, {"tiny": (student, top1)})
    assert f"lenet5_half {100 * top1:.2f} ({200 * top1:.1f})" in md
    no_data = ct.BenchTeacher("cifar", "CIFAR", "wrn_16_1", True, 32, t.file, data, "test")
    assert ct.student_reference(no_data, tmp_path, student, epochs=4) is None
