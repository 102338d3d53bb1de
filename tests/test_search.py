"""`dfkd search`: Optuna over LeNet-5 widths (runs, prunes, learns, resumes, refuses)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import stop_in_round

import dfkd.search
from dfkd.cli.main import main
from dfkd.engine import Interrupted
from dfkd.errors import DfkdError
from dfkd.modelfile import load_model, save_model
from dfkd.search import (
    SearchConfig,
    candidate,
    errors_told_once,
    final_student,
    lenet5_space,
    measure,
    resolve_space,
    search,
)
from dfkd.search_report import dominates, pareto_rows
from dfkd.teacher import load_teacher
from tests.test_lifelong import train_toy_teacher, write

optuna = pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("search")
    return {"teacher": train_toy_teacher(d / "t.pt", 4), "train": write(d / "train.npz", range(4), 256, 21),
            "test": write(d / "test.npz", range(4), 100, 22)}


def config(toy: dict[str, str], out: Path, **kw: object) -> SearchConfig:
    base = {"max_params": 60_000, "trials": 3, "trial_minutes": None, "trial_steps": 30, "final_minutes": None,
            "final_steps": 30, "data": toy["train"], "params": {"batch_size": 32, "s_optimizer": "adam",
                                                               "lr_s": 3e-3, "schedule": "constant", "select_every": 0}}
    return SearchConfig(**{"teacher": toy["teacher"], "method": "kd", "out": str(out), "eval_data": toy["test"],
                           **base, **kw})


@pytest.fixture(scope="module")
def finished(toy: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[SearchConfig, dict]:
    cfg = config(toy, tmp_path_factory.mktemp("s") / "run")
    return cfg, search(cfg, load_teacher(cfg.teacher))


def test_runs_learns_and_writes_the_table_plot_and_final_student(finished: tuple[SearchConfig, dict]) -> None:
    cfg, res = finished
    assert len(res["rows"]) == 3 and res["rows"][0]["student_args"]["widths"] == [3, 8, 60, 42]  # LeNet-5-half first
    assert res["chosen"] in res["pareto"] and res["final"]["top1"] > 0.8  # four classes: chance is 0.25
    assert all(r["top1"] > 0.5 for r in res["rows"] if r["top1"] is not None)
    out = Path(cfg.out)
    assert (out / "pareto.png").stat().st_size > 1000 and "chosen" in (out / "pareto.md").read_text()
    assert load_model(out / "final" / "student.pt")[1].arch == "lenet5_scaled"


def test_constraints_prune_without_training(toy: dict[str, str], tmp_path: Path) -> None:
    cfg = config(toy, tmp_path / "r", max_params=16_000, trials=4, final_steps=2)
    res = search(cfg, load_teacher(cfg.teacher))
    big = [r for r in res["rows"] if r["params"] > 16_000]
    assert all(r["state"] == "pruned" and r["pruned"] == "constraint" for r in big)
    assert not any((tmp_path / "r" / "trials" / f"trial-{r['trial']}").exists() for r in big)
    assert all(r["params"] <= 16_000 for r in res["pareto"])


def test_resume_adds_trials_to_the_stored_study(finished: tuple[SearchConfig, dict], tmp_path: Path) -> None:
    cfg, first = finished
    res = search(dataclasses.replace(cfg, trials=4), load_teacher(cfg.teacher), resume=True)
    assert [r["trial"] for r in res["rows"]][:3] == [r["trial"] for r in first["rows"]]
    fourth = res["rows"][3]
    assert len(res["rows"]) == 4 and fourth["trial"] == 3
    if fourth["same_as"] is None:
        assert (Path(cfg.out) / "trials" / "trial-3").exists()
    else:  # TPE drew a student again: it takes that trial's score, without a run
        earlier = res["rows"][fourth["same_as"]]
        assert earlier["student_args"] == fourth["student_args"] and earlier["top1"] == fourth["top1"]
        assert not (Path(cfg.out) / "trials" / "trial-3").exists()


def test_a_resumed_search_does_not_replay_the_first_draws(toy: dict[str, str], tmp_path: Path) -> None:
    # the sampler was seeded as at the start: a resume's new trials drew the first trials' students again
    cfg = config(toy, tmp_path / "r", trials=3, final_steps=2)
    first = search(cfg, load_teacher(cfg.teacher))["rows"]
    again = search(dataclasses.replace(cfg, trials=5), load_teacher(cfg.teacher), resume=True)["rows"]
    drawn = [r["student_args"]["widths"] for r in first[1:]]  # trial 0 is the fixed reference
    assert [r["student_args"]["widths"] for r in again[3:]] != drawn


def test_a_resume_of_a_running_search_is_refused(finished: tuple[SearchConfig, dict]) -> None:
    # both processes added trials to one study: its table listed 5 trials of the 3 asked for
    from dfkd.outpaths import folder_lock

    cfg, _ = finished
    with folder_lock(Path(cfg.out), "held by this test"), \
            pytest.raises(DfkdError, match=r"a search is running in it \(process \d+\); wait for it to end"):
        search(dataclasses.replace(cfg, trials=4), load_teacher(cfg.teacher), resume=True)


def test_a_damaged_search_json_is_one_line_on_resume(finished: tuple[SearchConfig, dict], tmp_path: Path) -> None:
    cfg, _ = finished
    (tmp_path / "search.json").write_text("{\n")  # a JSONDecodeError traceback
    with pytest.raises(DfkdError, match=r"search.json: damaged \(not JSON.*start a new search with another --out"):
        dfkd.search._same_settings(cfg, tmp_path, "", True)


def test_space_measure_and_pareto() -> None:
    trial = optuna.trial.FixedTrial({f"w{i}": 0.5 for i in range(4)})
    arch, args = lenet5_space(trial)
    teacher = type("T", (), {"spec": None, "num_classes": 10, "arch": "lenet5"})
    from dfkd.spec import MNIST_SPEC

    teacher.spec = MNIST_SPEC
    params, latency = measure(teacher, arch, args)
    assert params == 15738 and latency > 0  # LeNet-5-half's count
    a, b = {"top1": 0.9, "params": 10, "latency_ms": 1.0}, {"top1": 0.8, "params": 20, "latency_ms": 1.0}
    assert dominates(a, b) and not dominates(b, a)
    assert [r["trial"] for r in pareto_rows([a | {"trial": 0}, b | {"trial": 1}])] == [0]


def test_refusals(toy: dict[str, str], finished: tuple[SearchConfig, dict], tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _ = finished
    with pytest.raises(DfkdError, match="already holds a search; continue it with --resume"):
        search(cfg, load_teacher(cfg.teacher))
    with pytest.raises(DfkdError, match="--resume: trial_steps was 30 .* now 31"):
        search(dataclasses.replace(cfg, trial_steps=31), load_teacher(cfg.teacher), resume=True)
    with pytest.raises(DfkdError, match="holds no search"):
        search(config(toy, tmp_path / "none"), load_teacher(cfg.teacher), resume=True)
    # the latency limit pruned them, the message named --max-params alone and offered a resume "with the same limits"
    with pytest.raises(DfkdError, match=r"--max-params 60000 / --max-latency-ms 1e-09: no trial finished within the "
                                        r"limits; .* the trials pruned so far stay pruned, whatever limits a resume"):
        search(config(toy, tmp_path / "tiny", max_latency_ms=1e-9, trials=1), load_teacher(cfg.teacher))
    # "add trials" could not help a --max-params under the space's smallest student
    with pytest.raises(DfkdError, match="--max-params 10: the smallest student of the lenet5 space .* 4,025 "):
        search(config(toy, tmp_path / "small", max_params=10, trials=1), load_teacher(cfg.teacher))
    assert not (tmp_path / "small").exists()
    monkeypatch.setitem(sys.modules, "optuna", None)
    res = CliRunner().invoke(main, ["search", "--teacher", cfg.teacher, "--method", "kd", "--eval-data", toy["test"],
                                    "--max-params", "1000", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error: dfkd search needs Optuna: pip install")


def test_a_stopped_search_says_how_to_continue_the_search(toy: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C in a trial said "Continue with: dfkd distill --resume .../trials/trial-3", which does not continue it
    def stopped(*args: object, **kwargs: object) -> None:
        raise Interrupted(f"stopped at step 6; checkpoint saved. Continue with: dfkd distill --resume {tmp_path}/t")

    monkeypatch.setattr(dfkd.search, "search", stopped)
    res = CliRunner().invoke(main, ["search", "--teacher", toy["teacher"], "--method", "kd", "--eval-data",
                                    toy["test"], "--max-params", "1000", "--out", str(tmp_path / "o")])
    assert res.exit_code == 130 and "continue the search with the same command and --resume" in res.output
    assert "dfkd distill --resume" not in res.output


@pytest.mark.parametrize("space", ["os:system", "builtins:print", "torch.nn:Linear"])
def test_a_space_must_be_a_function_of_the_users_own_code(space: str) -> None:
    # --space os:system called os.system(trial): an Optuna "Trial 0 failed" TypeError traceback
    with pytest.raises(DfkdError, match=f"--space {space}: a search space is a function of your own code"):
        resolve_space(space)


def returns_a_name(trial: object) -> str:  # a search space of the user's that forgot the arguments
    return "lenet5_half"


def raises(trial: object) -> None:
    raise ValueError("oops")


def test_a_space_that_returns_the_wrong_thing_or_raises_is_one_message(toy: dict[str, str], tmp_path: Path) -> None:
    # "ValueError: too many values to unpack" or the function's own error, each after Optuna's traceback
    with pytest.raises(DfkdError, match=r"--space s: returned 'lenet5_half'; a search space returns \(architecture"):
        candidate(returns_a_name, None, "s", optuna)
    with pytest.raises(DfkdError, match=r"--space r: the function raised ValueError: oops \(at .*test_search.py:\d+\)"):
        candidate(raises, None, "r", optuna)
    assert candidate(lenet5_space, optuna.trial.FixedTrial({f"w{i}": 0.5 for i in range(4)}), "lenet5", optuna)[0] \
        == "lenet5_scaled"
    with pytest.raises(DfkdError, match="returned 'lenet5_half'"):
        search(config(toy, tmp_path / "bad", space="tests.test_search:returns_a_name", trials=1),
               load_teacher(toy["teacher"]))
    # Optuna's handler would print the error's traceback first: dfkd's own errors are told once, by dfkd
    handlers = logging.getLogger("optuna").handlers
    failed = logging.LogRecord("optuna.study", logging.WARNING, __file__, 1, "Trial 0 failed", None,
                               (DfkdError, DfkdError("x"), None))
    other = logging.LogRecord("optuna.study", logging.WARNING, __file__, 1, "Trial 0 failed", None,
                              (ValueError, ValueError("x"), None))
    assert handlers
    with errors_told_once():
        assert not any(h.filter(failed) for h in handlers) and all(h.filter(other) for h in handlers)
    assert all(h.filter(failed) for h in handlers)


QUICK = {"trials": 1, "trial_steps": 4, "final_steps": 2}


@pytest.mark.parametrize("bad, message", [
    ({"final_minutes": float("inf"), "final_steps": None}, "--final-minutes inf: must be a finite number"),
    ({"trial_minutes": float("inf"), "trial_steps": None}, "--trial-minutes inf: must be a finite number"),
    ({"tolerance": float("nan")}, "--tolerance nan: must be a finite number"),
    ({"method": "nosuch"}, "nosuch"),
    ({"params": {"foo": 1}}, "no parameter(s) ['foo']"),
    ({"eval_data": "missing.npz"}, "--eval-data missing.npz: no such file"),
    ({"eval_data": ""}, "--eval-data"),
    ({"device": "banana"}, "--device 'banana': not a device name"),
])
def test_what_would_fail_in_a_trial_is_refused_before_the_folder_is_made(toy: dict[str, str], tmp_path: Path,
                                                                          bad: dict, message: str) -> None:
    # each was met in trial 0 (a final budget after every trial), and left a folder that neither the same
    # command nor --resume with the fix would take
    with pytest.raises(DfkdError, match=re.escape(message)):
        search(config(toy, tmp_path / "s", **{**QUICK, **bad}), load_teacher(toy["teacher"]))
    assert not (tmp_path / "s").exists()


def test_a_search_whose_trials_all_failed_resumes_with_mended_settings(toy: dict[str, str], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import dfkd.engine

    def broken(cfg: object) -> None:
        raise DfkdError("a problem only a trial meets")

    cfg = config(toy, tmp_path / "s", **QUICK)
    with monkeypatch.context() as m:
        m.setattr(dfkd.engine, "distill", broken)
        with pytest.raises(DfkdError, match="a problem only a trial meets"):
            search(cfg, load_teacher(cfg.teacher))
    res = search(dataclasses.replace(cfg, trial_steps=6), load_teacher(cfg.teacher), resume=True)
    # the reference's trial failed, so the resume draws it again first (it was lost for good, and its failed row
    # was called "pruned (None)")
    assert [(r["trial"], r["state"]) for r in res["rows"]] == [(0, "fail"), (1, "complete")]
    assert res["rows"][1]["student_args"]["widths"] == [3, 8, 60, 42]
    assert "| failed or stopped |" in (tmp_path / "s" / "pareto.md").read_text()
    assert json.loads((tmp_path / "s" / "search.json").read_text())["trial_steps"] == 6


def test_a_resume_takes_the_teacher_moved_and_refuses_another(toy: dict[str, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = tmp_path / "t.pt"
    shutil.copy(toy["teacher"], teacher)
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(config(toy, Path("s"), **QUICK), teacher="t.pt")
    search(cfg, load_teacher(cfg.teacher))
    # from another folder, the same files named otherwise (a trailing slash, relative paths): refused by string
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = tmp_path / "moved.pt"
    teacher.rename(moved)
    again = dataclasses.replace(cfg, teacher="../moved.pt", out="../s/", trials=2)
    assert len(search(again, load_teacher(again.teacher), resume=True)["rows"]) == 2
    # another network at the teacher's path: its students would be ranked against the first teacher's
    net = load_teacher(str(moved)).module
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    save_model(moved, net, load_model(moved)[1])
    with pytest.raises(DfkdError, match="not the teacher ../s was searched with .* sha256 differ"):
        search(dataclasses.replace(again, trials=3), load_teacher(again.teacher), resume=True)


def test_the_final_student_is_the_picks_and_a_stopped_one_is_continued(toy: dict[str, str], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(toy, tmp_path / "s", final_steps=6)
    rows = [{"trial": 0, "student": "lenet5_scaled", "student_args": {"widths": [3, 8, 60, 42]}, "same_as": None},
            {"trial": 1, "student": "lenet5_scaled", "student_args": {"widths": [2, 4, 30, 21]}, "same_as": None}]
    with monkeypatch.context() as m:
        stop_in_round(m, "kd", 2)
        with pytest.raises(Interrupted):
            final_student(cfg, rows[0], rows)
    # the resumed search said it was done, exit 0, with a final/ of no student.pt
    metrics = final_student(cfg, rows[0], rows)
    assert metrics["top1"] > 0.25 and (tmp_path / "s" / "final" / "student.pt").is_file()
    assert not (tmp_path / "s" / "final-trial-0").exists()
    assert final_student(cfg, rows[0], rows) == metrics  # finished: read, not run again
    # a resume with more trials picked another student: final/ kept trial 0's, unsaid
    with pytest.warns(UserWarning, match="held trial 0.s student; the pick is now trial 1"):
        final_student(cfg, rows[1], rows)
    assert load_model(tmp_path / "s" / "final" / "student.pt")[1].arch_kwargs["widths"] == [2, 4, 30, 21]
    assert load_model(tmp_path / "s" / "final-trial-0" / "student.pt")[1].arch_kwargs["widths"] == [3, 8, 60, 42]
    # the pick back at trial 0 (a resume with the --tolerance before): its finished run was distilled again
    with pytest.warns(UserWarning, match="final-trial-0 held the pick's student .* it is .*final again"):
        assert final_student(cfg, rows[0], rows) == metrics
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["final", "final-trial-1"]


def test_search_takes_the_teacher_options_and_names_a_missing_gpu(toy: dict[str, str], tmp_path: Path) -> None:
    # a plain state_dict was told "add --teacher-arch", which search did not take; --device cuda was a traceback
    teacher = load_teacher(toy["teacher"])
    torch.save(teacher.module.state_dict(), tmp_path / "sd.pt")
    args = ["search", "--teacher", str(tmp_path / "sd.pt"), "--method", "kd", "--data", toy["train"], "--eval-data",
            toy["test"], "--max-params", "60000", "--trials", "1", "--trial-steps", "4", "--final-steps", "2"]
    spec = ["--teacher-arch", "lenet5_half_bn", "--arch-arg", "num_classes=4", "--channels", "1", "--input-size",
            "32", "--mean", "0.5", "--std", "0.5"]
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, [*args, *spec, "--out", str(tmp_path / "gpu"), "--device", "cuda"])
        assert r.exit_code == 2 and "--device cuda: CUDA is not available" in r.output, r.output
    r = CliRunner().invoke(main, [*args, *spec, "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "final" / "config.json").read_text())["teacher_arch"] == "lenet5_half_bn"


def test_a_diverged_trial_is_told_and_the_search_goes_on(toy: dict[str, str], tmp_path: Path) -> None:
    # the first trial that diverged ended the whole search, advising `dfkd distill --resume` of the trial's folder
    # (outside the study: the search never counted that run)
    cfg = config(toy, tmp_path / "s", trials=2, params={**config(toy, tmp_path).params, "lr_s": 1e6})
    with pytest.warns(UserWarning, match=r"trial \d \(lenet5_scaled\) diverged at step \d+: it has no score; the "
                                         r"search goes on") as told:
        with pytest.raises(DfkdError, match=r"no trial has a score and 2 of the 2 trials diverged .*lower the "
                                            "learning rates .* and --resume"):
            search(cfg, load_teacher(cfg.teacher))
    assert len([w for w in told if "diverged at step" in str(w.message)]) == 2  # both trials ran
    # the resume with a learning rate that holds is taken (no trial scored) and runs the trials again
    res = search(dataclasses.replace(cfg, params=config(toy, tmp_path).params), load_teacher(cfg.teacher),
                 resume=True)
    assert sum(r["top1"] is not None for r in res["rows"]) == 2 and res["final"]["top1"] > 0.5
    assert "diverged at step" in (tmp_path / "s" / "pareto.md").read_text()

def test_no_score_with_a_stopped_and_a_diverged_trial_is_told_as_divergence(toy: dict[str, str], tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # a trial stopped by a signal (failed, not diverged) beside diverged ones: "no trial finished within the
    # constraints ... raise the limits", though every trial was within them
    cfg = config(toy, tmp_path / "s", trials=1)
    with monkeypatch.context() as m:
        stop_in_round(m, "kd", 2)
        with pytest.raises(Interrupted):
            search(cfg, load_teacher(cfg.teacher))
    wild = dataclasses.replace(cfg, trials=2, params={**cfg.params, "lr_s": 1e6})
    with pytest.warns(UserWarning, match="diverged at step"):
        with pytest.raises(DfkdError, match=r"no trial has a score and 2 of the 3 trials diverged .* lower the "
                                            "learning rates"):
            search(wild, load_teacher(cfg.teacher), resume=True)
