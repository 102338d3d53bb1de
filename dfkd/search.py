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
into `<out>/final` (continued there after a stop; set aside as `final-trial-N` when a resume picks another).
What a trial would fail on is refused before the folder is made (`check_search`); a resumed search keeps its
settings but `RESUMABLE` once a trial has finished, and its teacher by sha256.

Search spaces: `lenet5` (width multipliers 0.25..1 of each LeNet-5 layer; the first trial is LeNet-5-half, the
reference the table is read against), or a user's `module:function(trial)` returning `(student_arch, student_args)`
with `trial.suggest_*` calls (as `--student` and `--student-arg` take them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import atomic_write_text, read_json_object
from dfkd.outpaths import folder_lock

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
    # how to read a teacher file that does not describe itself (the shared teacher options of `dfkd distill`)
    teacher_arch: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    channels: int | None = None
    input_size: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


#: The settings a resumed search may change: how many trials, where they run, and how the pick is made and
#: finished (the trials stay comparable); any, while no trial has finished.
RESUMABLE = ("trials", "device", "tolerance", "final_minutes", "final_steps")
#: The settings that are files: compared as the files they name, not as the strings that named them.
PATHS = ("teacher", "eval_data", "data", "transfer_data")
TEACHER_KEYS = ("teacher_arch", "arch_args", "trust_pickle", "channels", "input_size", "mean", "std")


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
    from dfkd.archs import import_callable, own_function

    space = import_callable(name, "--space")
    if not own_function(space):
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
                         fid_every=0, **{k: getattr(cfg, k) for k in TEACHER_KEYS})


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
    def ours(record: logging.LogRecord) -> bool:  # "Trial 1 failed with value None.": a diverged trial's, told
        return not (record.exc_info and isinstance(record.exc_info[1], DfkdError)) and not re.fullmatch(
            r"Trial \d+ failed with value None\.", record.getMessage())

    handlers = logging.getLogger("optuna").handlers
    for h in handlers:
        h.addFilter(ours)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(ours)


def objective(cfg: SearchConfig, teacher: Any, space: Callable, optuna: Any) -> Callable[[Any], float]:
    """The Optuna objective: measure, prune on constraints, distill half, report, finish, score.

    A student an earlier trial already scored (TPE draws the same widths again) is not distilled again: the same
    settings and seed make the same run, so the trial takes that trial's score (or its pruning) and says so.
    """
    from dfkd.engine import Diverged, distill, resume

    def run(trial: Any) -> float:
        try:
            return scored(trial)
        except Diverged as e:  # the study records the trial failed and goes on (`_search`'s catch)
            trial.set_user_attr("diverged", e.step)
            warnings.warn(f"trial {trial.number} ({trial.user_attrs['student']}) diverged at step {e.step}: it has "
                          "no score; the search goes on (a --resume runs the trials that did not finish again)",
                          stacklevel=1)
            raise

    def scored(trial: Any) -> float:
        arch, args = candidate(space, trial, cfg.space, optuna)
        params, latency = measure(teacher, arch, args)
        trial.set_user_attr("student", arch)
        trial.set_user_attr("student_args", args)
        trial.set_user_attr("params", params)
        trial.set_user_attr("latency_ms", latency)
        if params > cfg.max_params or (cfg.max_latency_ms is not None and latency > cfg.max_latency_ms):
            trial.set_user_attr("pruned", "constraint")
            raise optuna.TrialPruned()
        earlier = _same_student(trial.study, arch, args)
        if earlier is not None:
            trial.set_user_attr("same_as", earlier.number)
            if earlier.state != optuna_states().COMPLETE:
                trial.set_user_attr("pruned", "median")
                raise optuna.TrialPruned()
            return float(earlier.value)
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


def _same_student(study: Any, arch: str, args: dict[str, Any]) -> Any:
    """The first trial that scored (or median-pruned) this very student, else None."""
    for t in _finished(study):
        a = t.user_attrs
        if a.get("same_as") is None and a.get("student") == arch and a.get("student_args") == json.loads(
                json.dumps(args)) and (t.state == optuna_states().COMPLETE or a.get("pruned") == "median"):
            return t
    return None


def optuna_states() -> Any:
    """Optuna's trial states (`optuna.trial.TrialState`)."""
    return import_optuna().trial.TrialState


def _not_stopped(result: Any) -> Any:
    """A trial's run that finished while a stop signal came: the search stops there as it would mid-run.

    The run's handler holds the signal until the run is written, so a Ctrl-C in a trial's last moments went into
    that run alone and the search went on to the next trial.
    """
    if result.stop_requested:
        raise KeyboardInterrupt(f"stopped after {result.run_dir} finished; continue the search with --resume")
    return result


