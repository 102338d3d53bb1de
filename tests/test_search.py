"""`dfkd search`: Optuna over LeNet-5 widths (runs, prunes, learns, resumes, refuses)."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import dfkd.search
from dfkd.cli.main import main
from dfkd.engine import Interrupted
from dfkd.errors import DfkdError
from dfkd.modelfile import load_model
from dfkd.search import SearchConfig, candidate, errors_told_once, lenet5_space, measure, resolve_space, search
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
    return SearchConfig(teacher=toy["teacher"], method="kd", out=str(out), eval_data=toy["test"], **{**base, **kw})


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
    assert len(res["rows"]) == 4 and (Path(cfg.out) / "trials" / "trial-3").exists()


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
    with pytest.raises(DfkdError, match="no trial finished within the constraints"):
        search(config(toy, tmp_path / "tiny", max_params=10, trials=1), load_teacher(cfg.teacher))
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
