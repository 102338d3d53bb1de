"""NAS student search: `dfkd search`, Optuna over a student space, each candidate scored by a short distillation.

Every trial builds a candidate student from the search space, measures its parameters and CPU latency (batch 1,
median of 20 forwards) and is pruned at once when it breaks `--max-params` / `--max-latency-ms`; otherwise it is
distilled with the chosen method for half its budget, reported to Optuna's median pruner (bad trials stop there),
then resumed to its full budget and scored by top-1 on `--eval-data` (a held-out set used only to *rank* candidates;
no candidate trains on it). The half run's learning-rate schedule is that of a half-length run (the resume continues
under the full one), so a trial equals one uninterrupted run only with `-p schedule=constant`. The study lives in
`<out>/study.db` (SQLite), each trial's run in `<out>/trials/trial-N`, so `--resume` continues an interrupted search
where it stopped. At the end the Pareto set (accuracy up, parameters and latency down) is written as `pareto.md` and
plotted in `pareto.png`, and the smallest Pareto student within `tolerance` of the best accuracy is distilled fully
into `<out>/final`.

Search spaces: `lenet5` (width multipliers 0.25..1 of each LeNet-5 layer; the first trial is LeNet-5-half, the
reference the table is read against), or a user's `module:function(trial)` returning `(student_arch, student_args)`
with `trial.suggest_*` calls (as `--student` and `--student-arg` take them).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import atomic_write_text

LENET5_WIDTHS = (6, 16, 120, 84)
MULTIPLIERS = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)


@dataclass(frozen=True)
class SearchConfig:
    """Settings of `dfkd search` (a trial's budget is `trial_steps` student steps or `trial_minutes`)."""

    teacher: str
    method: str
    out: str
    eval_data: str
    max_params: int
    max_latency_ms: float | None = None
    trials: int = 20
    trial_minutes: float | None = 2.0
    trial_steps: int | None = None
    final_minutes: float | None = 10.0
    final_steps: int | None = None
    space: str = "lenet5"
    tolerance: float = 0.01
    params: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    transfer_data: str | None = None
    seed: int = 0
    device: str = "cpu"


def lenet5_space(trial: Any) -> tuple[str, dict[str, Any]]:
    """LeNet-5 with each layer's width scaled by a multiplier in MULTIPLIERS."""
    mults = [trial.suggest_categorical(f"w{i}", MULTIPLIERS) for i in range(4)]
    return "lenet5_scaled", {"widths": [max(1, round(b * m)) for b, m in zip(LENET5_WIDTHS, mults)]}


def import_optuna() -> Any:
    """Optuna, or a one-line error saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise DfkdError("dfkd search needs Optuna: pip install -e \".[search]\" (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def resolve_space(name: str) -> Callable[[Any], tuple[str, dict[str, Any]]]:
    """The search space: `lenet5` or a user's `module:function(trial)`."""
    if name == "lenet5":
        return lenet5_space
    if ":" not in name:
        raise DfkdError(f"--space {name}: use lenet5 or module:function (a function of an Optuna trial returning "
                        "(student_arch, student_args))")
    import importlib

    from dfkd.archs import import_callable, user_code

    space = import_callable(name, "--space")
    if isinstance(space, type) or not user_code(importlib.import_module(name.partition(":")[0])):
        raise DfkdError(f"--space {name}: a search space is a function of your own code (module:function(trial) "
                        "returning (student_arch, student_args)), not a class or a function of the standard library "
                        "or an installed package")
    return space


def measure(teacher: Any, arch: str, args: dict[str, Any]) -> tuple[int, float]:
    """Parameters and CPU latency (ms, batch 1, median of 20 forwards after 3 warm-ups) of a candidate."""
    from dfkd.students import build_student, student_arch

    name, kwargs = student_arch(teacher, arch, args)
    model = build_student(name, kwargs).eval()
    x = torch.randn(teacher.spec.shape(1))
    times = []
    with torch.no_grad():
        for i in range(23):
            t0 = time.perf_counter()
            model(x)
            if i >= 3:
                times.append(1000 * (time.perf_counter() - t0))
    return sum(p.numel() for p in model.parameters()), statistics.median(times)


def _distill_cfg(cfg: SearchConfig, arch: str, args: dict[str, Any], out: Path, steps: int | None,
                 minutes: float | None) -> Any:
    from dfkd.config import DistillConfig

    return DistillConfig(teachers=(cfg.teacher,), method=cfg.method, student=arch, student_args=args, steps=steps,
                         budget_minutes=minutes, eval_data=cfg.eval_data, out=str(out), seed=cfg.seed,
                         device=cfg.device, params=dict(cfg.params), data=cfg.data, transfer_data=cfg.transfer_data,
                         fid_every=0)


def _half(x: float | int | None, kind: type) -> Any:
    return None if x is None else kind(max(1, x // 2) if kind is int else x / 2)


def candidate(space: Callable, trial: Any, name: str, optuna: Any) -> tuple[str, dict[str, Any]]:
    """The (architecture, arguments) the user's space function draws for `trial`; its errors as one message."""
    try:
        out = space(trial)
    except (DfkdError, optuna.TrialPruned):
        raise
    except Exception as e:  # noqa: BLE001 - the user's own code: say where it failed, in one line
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise DfkdError(f"--space {name}: the function raised {type(e).__name__}: {e} (at {frame.filename}:"
                        f"{frame.lineno})") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], str)
            and isinstance(out[1], dict)):
        raise DfkdError(f"--space {name}: returned {out!r:.80}; a search space returns (architecture, its "
                        "arguments), e.g. (\"lenet5_scaled\", {\"widths\": [3, 8, 60, 42]})")
    return out[0], out[1]