def check_search(cfg: SearchConfig, teacher: Any, optuna: Any) -> None:
    """Refuse what would fail in the first trial (or after the last) before the search folder is made.

    A method that does not exist, an unknown -p key, a data file that is missing or does not fit the teacher, a
    budget that is not a finite number: each was met in trial 0 (or, for the final budget, after every trial), and
    left a folder that only `rm -r` could clear.
    """
    import math

    from dfkd.auto import for_source
    from dfkd.data import load_for
    from dfkd.engine import check_config
    from dfkd.sources import source_for
    from dfkd.utils import pick_device

    for flag, value in (("--trial-minutes", cfg.trial_minutes), ("--final-minutes", cfg.final_minutes),
                        ("--max-latency-ms", cfg.max_latency_ms), ("--tolerance", cfg.tolerance)):
        if value is not None and not math.isfinite(value) and not (flag == "--max-latency-ms" and value > 0):
            raise DfkdError(f"{flag} {value}: must be a finite number")
    pick_device(cfg.device)
    first = for_source(_distill_cfg(cfg, None, {}, Path(cfg.out) / "trials" / "trial-0",
                                    _half(cfg.trial_steps, int), _half(cfg.trial_minutes, float)))
    check_config(first)
    source_for(first).check()
    load_for(cfg.eval_data, "--eval-data", teacher.num_classes, teacher.spec, teacher.class_names)
    if cfg.data:
        load_for(cfg.data, "--data", teacher.num_classes, teacher.spec, teacher.class_names)
    if cfg.transfer_data:
        from dfkd.transfer import check_teacher_fits, load_transfer

        check_teacher_fits(teacher, load_transfer(cfg.transfer_data))
    if cfg.space == "lenet5":
        smallest, _ = measure(teacher, *lenet5_space(optuna.trial.FixedTrial({f"w{i}": MULTIPLIERS[0]
                                                                                for i in range(4)})))
        if cfg.max_params < smallest:
            raise DfkdError(f"--max-params {cfg.max_params}: the smallest student of the lenet5 space (each layer "
                            f"{MULTIPLIERS[0]:g} of LeNet-5's width) has {smallest:,} parameters; allow at least "
                            f"{smallest}, or give a --space of smaller students")


def _absolute(cfg: SearchConfig) -> SearchConfig:
    """`cfg` with its files named from `/`: a search resumed from another folder names them otherwise."""
    from dataclasses import replace

    return replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in PATHS
                           if isinstance(getattr(cfg, k), str) and getattr(cfg, k).strip()})


def _settings(cfg: SearchConfig, teacher_sha256: str) -> str:
    return json.dumps({**asdict(cfg), "teacher_sha256": teacher_sha256}, indent=1)


def open_study(cfg: SearchConfig, optuna: Any, resume: bool, teacher_sha256: str = "") -> Any:
    """The study in `<out>/study.db`: new (the out folder must be new or empty) or, with `resume`, the stored one."""
    from dfkd.outpaths import prepare_run_dir

    out, db = Path(cfg.out), Path(cfg.out) / "study.db"
    if resume and not db.exists():
        raise DfkdError(f"--resume: {out} holds no search (no study.db); start it without --resume")
    if not resume:
        if db.exists():
            raise DfkdError(f"--out {out}: already holds a search; continue it with --resume (while none of its "
                            "trials has scored, a resume may change its settings) or pick another --out")
        prepare_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "search.json", _settings(cfg, teacher_sha256))
    with warnings.catch_warnings():  # heartbeats (which fail trials a killed search left running) are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.absolute()}", heartbeat_interval=60, grace_period=120)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3)
    study = optuna.create_study(storage=storage, study_name="search", direction="maximize", load_if_exists=resume,
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner)
    if resume and study.trials:  # a sampler seeded as at the start drew the first trials' students again
        sampler = optuna.samplers.TPESampler(seed=(cfg.seed + len(study.trials)) % 2**32)
        study = optuna.load_study(study_name="search", storage=storage, sampler=sampler, pruner=pruner)
    if resume:
        _same_settings(cfg, out, teacher_sha256, _scored(study))
        atomic_write_text(out / "search.json", _settings(cfg, teacher_sha256))
    return study


def _scored(study: Any) -> bool:
    """Whether a trial has a score, or was pruned by the scores: one pruned by the size limits alone has not."""
    return any(t.user_attrs.get("pruned") != "constraint" for t in _finished(study))


def _finished(study: Any) -> list[Any]:
    states = optuna_states()
    return study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED))


def _enqueue_reference(study: Any, cfg: SearchConfig) -> None:
    """LeNet-5-half first, the row the table is read against; again on a resume where it never finished."""
    ref = {f"w{i}": 0.5 for i in range(4)}
    if cfg.space != "lenet5" or any(t.params == ref for t in _finished(study)) or study.get_trials(
            deepcopy=False, states=(optuna_states().WAITING,)):
        return
    study.enqueue_trial(ref)


def _same_settings(cfg: SearchConfig, out: Path, teacher_sha256: str, scored: bool) -> None:
    """A resumed search keeps its settings once a trial has scored (RESUMABLE aside): trials must stay comparable.

    The teacher is the same file when its sha256 is (wherever it now lies); the other files are compared by where
    they are, however named.
    """
    saved = out / "search.json"
    before = read_json_object(saved, "put back the file the search wrote, or start a new search with another "
                                     "--out") if saved.exists() else {}
    if not scored:  # nothing to compare with: the settings that failed (or diverged) may be mended
        return
    if before.get("teacher_sha256") and teacher_sha256 and before["teacher_sha256"] != teacher_sha256:
        raise DfkdError(f"--teacher {cfg.teacher}: not the teacher {out} was searched with ({before['teacher']}; "
                        "the files' sha256 differ): its trials would rank students of two teachers; give that "
                        "teacher, or start a new search (another --out)")
    for key, value in asdict(cfg).items():
        if key in (*RESUMABLE, "out") or key not in before or (key == "teacher" and before.get("teacher_sha256")):
            continue
        now, then = json.loads(json.dumps(value)), before[key]
        if key in PATHS and isinstance(now, str) and isinstance(then, str):
            now, then = os.path.abspath(now), os.path.abspath(then)
        if now != then:
            raise DfkdError(f"--resume: {key} was {before[key]!r} in {out}, now {value!r}; a resumed search keeps "
                            f"its settings (only {', '.join(RESUMABLE)} may change)")