@contextmanager
def errors_told_once() -> Iterator[None]:
    """Optuna logs a failed trial's traceback before re-raising its error: dfkd's own errors are told once, by dfkd."""
    def ours(record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DfkdError))

    handlers = logging.getLogger("optuna").handlers
    for h in handlers:
        h.addFilter(ours)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(ours)


def objective(cfg: SearchConfig, teacher: Any, space: Callable, optuna: Any) -> Callable[[Any], float]:
    """The Optuna objective: measure, prune on constraints, distill half, report, finish, score."""
    from dfkd.engine import distill, resume

    def run(trial: Any) -> float:
        arch, args = candidate(space, trial, cfg.space, optuna)
        params, latency = measure(teacher, arch, args)
        trial.set_user_attr("student", arch)
        trial.set_user_attr("student_args", args)
        trial.set_user_attr("params", params)
        trial.set_user_attr("latency_ms", latency)
        if params > cfg.max_params or (cfg.max_latency_ms is not None and latency > cfg.max_latency_ms):
            trial.set_user_attr("pruned", "constraint")
            raise optuna.TrialPruned()
        run_dir = Path(cfg.out) / "trials" / f"trial-{trial.number}"
        half = _not_stopped(distill(_distill_cfg(cfg, arch, args, run_dir, _half(cfg.trial_steps, int),
                                                 _half(cfg.trial_minutes, float))))
        trial.report(half.metrics["top1"], 0)
        if trial.should_prune():
            trial.set_user_attr("pruned", "median")
            raise optuna.TrialPruned()
        return float(_not_stopped(resume(run_dir, steps=cfg.trial_steps,
                                         budget_minutes=cfg.trial_minutes)).metrics["top1"])

    return run


def _not_stopped(result: Any) -> Any:
    """A trial's run that finished while a stop signal came: the search stops there as it would mid-run.

    The run's handler holds the signal until the run is written, so a Ctrl-C in a trial's last moments went into
    that run alone and the search went on to the next trial.
    """
    if result.stop_requested:
        raise KeyboardInterrupt(f"stopped after {result.run_dir} finished; continue the search with --resume")
    return result


def open_study(cfg: SearchConfig, optuna: Any, resume: bool) -> Any:
    """The study in `<out>/study.db`: new (the out folder must be new or empty) or, with `resume`, the stored one."""
    from dfkd.outpaths import prepare_run_dir

    out, db = Path(cfg.out), Path(cfg.out) / "study.db"
    if resume and not db.exists():
        raise DfkdError(f"--resume: {out} holds no search (no study.db); start it without --resume")
    if not resume:
        if db.exists():
            raise DfkdError(f"--out {out}: already holds a search; continue it with --resume or pick another --out")
        prepare_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "search.json", json.dumps(asdict(cfg), indent=1))
    else:
        _same_settings(cfg, out)
    with warnings.catch_warnings():  # heartbeats (which fail trials a killed search left running) are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.absolute()}", heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(storage=storage, study_name="search", direction="maximize", load_if_exists=resume,
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    if not resume and cfg.space == "lenet5":
        study.enqueue_trial({f"w{i}": 0.5 for i in range(4)})  # LeNet-5-half: the reference row
    return study


def _same_settings(cfg: SearchConfig, out: Path) -> None:
    """A resumed search keeps its settings: only --trials and --device may change (trials must stay comparable)."""
    saved = out / "search.json"
    before = json.loads(saved.read_text()) if saved.exists() else {}
    for key, value in asdict(cfg).items():
        if key not in ("trials", "device") and key in before and before[key] != json.loads(json.dumps(value)):
            raise DfkdError(f"--resume: {key} was {before[key]!r} in {out}, now {value!r}; a resumed search keeps "
                            "its settings (only --trials and --device may change)")


def search(cfg: SearchConfig, teacher: Any, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the search to `cfg.trials` finished trials, write the Pareto table and plot, distill the pick.

    Returns:
        {"rows": every trial as a dict, "pareto": the Pareto rows, "chosen": the picked row, "final": its metrics}.
    """
    from dfkd.engine import distill
    from dfkd.search_report import pareto_rows, trial_rows, write_report

    optuna = import_optuna()
    space = resolve_space(cfg.space)
    study = open_study(cfg, optuna, resume)
    done = [t for t in study.trials if t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED")]
    if cfg.trials > len(done):
        with errors_told_once():
            study.optimize(objective(cfg, teacher, space, optuna), n_trials=cfg.trials - len(done))
    rows = trial_rows(study)
    pareto = pareto_rows(rows)
    if not pareto:
        raise DfkdError(f"--max-params {cfg.max_params}: no trial finished within the constraints; add trials "
                        f"(dfkd search --resume --trials N, N > {cfg.trials}, with the same limits), or raise the "
                        f"limits in a new search (another --out, or remove {cfg.out})")
    best = max(r["top1"] for r in pareto)
    chosen = min((r for r in pareto if r["top1"] >= best - cfg.tolerance), key=lambda r: r["params"])
    final_dir = Path(cfg.out) / "final"
    final = {} if final_dir.exists() else distill(_distill_cfg(
        cfg, chosen["student"], chosen["student_args"], final_dir, cfg.final_steps, cfg.final_minutes)).metrics
    write_report(Path(cfg.out), rows, pareto, chosen, final)
    return {"rows": rows, "pareto": pareto, "chosen": chosen, "final": final}