def search(cfg: SearchConfig, teacher: Any, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the search to `cfg.trials` finished trials, write the Pareto table and plot, distill the pick.

    Returns:
        {"rows": every trial as a dict, "pareto": the Pareto rows, "chosen": the picked row, "final": its metrics}.
    """
    optuna = import_optuna()
    space = resolve_space(cfg.space)
    check_search(cfg, teacher, optuna)
    cfg = _absolute(cfg)
    out = Path(cfg.out)
    busy = f"--out {out}: a search is running in it ({{pid}}); wait for it to end, or give another --out"
    with ExitStack() as held:  # a --resume of a running search added trials to its study, beside the first
        existed = out.is_dir()
        if existed:
            held.enter_context(folder_lock(out, busy))
        study = open_study(cfg, optuna, resume, getattr(teacher, "sha256", ""))
        if not existed:  # made by open_study
            held.enter_context(folder_lock(out, busy))
        return _search(cfg, teacher, optuna, space, study)


def _search(cfg: SearchConfig, teacher: Any, optuna: Any, space: Any, study: Any) -> dict[str, Any]:
    """The trials still to run, the Pareto table, the pick and its final distillation (see `search`)."""
    from dfkd.engine import Diverged
    from dfkd.search_report import pareto_rows, trial_rows, write_report

    done = _finished(study)
    if cfg.trials > len(done):
        _enqueue_reference(study, cfg)
        with errors_told_once(), warnings.catch_warnings():
            warnings.simplefilter("once", UserWarning)  # each trial loads the teacher: its warnings once, not per run
            study.optimize(objective(cfg, teacher, space, optuna), n_trials=cfg.trials - len(done),
                           catch=(Diverged,))
    rows = trial_rows(study)
    pareto = pareto_rows(rows)
    diverged = [r for r in rows if r["diverged"] is not None]
    if not pareto and diverged:  # a trial stopped by a signal has no score either, but did not diverge
        raise DfkdError(f"-p: no trial has a score and {len(diverged)} of the {len(rows)} trials diverged (a loss "
                        "became non-finite): lower the learning rates (e.g. -p lr_s=... -p lr_g=...) and continue "
                        "with the same command and --resume (its settings may change while no trial has scored)")
    if not pareto:
        limits = f"--max-params {cfg.max_params}" + (
            f" / --max-latency-ms {cfg.max_latency_ms}" if cfg.max_latency_ms is not None else "")
        raise DfkdError(f"{limits}: no trial finished within the limits; add trials (dfkd search --resume --trials "
                        f"N, N > {cfg.trials}; the trials pruned so far stay pruned, whatever limits a resume gives), "
                        f"or raise the limits in a new search (another --out, or remove {cfg.out})")
    best = max(r["top1"] for r in pareto)
    chosen = min((r for r in pareto if r["top1"] >= best - cfg.tolerance), key=lambda r: r["params"])
    final = final_student(cfg, chosen, rows)
    write_report(Path(cfg.out), rows, pareto, chosen, final)
    return {"rows": rows, "pareto": pareto, "chosen": chosen, "final": final}


def final_student(cfg: SearchConfig, chosen: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Distill the chosen student fully into `<out>/final` (continued there when a stop cut it short); its metrics.

    A `final/` of another student (a resume with more trials picked another) or another budget is set aside as
    `final-trial-N` (N: the trial it came from), with a warning: it was kept as if it were the pick's. A pick that
    goes back to a set-aside student (a resume with the --tolerance before) takes that run back as `final/`.
    """
    from dfkd.engine import distill

    out, budget = Path(cfg.out), {"steps": cfg.final_steps, "budget_minutes": cfg.final_minutes}
    final_dir = out / "final"
    if final_dir.is_dir():
        if _final_of(final_dir, chosen, budget):
            return _finish(final_dir)
        _set_aside(final_dir, _run_config(final_dir), rows, chosen)
    for kept in sorted(out.glob("final-*")):
        if kept.is_dir() and _final_of(kept, chosen, budget):
            kept.rename(final_dir)
            warnings.warn(f"{kept} held the pick's student (trial {chosen['trial']}) with this final budget: it is "
                          f"{final_dir} again", stacklevel=2)
            return _finish(final_dir)
    return _not_stopped(distill(_distill_cfg(cfg, chosen["student"], chosen["student_args"], final_dir,
                                             cfg.final_steps, cfg.final_minutes))).metrics


def _finish(run_dir: Path) -> dict[str, float]:
    """A finished run's student metrics; an unfinished one is continued to its budget first."""
    from dfkd.engine import resume

    metrics = _finished_metrics(run_dir)
    return metrics if metrics is not None else _not_stopped(resume(run_dir)).metrics


def _final_of(run_dir: Path, chosen: dict[str, Any], budget: dict[str, Any]) -> bool:
    """`run_dir` is a run (it has a checkpoint) of the chosen student with this final budget."""
    from dfkd.outpaths import RUN_MARKER

    saved = _run_config(run_dir)
    return (run_dir / RUN_MARKER).is_file() and {k: saved.get(k) for k in ("student", "student_args", *budget)} == {
        "student": chosen["student"], "student_args": chosen["student_args"], **budget}


def _run_config(run_dir: Path) -> dict[str, Any]:
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _finished_metrics(run_dir: Path) -> dict[str, float] | None:
    """The student metrics of a finished run's last "finished" record; None while the run is not finished."""
    from dfkd.checkpoint import load_checkpoint
    from dfkd.runlog import parse_record, read_lines

    try:
        if not load_checkpoint(run_dir / "checkpoint.pt")["finished"]:
            return None
        lines = read_lines(run_dir / "metrics.jsonl")
    except (DfkdError, OSError):  # a damaged run: the resume that follows says what is wrong with it
        return None
    ends = [r for r in map(parse_record, lines) if r and r.get("event") == "finished"]
    if not ends or not (run_dir / "student.pt").is_file():
        return None
    prefix = "student/"
    return {k[len(prefix):]: v for k, v in ends[-1].items() if k.startswith(prefix)}


def _set_aside(final_dir: Path, saved: dict[str, Any], rows: list[dict[str, Any]], chosen: dict[str, Any]) -> None:
    of = [r["trial"] for r in rows if r["student"] == saved.get("student") and r["student_args"] == saved.get(
        "student_args") and r.get("same_as") is None]
    name = f"final-trial-{of[0]}" if of else "final-previous"
    aside, n = final_dir.with_name(name), 1
    while aside.exists():
        n += 1
        aside = final_dir.with_name(f"{name}-{n}")
    final_dir.rename(aside)
    if saved.get("student_args") == chosen["student_args"] and saved.get("student") == chosen["student"]:
        why = f"the pick's student (trial {chosen['trial']}) distilled with another final budget"
    else:
        why = f"{f'trial {of[0]}' if of else 'another trial'}'s student; the pick is now trial {chosen['trial']}"
    warnings.warn(f"{final_dir} held {why}: that folder is now {aside}", stacklevel=3)
