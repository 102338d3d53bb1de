"""The distillation loop: `distill(config)` and `resume(run_dir)`.

Rounds of {synthesis steps; student steps} as the method's recipe schedules them, under a budget of student
steps or wall-clock minutes; evaluation, TensorBoard, atomic checkpoints, clean stop on Ctrl-C, and a refusal
to go on from non-finite losses. A step is one student update.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Collection
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dfkd.archs import flag_spec
from dfkd.auto import AUTO, for_source, set_by_auto
from dfkd.auto import resolve as resolve_auto
from dfkd.build import build_method
from dfkd.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dfkd.config import DistillConfig, check_file_archs, check_method_params
from dfkd.cost import millions
from dfkd.data import ImageData, load_for
from dfkd.distributed import (
    SINGLE,
    Dist,
    OtherRankFailed,
    joined,
    rank_device,
    rank_seed,
    resume_command,
    under_torchrun,
)
from dfkd.ensemble import EnsembleTeacher, repeated_teacher
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy, data_doubt, size_note
from dfkd.io import WriteFailed, atomic_write_text, disk_error, remove_stale_temps, same_data, sha256_file
from dfkd.logbuf import LossBuffer
from dfkd.memory import out_of_memory, peak_device_mib, peak_rss_mib
from dfkd.methods import Method, get_method
from dfkd.methods._recipes import heavy_teacher
from dfkd.methods.base import ADDED_SETTINGS
from dfkd.modelfile import ModelFile, save_model, student_problem
from dfkd.monitor import FIDMonitors, log_hparams
from dfkd.outpaths import RUN_MARKER, folder_lock, name_max, prepare_run_dir, probe_writable
from dfkd.precision import Precision, auto_bf16_line, deterministic_env, resolve_precision, run_networks
from dfkd.runlog import NullLog, RunLog
from dfkd.runwatch import RunWatch
from dfkd.sources import Source, source_for
from dfkd.spec import InputSpec
from dfkd.stopping import on_stop_signals
from dfkd.teacher import Teacher
from dfkd.utils import on_terminal, pick_device, progress_bar, seed_everything
from dfkd.validate import check_settings

DEFAULT_BUDGET_MINUTES = 10.0


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves: its folder, last step and final metrics."""

    run_dir: Path
    step: int
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0  # the process's peak resident memory at the end of the run
    selected: str = ""  # which student student.pt is, when held-out selection chose it (dfkd.selection)
    rank: int = 0  # this process's rank in a torchrun job (only rank 0 wrote the run folder)
    stop_requested: bool = False  # a stop signal came while the run was finishing: it finished (a caller may stop)


class Interrupted(DfkdError):
    """Ctrl-C: the run saved a checkpoint at a round boundary and stopped."""


class Diverged(DfkdError):
    """A loss became non-finite: the run stopped at `step`, its last good checkpoint kept."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


#: Wall time after which a round boundary checkpoints whatever --ckpt-every says (any rank's, agreed): on a heavy
#: teacher 250 steps took hours, all lost to a scheduler's kill. Wall time, not the budget's clock: a kill takes
#: evaluation, logging and FID time with it too, and a CPU clock runs slower than the wall on a busy machine.
CHECKPOINT_SECONDS = 600.0
#: Under torchrun's agent the interval is its shutdown grace: the agent passes a stop signal on to its processes and
#: kills them 30 s later, so a round longer than that (a heavy teacher, a paper recipe) was lost whole with every
#: step since the last checkpoint, though the run had said it was saving one.
TORCHRUN_KILL_SECONDS = 30.0


def checkpoint_seconds() -> float:
    """Wall seconds between time-based checkpoints: `TORCHRUN_KILL_SECONDS` under torchrun's agent, else 10 minutes."""
    return TORCHRUN_KILL_SECONDS if under_torchrun() else CHECKPOINT_SECONDS



@contextmanager
def _graceful_stop(talk: bool) -> Any:
    """The first stop signal sets a flag the loop checks between rounds; a second one interrupts at once.

    SIGTERM is how `kill`, `docker stop`, Slurm's time limit and torchrun's agent stop a process: a plain run killed
    so lost every step since its last checkpoint, without a word. Held from before the run is built to after its
    student is written, so a stop during start-up or the final evaluation also waits for a boundary. The first
    signal is answered at once (`talk`: this process says it; rank 0), naming what a second one would lose;
    `stop["run"]`, set once the run is built, tells which checkpoint that is.
    """
    stop: dict[str, Any] = {"stop": False, "run": None}

    def handler(signum: int, frame: Any) -> None:
        run = stop["run"]
        if stop["stop"]:
            raise KeyboardInterrupt(_abandoned(run))
        stop["stop"] = True
        if talk and run is not None and run.finishing:
            tqdm.write("stopping: the run is writing its student and ends when that is done", file=sys.stderr)
        elif talk:
            saved = "" if run is None else f", losing the steps since the last checkpoint, at step {run.saved_step}"
            again = "Ctrl-C" if signum == signal.SIGINT else "stop signal"  # SIGTERM: kill, a scheduler
            # a heavy teacher's round takes minutes on a CPU: the wait is said, not left to look like a hang
            wait = "" if run is None or run.round_seconds < 10 else \
                f"; a round has taken about {run.round_seconds:.0f} s here"
            if wait and under_torchrun() and run.round_seconds >= TORCHRUN_KILL_SECONDS / 2:
                wait += (f", and torchrun kills its processes {TORCHRUN_KILL_SECONDS:.0f} s after it passes a stop on: "
                         f"this round may be lost, and the run then resumes from step {run.saved_step}")
            tqdm.write(f"stopping: the run saves a checkpoint at the end of this round and stops (a second "
                       f"{again} stops at once{saved}){wait}", file=sys.stderr)

    with on_stop_signals(handler):
        yield stop


def _abandoned(run: Run | None) -> str:
    """What a second stop signal left: the steps since the last checkpoint are lost; how to go on from it."""
    if run is None or not (run.run_dir / RUN_MARKER).exists():
        return "stopped at once, before the run's first checkpoint: nothing of it is kept"
    if run.finishing:
        return (f"stopped at once while the run wrote its student: its checkpoint holds every step ({run.step}); "
                f"write the student with {run.resume_command()}")
    return (f"stopped at once at step {run.step}: the steps after step {run.saved_step} (the last checkpoint) are "
            f"lost; continue with {run.resume_command()}")


def _spec_from_flags(cfg: DistillConfig) -> InputSpec | None:
    try:
        return flag_spec(cfg.channels, cfg.input_size, cfg.mean, cfg.std, cfg.teacher_arch, cfg.arch_args)
    except DfkdError as e:
        if str(e).startswith("input spec:"):  # name the flags, not the spec they make
            raise DfkdError(f"--channels/--mean/--std: {e}") from None
        raise


def new_run_dir(cfg: DistillConfig, teacher_path: str) -> tuple[Path, bool]:
    """`--out` (new or empty), or runs/<date>-<method>-<teacher name>; returns (folder, whether it was created)."""
    if cfg.out:
        return prepare_run_dir(cfg.out)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    # the teacher's name cut to fit a folder name (and "-N" after it): a long file name made a name the system
    # refused, with the advice to give a shorter one the user never gave
    name = f"{stamp}-{cfg.method}-{Path(teacher_path).stem}"
    longest = name_max(Path(cfg.runs_dir) / "x") - 8
    base = Path(cfg.runs_dir) / name.encode()[:longest].decode(errors="ignore")
    d, i = base, 1
    while d.exists():
        d, i = Path(f"{base}-{i}"), i + 1
    default = cfg.runs_dir == DistillConfig.runs_dir  # the user set no folder: --out is the way to another
    return prepare_run_dir(d, "the run folder (no --out given)" if default else "runs_dir (a --config key)")


class Run:
    """One distillation run: builds teacher, student and method from a config, then loops."""

    def __init__(self, cfg: DistillConfig, run_dir: Path, ckpt: dict[str, Any] | None = None,
                 dist: Dist = SINGLE, changed: Collection[str] = ()) -> None:
        """`changed`: the method settings given with --resume (named when the checkpoint does not fit them)."""
        self.cfg, self.run_dir, self.dist = cfg, run_dir, dist
        self.cwd = os.getcwd()  # where relative paths were given (read at a checkpoint, a deleted folder raised)
        self.changed = tuple(changed)
        self.source: Source = source_for(cfg)
        self.source.check(new=ckpt is None)
        self.device = pick_device(rank_device(cfg.device, dist))
        if cfg.deterministic:
            deterministic_env()  # before the teacher's first forward creates the cuBLAS handle
        seed_everything(cfg.seed)
        self.teacher = self.source.teacher(self.device)
        if ckpt is not None:
            _refuse_other_teacher(run_dir, ckpt, self.teacher)
        cfg, auto_line = resolve_auto(cfg, self.teacher, self.device)  # --method auto: the method for this teacher
        self.cfg = self.source.cfg = cfg
        _refuse_gradient_free(self.teacher, cfg.method)
        self.eval_data: ImageData | None = None
        self.teacher_top1: float | None = None  # on --eval-data, when the teacher recognises it (_score_teacher)
        if cfg.eval_data:
            t = self.teacher
            self.eval_data = load_for(cfg.eval_data, "--eval-data", t.num_classes, t.spec, t.class_names)
            trains = self.source.path
            if trains and dist.main and same_data(cfg.eval_data, trains):  # its top-1 was read as a test's
                flag = "--" + str(self.source.flag).replace("_", "-")
                warnings.warn(f"--eval-data {cfg.eval_data} is the {flag} the student trains on: its top-1 there is "
                              "training accuracy, not a test; give held-out images", stacklevel=2)
        self.fid = FIDMonitors.for_run(self.teacher, cfg.fid_ref, self.device) \
            if cfg.fid_every and dist.main else FIDMonitors([])
        built = build_method(cfg.method, self.teacher, self.source.overrides(), self.device, cfg.seed,
                             cfg.student, cfg.student_args, cfg.quantize,
                             local=lambda p: self.source.local_params(p, dist.world),
                             by_auto=set_by_auto(cfg.auto_choice),
                             student_init=cfg.student_init if self.source.has_teacher else "random",
                             resumed=ckpt is not None, changed=changed, yours=_yours(ckpt, changed),
                             from_file=cfg.from_file)
        self.method: Method = built.method
        self.yours = built.yours
        self.params, self.student_name, self.student_kwargs = built.params, built.student_name, built.student_kwargs
        self.recipe_lines = [auto_line] * bool(auto_line) + built.recipe_lines
        self.init_line = built.init_line.removeprefix("student init: ")
        self._share(run_dir)
        if cfg.steps is None and cfg.budget_minutes is None and (auto := self.source.default_steps(self.method)):
            self.cfg = cfg = replace(cfg, steps=auto[0])  # a transfer file's length sets the run's (config.json)
            self.recipe_lines = [*self.recipe_lines, auto[1]]
        if cfg.fid_every and dist.main and not self.fid.monitors and self.source.has_teacher:  # it was silent
            self.recipe_lines.append("  FID: none (the teacher has no BatchNorm layer for the data-free BN-FID; "
                                     "--fid-ref STATS.npz from `dfkd fid-stats --features teacher` adds a "
                                     "teacher-feature FID)")
        self.step, self.elapsed = 0, 0.0
        self.saved_step = 0  # the last checkpoint's step (a second Ctrl-C's loss)
        self.saved_wall = time.perf_counter()  # when this process last wrote (or found) a checkpoint
        self.round_seconds = 0.0  # wall time of the last round (how long a stop waits for the round's end)
        self.longest_round = 0.0  # the budget clock's seconds of this process's longest round (an overrun's why)
        self.finishing = False  # the loop is done: the student is being evaluated and written
        self.stop: dict[str, Any] = {"stop": False}  # set by a stop signal (`_graceful_stop`, from `_execute`)
        self.watch = RunWatch(self)
        self.precision = self._precision()
        self.precision.prepare(run_networks(self.method))
        self.losses = LossBuffer()  # summed on the device, read back on logging steps only
        self.image_step = -1  # the step of the last synthetic-image grid logged
        if ckpt is not None:
            try:
                self._restore(ckpt)
            except BaseException:  # a checkpoint that does not fit: the process's flags and files as they were
                self.close()
                raise

    def _precision(self) -> Precision:
        """The run's numerics; `auto`'s bf16 on a CPU (a heavy teacher, a native bf16 unit) says so at start."""
        cfg = self.cfg
        macs = heavy_teacher(self.teacher) if cfg.precision == "auto" and self.source.has_teacher else None
        name = resolve_precision(cfg.precision, self.device, self.dist.world, heavy=macs is not None)
        if cfg.precision == "auto" and name == "bf16":
            self.recipe_lines.append(auto_bf16_line("teacher", millions(macs)))
        return Precision(name, self.device, cfg.compile, cfg.deterministic)

    def close(self) -> None:
        """Release the method's files and put back the process-wide flags `Precision.prepare` set."""
        self.method.close()
        self.precision.restore()

    def _share(self, run_dir: Path) -> None:
        """Storage for the pool and bank (files, not checkpoints); under torchrun, each rank's stream and shard."""
        d = self.dist
        self.method.attach_storage(run_dir if d.main else run_dir / f"rank{d.rank}")
        if d.enabled:
            if self.params.get("collapse_action") == "reset":
                raise DfkdError("-p collapse_action=reset: not supported on several processes (each rank would "
                                "judge collapse on its own batch); use collapse_action=warn with torchrun")
            d.share(self.method)
            seed_everything(rank_seed(self.cfg.seed, d.rank))
            self.source.shard(self.method, d.rank, d.world)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from `ckpt`: the shared state, and this rank's own RNG, synthesizer and method state."""
        state, rng = dict(ckpt["method"]), ckpt["rng"]
        ranks = ckpt.get("extra", {}).get("ranks")
        if ranks is not None:
            mine = ranks[self.dist.rank]
            state.update(synth=mine["synth"], extra=mine["extra"])
            rng = mine["rng"]
        try:
            self.method.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            if not self.changed:
                raise
            given = " ".join(f"-p {k}=..." for k in self.changed)
            raise DfkdError(f"--resume {self.run_dir}: its checkpoint does not fit the settings given with it "
                            f"({given}: {str(e).strip().splitlines()[0][:200]}); a setting that shapes the networks "
                            "or their optimisers (ngf, nz, ...) stays as the run was made: drop it, or "
                            "start a new run") from None
        set_rng_state(rng, self.device)
        self.step, self.elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        self.saved_step = self.step
        self.watch.load_state_dict(ckpt.get("extra", {}).get("watch", {}))
        self.precision.load_state_dict(ckpt.get("extra", {}).get("precision", {}))

    # --- bookkeeping --------------------------------------------------------------------------------------
    def resolved_config(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d["params"] = self.params
        d["student"] = self.student_name
        return d

    def budget_seconds(self) -> float | None:
        if self.cfg.steps is None:
            return 60.0 * (self.cfg.budget_minutes or DEFAULT_BUDGET_MINUTES)
        return None if self.cfg.budget_minutes is None else 60.0 * self.cfg.budget_minutes

    def progress(self) -> float:
        if self.cfg.steps:
            return min(self.step / self.cfg.steps, 1.0)
        return min(self.elapsed / self.budget_seconds(), 1.0)

    def done(self) -> bool:
        budget = self.budget_seconds()
        return (self.cfg.steps is not None and self.step >= self.cfg.steps) or \
            (budget is not None and self.elapsed >= budget)

    @property
    def chunk(self) -> int:
        """Images per forward outside training (evaluation, FID, logging): at most the run's batch size."""
        return max(1, int(self.params["batch_size"]))

    def resume_command(self) -> str:
        """The command that continues this run (its process count; --trust-pickle where its teacher is a pickle)."""
        return resume_command(self.run_dir, self.dist.world, self.cfg.trust_pickle)

    def checkpoint(self, finished: bool = False) -> None:
        """Rank 0 writes checkpoint.pt; under torchrun it holds every rank's RNG, synthesizer and method state."""
        self._read_losses(reset=False)  # no checkpoint of a diverged run
        state = self.method.state_dict()
        mine = {"rng": rng_state(self.device), "synth": state["synth"], "extra": state["extra"]}
        ranks = self.dist.gather(mine)
        extra: dict[str, Any] = {"watch": self.watch.state_dict(), "world": self.dist.world,
                                 "precision": self.precision.state_dict(), "cwd": self.cwd,
                                 "teacher_sha256": self.teacher.sha256, "yours": list(self.yours)}
        if self.dist.enabled:
            extra["ranks"] = ranks
        self.dist.on_main(lambda: save_checkpoint(
            self.run_dir / "checkpoint.pt", config=self.resolved_config(), step=self.step, elapsed=self.elapsed,
            method_state=state, finished=finished, extra=extra, rng=mine["rng"]))
        self.saved_step = self.step
        self.saved_wall = time.perf_counter()

    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None or not self.dist.main:
            return {}
        res = accuracy(self.method.student, self.eval_data, self.teacher.spec, self.device, batch_size=self.chunk)
        return {"top1": res["top1"], "top5": res["top5"]}

    # --- the loop -----------------------------------------------------------------------------------------
    def loop(self, log: RunLog) -> RunResult:
        cfg = self.cfg
        last = {"ckpt": self.step // cfg.ckpt_every, "eval": self.step // cfg.eval_every,
                "img": self.step // cfg.image_every, "log": self.step // cfg.log_every,
                "fid": self.step // max(cfg.fid_every, 1)}
        window = {"t": 0.0, "steps": 0, "samples": 0, "student_s": self.method.student_seconds}
        metrics: dict[str, float] = {}
        clock = time.process_time if cfg.budget_clock == "cpu" else time.perf_counter
        self.method.clock = clock
        bar = progress_bar(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", unit="step", dynamic_ncols=True,
                           disable=not self.dist.main)
        first = True  # the first round of this process
        sig = self.stop
        with bar:  # the bar ends its line before any error is printed
            _, early, _ = self.dist.agree(0.0, sig["stop"], False)
            if early:  # a stop during start-up: the checkpoint of this step is there, no round need wait
                bar.close()
                raise self._stopped()
            while not self.done():
                self.method.set_progress(self.progress())
                self.method.steps_left = None if cfg.steps is None else cfg.steps - self.step
                self.method.time_budget = self.budget_seconds()
                self.method.time_left = None if self.method.time_budget is None else \
                    self.method.time_budget - self.elapsed
                n = self.method.student_steps_per_round
                waiting, first = self._show_waiting(bar, log, first), False
                t0, c0 = time.perf_counter(), clock()
                with self.precision.autocast():
                    self.losses.add(self.method.round())
                self.precision.after_round(self.method)
                self.dist.sync_buffers(self.method)
                used, sig["stop"], _ = self.dist.agree(clock() - c0, sig["stop"], False)
                dt = time.perf_counter() - t0
                self.round_seconds = dt
                self.elapsed += used
                self.longest_round = max(self.longest_round, used)
                self.step += n
                window["t"] += dt
                window["steps"] += n
                window["samples"] += n * int(self.params["batch_size"])
                if waiting:  # cleared before the update draws the bar: the round's steps are made
                    bar.set_postfix_str("", refresh=False)
                bar.update(n)
                if self.dist.main:  # the watch reads rank 0's batches; it draws nothing from the training streams
                    self.watch.after_round(log, n)
                if self.step // cfg.log_every > last["log"]:
                    last["log"] = self.step // cfg.log_every
                    losses = self._read_losses()
                    perf = {"samples_per_s": window["samples"] / window["t"],
                            "steps_per_s": window["steps"] / window["t"],
                            "lr_s": self.method.opt_s.param_groups[0]["lr"],
                            "synthesis_share": 1 - (self.method.student_seconds - window["student_s"]) / window["t"],
                            "peak_rss_mib": peak_rss_mib(), "elapsed_s": self.elapsed}
                    if (gpu := peak_device_mib(self.device)) is not None:
                        perf["peak_gpu_mib"] = gpu
                    log.scalars(self.step, losses, "loss/")
                    log.scalars(self.step, perf, "perf/")
                    window = {"t": 0.0, "steps": 0, "samples": 0, "student_s": self.method.student_seconds}
                    bar.set_postfix({k.split("/", 1)[-1]: f"{v:.3g}" for k, v in list(losses.items())[:3]} |
                                    ({"acc": f"{100 * metrics['top1']:.1f}%"} if "top1" in metrics else {}),
                                    refresh=on_terminal())
                if self.step // cfg.image_every > last["img"] and self.method.last_images is not None \
                        and self.dist.main:
                    last["img"] = self.step // cfg.image_every
                    self._log_images(log)
                if self.step // cfg.eval_every > last["eval"]:
                    last["eval"] = self.step // cfg.eval_every
                    metrics = self.evaluate() or metrics
                    if metrics:
                        log.scalars(self.step, {**metrics, **self.watch.evaluate()}, "student/")
                if self.fid and self.step // cfg.fid_every > last["fid"]:
                    last["fid"] = self.step // cfg.fid_every
                    log.scalars(self.step, self.fid.measure_method(self.method, cfg.fid_samples, self.step,
                                                                      self.chunk), "fid/")
                # agreed last, after evaluation and logging: a stop signal a rank took after the round's agreement
                # made it checkpoint alone while the others went on (a gloo collective mismatch)
                wall_due = time.perf_counter() - self.saved_wall >= checkpoint_seconds()
                _, stop, due = self.dist.agree(0.0, sig["stop"], wall_due)
                sig["stop"] = sig["stop"] or stop
                if self.step // cfg.ckpt_every > last["ckpt"] or due:
                    last["ckpt"] = self.step // cfg.ckpt_every
                    self.checkpoint()
                if stop:
                    if self.saved_step != self.step:  # not written twice at one step (every rank agrees on both)
                        self.checkpoint()
                    bar.close()
                    raise self._stopped()
        bar.close()
        self._read_losses()
        return RunResult(self.run_dir, self.step, True, metrics)

    def _stopped(self) -> Interrupted:
        """The error of a run stopped at a round boundary, its checkpoint written."""
        return Interrupted(f"stopped at step {self.step}; checkpoint saved. Continue with: {self.resume_command()}")

    def _show_waiting(self, bar: tqdm, log: RunLog, first: bool) -> str | None:
        """Put on the bar what the next round does before its first student step; returns it (None: nothing).

        A warm-up, or the `first` round's synthesis, which on a heavy teacher may take minutes with the step count
        at 0; a method's warm-up is also said once, at the first round, as a note.
        """
        waiting = self.method.waiting()
        if waiting and first and self.dist.main:
            tqdm.write(f"note: step {self.step}: {self.cfg.method}: {waiting}", file=sys.stderr)
            log.event(self.step, event="note", message=waiting)
        if first and not waiting:
            waiting = "synthesizing before the first student step"
        if waiting:
            bar.set_postfix_str(waiting, refresh=on_terminal())
        return waiting

    def _log_images(self, log: RunLog) -> None:
        self.image_step = self.step
        x = self.method.last_images
        t_logits = getattr(self.method, "last_logits", None)  # the transfer method's stored labels
        if t_logits is None:
            with torch.no_grad():
                t_logits = torch.cat([self.teacher(c) for c in x[:256].split(self.chunk)])
        log.synthetic(self.step, x, self.teacher.spec, t_logits)

    def _read_losses(self, reset: bool = True) -> dict[str, float]:
        """The loss terms' means since the last logging step (one host sync); stop if one is not finite.

        Every rank calls it at the same steps (logging steps, checkpoints, the end), so the stop is agreed.
        """
        losses = self.losses.read(reset=reset) if self.losses else {}
        _, _, bad = self.dist.agree(0.0, False, self._nonfinite(losses))
        self._check_finite(losses, bad)
        return losses

    @staticmethod
    def _nonfinite(losses: dict[str, float]) -> bool:
        return not all(math.isfinite(v) for v in losses.values())

    def _check_finite(self, losses: dict[str, float], agreed: bool) -> None:
        """Stop on a non-finite loss (`agreed`: on any rank, so that every rank stops at the same round)."""
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if agreed:
            what = f"{', '.join(bad)} became {losses[bad[0]]}" if bad else "a loss became non-finite on another rank"
            weight = " or the objectives' weight (-p feature_weight=...)" if len(self.method.objectives) else ""
            raise Diverged(
                f"training diverged at step {self.step}: {what}. The last good "
                f"checkpoint is in {self.run_dir}; lower the learning rates (e.g. -p lr_g=... -p lr_s=...){weight} "
                f"and continue with: {self.resume_command()} -p ...", self.step)

    def _say_overrun(self, log: RunLog) -> None:
        """Say when the rounds ran well past the time budget.

        The budget is checked between rounds: a heavy teacher's first round, which measures the speed, took
        minutes of a 12-second budget, unsaid.
        """
        budget = self.budget_seconds()
        if budget is None or self.elapsed < max(1.25 * budget, budget + 10):
            return
        if self.longest_round < self.elapsed - budget:  # not this process's rounds: a resume with a smaller budget
            return
        message = (f"the rounds took {self.elapsed:.0f} s of a {budget:.0f}-s budget: the budget is checked between "
                   f"rounds, and one took up to {self.longest_round:.0f} s here (give a larger --budget-minutes, or "
                   "--steps)")
        tqdm.write(f"note: step {self.step}: {message}", file=sys.stderr)
        log.event(self.step, event="note", message=message)

    def finish(self, log: RunLog, result: RunResult) -> RunResult:
        if self.saved_step != self.step:  # every rank: a stop or kill while the student is written loses no step
            self.checkpoint()
        self.finishing = True
        if not self.dist.main:  # rank 0 writes the student; the others only hand it their last state
            self.checkpoint(finished=True)
            return result
        self._say_overrun(log)
        final = self.evaluate()
        if final:
            log.scalars(self.step, final, "student/")
        result.metrics = final or result.metrics
        if self.method.last_images is not None and self.image_step != self.step:
            self._log_images(log)  # the last step is always shown, however short the run
        fids = self.fid.measure_method(self.method, self.cfg.fid_samples, self.step, self.chunk)
        if self.fid.fresh:
            log.scalars(self.step, fids, "fid/")
        student, final, result.selected = self.watch.finish(log, final)
        result.metrics = final or result.metrics
        log_hparams(log.tb, self.resolved_config(), {**final, **{f"fid_{k}": v for k, v in fids.items()}}, self.step)
        meta = ModelFile(self.student_name, self.student_kwargs, self.teacher.spec, self.teacher.num_classes,
                         self.teacher.class_names,
                         {"kind": "student", "method": self.cfg.method, "teacher": self.teacher.source,
                          "teacher_sha256": self.teacher.sha256, "steps": self.step, "selected": result.selected,
                          **{f"eval_{k}": v for k, v in final.items()}})
        save_model(self.run_dir / "student.pt", student, meta)
        if self.cfg.quantize:
            from dfkd.qat import write_int8

            write_int8(self)
        self.checkpoint(finished=True)
        result.peak_rss_mib = peak_rss_mib()
        log.scalars(self.step, {"peak_rss_mib": result.peak_rss_mib}, "perf/")
        log.event(self.step, event="finished", elapsed=self.elapsed, peak_rss_mib=result.peak_rss_mib,
                  selected=result.selected,
                  **{f"student/{k}": v for k, v in final.items()})
        return result


def _after_failed_write(run: Run) -> str:
    if (run.run_dir / "checkpoint.pt").exists():
        return f"the last good checkpoint is intact: continue with {run.resume_command()}"
    return "no checkpoint was written, so nothing of the run is kept: start it again"


def _start(run: Run, log: RunLog) -> None:
    """A new run's config.json, teacher accuracy and first record (rank 0)."""
    _write_config(run)
    _say_recipe(run)
    members = run.teacher.members if isinstance(run.teacher, EnsembleTeacher) else []
    if twice := repeated_teacher(run.cfg.teachers, members):
        warnings.warn(twice, stacklevel=2)
    for teacher in getattr(run.teacher, "members", [run.teacher]):  # an ensemble's own teachers
        for note in getattr(teacher, "notes", ()):
            log.event(0, event="teacher_note", message=note)
    _score_teacher(run, log)


def _say_resumed(run: Run) -> None:
    """A resumed run's config.json (the settings it goes on with) and its first lines (rank 0)."""
    _write_config(run)
    _say_recipe(run, resumed=True)


def _write_config(run: Run) -> None:
    """config.json: the settings the run goes on with (a resume's -p, --steps, ... included; rank 0)."""
    atomic_write_text(run.run_dir / "config.json", json.dumps(run.resolved_config(), indent=2) + "\n")


def _score_teacher(run: Run, log: RunLog) -> None:
    """The teacher's top-1 on --eval-data (the mark the student's is read against), and a warning when it is doubtful.

    Data the teacher does not recognise (another task's, or its own prepared otherwise) makes the student's test
    accuracy meaningless; the warning goes where the run's other warnings go (progress output, metrics.jsonl,
    `dfkd report`). A new run does it at its start, a resumed one at its resume step (--resume may bring other
    data). A top-1 without doubt is kept as `run.teacher_top1`: the run's end reads the student's against it.
    """
    if run.eval_data is None or not run.source.has_teacher:
        return
    top1 = accuracy(run.teacher, run.eval_data, run.teacher.spec, run.device, batch_size=run.chunk)["top1"]
    log.scalars(run.step, {"teacher_top1": top1}, "student/")
    resized = size_note(run.eval_data, run.teacher.spec)
    tqdm.write(f"teacher on --eval-data: top-1 {100 * top1:.2f}% ({len(run.eval_data)} images"
               + (f", {resized})" if resized else ")"), file=sys.stderr)
    if run.method.eval_other_modality:  # the student's sensor: the teacher's top-1 there is what the run improves on
        return
    doubt = data_doubt(top1, run.teacher.num_classes, "--eval-data", run.cfg.eval_data, resized,
                       run.teacher.recorded_top1)
    run.teacher_top1 = None if doubt else top1
    if doubt:
        doubt += "; the student's accuracy on them says little"
        tqdm.write(f"warning: {doubt}", file=sys.stderr)
        log.event(run.step, event="eval_doubt", message=doubt)


def _say_recipe(run: Run, resumed: bool = False) -> None:
    """Which student and recipe, why, and where it departs from the paper (rank 0).

    A resumed run says where it resumes and then the same lines, with the settings it continues with: its own, and
    any -p given with --resume.
    """
    if resumed:
        tqdm.write(f"resumed {run.run_dir} at step {run.step}", file=sys.stderr)
    for line in run.recipe_lines:
        tqdm.write(line, file=sys.stderr)


def _execute(run: Run, resume_step: int | None) -> RunResult:
    log = run.dist.on_main(lambda: RunLog(run.run_dir, resume_step)) or NullLog()
    ended = looping = False
    try:
        if resume_step is None:
            run.dist.on_main(lambda: _start(run, log))
            run.checkpoint()
            log.event(0, event="start", method=run.cfg.method, teacher=run.teacher.source, student=run.student_name,
                      student_init=run.init_line, **({"processes": run.dist.world} if run.dist.enabled else {}))
        else:
            run.dist.on_main(lambda: _say_resumed(run))
            log.event(run.step, event="resume")
            run.dist.on_main(lambda: _score_teacher(run, log))
        looping = True
        result = run.finish(log, run.loop(log))
        ended = True
        return result
    except WriteFailed as e:
        raise DfkdError(f"{e}; {_after_failed_write(run)}") from None
    except DfkdError as e:
        if not looping or isinstance(e, (Interrupted, OtherRankFailed)) or "--resume" in str(e):
            raise
        # a problem met mid-run (an image of --data that does not decode, say): the run is not lost
        raise DfkdError(f"{e}; the run keeps its last checkpoint (step {run.saved_step}): once that is fixed, "
                        f"continue with {run.resume_command()}") from None
    except OSError as e:
        err = disk_error(e)
        if err is None:
            raise
        raise DfkdError(f"{err}; {_after_failed_write(run)}") from None
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if (oom := out_of_memory(e)) is None:
            raise
        raise DfkdError(f"{oom} at step {run.step}: {_smaller_batch(run)}") from None
    finally:
        run.close()
        log.close(quiet=not ended)  # after an error (a full disk, say) its flush must not replace that error


def _smaller_batch(run: Run) -> str:
    """The out-of-memory advice: the batches the run's settings hold, to be lowered."""
    keys = [k for k in ("batch_size", "synth_batch_size", "di_batch") if run.params.get(k) is not None]
    batches = ", ".join(f"-p {k}={run.params[k]}" for k in keys)
    fix = "a smaller batch, --precision bf16 (fp16 on a GPU) or a smaller --student"
    if (run.run_dir / "checkpoint.pt").exists():
        which = " or ".join(f"-p {k}=N" for k in keys)  # the synthesis's own batch may be the one too large
        fix = f"continue with a smaller one, {run.resume_command()} {which}, or start again with {fix}"
    else:
        fix = f"start again with {fix}"
    return f"a batch does not fit ({batches}); {fix}"


def _refuse_gradient_free(teacher: torch.nn.Module, method: str) -> None:
    """A teacher run by onnxruntime (an int8 ONNX file) teaches only from the user's images: it has no gradients.

    It went as far as the first step, where the method's backward through it failed.
    """
    from dfkd.onnxgraph import OnnxRuntimeModule

    cls = get_method(method)
    runtime = next((m for m in teacher.modules() if isinstance(m, OnnxRuntimeModule)), None)
    if runtime is not None and not cls.reads:
        raise DfkdError(f"--teacher {runtime.path}: an int8 ONNX model passes no gradients, which --method {method} "
                        "needs to make its images; give the float model it was made from, or teach from your own "
                        "images with --method kd --data IMAGES")


def _busy(run_dir: Path) -> str:
    """What a second process is told of a run folder another one works in (`dfkd.outpaths.folder_lock`)."""
    return (f"{run_dir}: {{pid}} is working in this run folder (the run, or a resume of it); wait for it to end, or "
            f"stop it, then continue with {resume_command(run_dir)}")


def _new_run(cfg: DistillConfig, dist: Dist) -> RunResult:
    source = source_for(cfg)
    source.check()
    with ExitStack() as held:
        stop = held.enter_context(_graceful_stop(dist.main))

        def claim() -> tuple[Path, bool]:
            run_dir, created = new_run_dir(cfg, source.run_name())
            held.enter_context(folder_lock(run_dir, _busy(run_dir)))  # two runs started at once on one --out
            return run_dir, created

        run_dir, created = dist.on_main(claim, share=True)
        try:
            run = dist.on_every(lambda: Run(cfg, run_dir, dist=dist), Run.close)
            run.stop, stop["run"] = stop, run
            result = _execute(run, None)
            result.stop_requested = stop["stop"]
            return result
        except BaseException:
            if dist.main:
                _drop_unstarted(run_dir, created)
            raise


def _drop_unstarted(run_dir: Path, created: bool) -> None:
    """Remove what a run that failed or was stopped before its first checkpoint wrote into its folder.

    Its config.json and log alone made a folder neither `--resume` (no checkpoint) nor a new run (not empty) would
    take. The folder was new or empty when the run took it and the run's lock kept others out, so all in it is the
    run's; a folder the user made stays, empty.
    """
    if not run_dir.is_dir() or (run_dir / RUN_MARKER).exists():
        return
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def distill(cfg: DistillConfig) -> RunResult:
    """Run a distillation from a config: a new run folder, then the loop to the end of the budget.

    Under torchrun (WORLD_SIZE > 1 in the environment) every process calls this; they train one student together
    (dfkd.distributed) and rank 0 writes the run folder.

    Returns:
        The run folder (with student.pt, config.json, metrics.jsonl, checkpoint.pt, TensorBoard events) and the
        final student metrics (top1/top5 when `eval_data` is set).
    """
    cfg = for_source(cfg)
    check_config(cfg)
    with joined(cfg.device) as dist:
        result = _new_run(cfg, dist)
    result.rank = dist.rank
    return result


def check_config(cfg: DistillConfig) -> None:
    """Every setting's type and range, and the method's hyper-parameters, before anything is written."""
    check_settings({k: v for k, v in cfg.to_dict().items() if k != "params"}, "flags")
    if not isinstance(cfg.params, dict):
        raise DfkdError(f"params = {cfg.params!r}: must be a table of method hyper-parameters")
    if cfg.method != AUTO:
        get_method(cfg.method)
    check_method_params(cfg.method, cfg.params)


#: Settings a resume may change: the budget, where it runs, what it is evaluated on (and `-p` hyper-parameters),
#: and how it computes (precision, compilation, deterministic kernels: a run moved to another device may need
#: another precision).
RESUMABLE = ("steps", "budget_minutes", "device", "eval_data", "precision", "compile", "deterministic")


def _same(key: str, given: Any, saved: Any) -> bool:
    if isinstance(given, (list, tuple)) or isinstance(saved, (list, tuple)):
        g = list(given) if isinstance(given, (list, tuple)) else [given]
        s = list(saved) if isinstance(saved, (list, tuple)) else [saved]
        return len(g) == len(s) and all(_same(key, a, b) for a, b in zip(g, s))
    if given == saved:
        return True
    if key in ("teachers", "out", "transfer_data", "data", "fid_ref") and isinstance(given, str) and saved:
        return Path(given).resolve() == Path(str(saved)).resolve()
    return False


#: Settings that name files, which a run reads again when it resumes.
PATH_SETTINGS = ("teachers", "eval_data", "fid_ref", "transfer_data", "data")


def _anchored(cfg: DistillConfig, start: str | None) -> DistillConfig:
    """`cfg` with its relative file paths made absolute from `start`, the folder the run was last checkpointed from.

    A run started as `dfkd distill --teacher t.pt` and resumed from another folder looked for t.pt there (`no such
    file`, of a --teacher the user did not give). Checkpoints written before the folder was recorded: unchanged.
    """
    if not start:
        return cfg

    def anchor(p: str) -> str:
        there = Path(start) / p
        return str(there) if not Path(p).is_absolute() and there.exists() else p

    changes = {k: (tuple(map(anchor, v)) if isinstance(v, tuple) else anchor(v))
               for k in PATH_SETTINGS if (v := getattr(cfg, k))}
    return replace(cfg, **changes)


def _refuse_missing(run_dir: Path, saved: DistillConfig, eval_data: str | None) -> None:
    """Refuse a resume whose teacher or eval data is gone, naming it as the run's.

    The loader's "--eval-data X: no such file" spoke of a flag the user had not given.
    """
    for path in saved.teachers:
        if not Path(path).exists():
            raise DfkdError(f"--resume {run_dir}: the run's teacher {path} is gone; put it back, or give its new "
                            "place with --resume ... --teacher FILE (the same file: its sha256 is checked)")
    if saved.eval_data and eval_data is None and not Path(saved.eval_data).exists():
        raise DfkdError(f"--resume {run_dir}: the run's --eval-data {saved.eval_data} is gone; give --eval-data FILE "
                        "with --resume, or put it back")


def _moved_teachers(run_dir: Path, saved: DistillConfig, ckpt: dict[str, Any],
                    fixed: dict[str, Any]) -> tuple[DistillConfig, dict[str, Any]]:
    """`--teacher` given with --resume at another path: taken when the files are the run's (by sha256).

    A project folder moved, or a teacher moved to another disk, left a run no resume could continue: the old path
    was gone and a new --teacher "would change the run". An ensemble's moved files may be given alone, in any
    order (matched by sha256). Returns the settings with the new paths and `fixed` without them; other files, and
    checkpoints that kept no hash, are left to the usual refusal.
    """
    given, saved_hash = fixed.get("teachers"), ckpt.get("extra", {}).get("teacher_sha256")
    if not given or not saved_hash or _same("teachers", given, saved.teachers):
        return saved, fixed
    missing = [p for p in given if not Path(p).is_file()]
    if missing:
        raise DfkdError(f"--teacher {missing[0]}: no such file")
    if not saved.teachers:
        raise DfkdError(f"--resume {run_dir}: the run has no --teacher (it trains on its --transfer-data alone), and a "
                        "resume cannot add one; drop --teacher, or start a new run with it")
    hashes = saved_hash.split(",")  # one a teacher, in the run's order (an ensemble's several)
    by_hash = {sha256_file(p): p for p in given}
    teachers = [by_hash.get(h) or (old if Path(old).is_file() and sha256_file(old) == h else None)
                for h, old in zip(hashes, saved.teachers)]
    strays = [p for h, p in by_hash.items() if h not in hashes]
    if strays or None in teachers or len(hashes) != len(saved.teachers):
        which = f"--teacher {strays[0]} is not a teacher the run started with" if strays else \
            f"the run's teacher {saved.teachers[teachers.index(None)]} is not where it was nor a --teacher given" \
            if None in teachers else "the files differ from the run's"
        raise DfkdError(f"--resume {run_dir}: {which} ({', '.join(saved.teachers)}; compared by sha256): a resumed "
                        "run distils the teachers it started with; give the moved file (an ensemble's: any order, "
                        "those still in place may be left out), or start a new run with another --out")
    return replace(saved, teachers=tuple(teachers)), {k: v for k, v in fixed.items() if k != "teachers"}


def _refuse_changes(run_dir: Path, saved: DistillConfig, fixed: dict[str, Any]) -> None:
    """Settings given with --resume that would make it another run are refused, naming the flag."""
    from dfkd.validate import flag_name

    for key, value in fixed.items():
        if value is None or (isinstance(value, (tuple, list)) and not value) or value is False:
            continue
        old = getattr(saved, key, None)
        if key == "method" and value == AUTO and saved.auto_choice:
            continue  # the run's method is the one auto chose
        if not _same(key, value, old):
            shown = " ".join(value) if isinstance(value, (list, tuple)) else value
            made = "without it" if old is None else f"with {old!r}"
            raise DfkdError(f"--resume {run_dir}: {flag_name(key)} {shown} would change the run (it was made {made}); "
                            f"a resumed run keeps it: drop {flag_name(key)}, or start a new run "
                            "with another --out")


def _run_folder(run_dir: Path) -> Path:
    if not run_dir.exists():
        raise DfkdError(f"--resume {run_dir}: no such run folder")
    if not run_dir.is_dir():
        hint = f"; its run folder is {run_dir.parent}" if run_dir.name == "checkpoint.pt" else ""
        raise DfkdError(f"--resume {run_dir}: is a file, not a run folder; give the folder `dfkd distill` wrote "
                        f"(the one holding checkpoint.pt){hint}")
    return run_dir


def resume(run_dir: str | Path, steps: int | None = None, budget_minutes: float | None = None,
           params: dict[str, Any] | None = None, device: str | None = None, eval_data: str | None = None,
           fixed: dict[str, Any] | None = None, precision: str | None = None,
           compile: bool | None = None, deterministic: bool | None = None) -> RunResult:
    """Continue a stopped run from its checkpoint.

    Args:
        run_dir: the run folder.
        steps: a new budget in student steps (larger than the step reached).
        budget_minutes: a new wall-clock budget.
        params: hyper-parameter overrides (e.g. lower learning rates after a divergence).
        device: where to continue.
        eval_data: other test data to report on.
        fixed: any other DistillConfig settings the user gave: refused when they differ from the run's.
        precision: another --precision from here on (the weights are fp32 whatever the precision).
        compile: compile the networks (or not) from here on.
        deterministic: reproducible GPU kernels (or not) from here on.

    Raises:
        DfkdError: for a folder that is not a run, a finished run without a larger budget, or a change that
            would make it another run.
    """
    with joined(device or "auto") as dist, ExitStack() as held:
        stop = held.enter_context(_graceful_stop(dist.main))
        numerics = {"precision": precision, "compile": compile, "deterministic": deterministic}
        cfg, ckpt = dist.on_main(lambda: _resume_plan(Path(run_dir), steps, budget_minutes, params, device,
                                                      eval_data, fixed, dist.world, numerics, held), share=True)
        run = dist.on_every(lambda: Run(cfg, Path(str(cfg.out)), ckpt, dist, changed=tuple(params or ())),
                            Run.close)  # each rank restores its own share: all must before rank 0 cuts the log
        run.stop, stop["run"] = stop, run
        result = _execute(run, run.step)
        result.stop_requested = stop["stop"]
    result.rank = dist.rank
    return result


#: The method settings that have flags of their own (--feature-loss, --discriminator), named so in messages.
OBJECTIVE_KEYS = ("feature_loss", "discriminator")
#: Method settings a resume cannot change (those that shape a network are refused when its state does not load).
FIXED_ON_RESUME = {
    "recipe": "a recipe picks the settings when a run starts, and a resumed run keeps those it resolved: give the "
              "settings themselves with -p",
    "s_optimizer": "the student optimizer's state is in the checkpoint",
    **dict.fromkeys(("feature_loss", "discriminator"), "the objectives (--feature-loss, --discriminator) and their "
                    "state are part of the run"),
}


def _yours(ckpt: dict[str, Any] | None, changed: Collection[str]) -> set[str] | None:
    """A resumed run's settings its user gave: at its start (the checkpoint keeps them) and with --resume.

    None for a new run, and for a checkpoint written before they were kept (`build_method` then reads the saved
    settings the recipe holds as the recipe's, as a config file's are).
    """
    saved = None if ckpt is None else ckpt.get("extra", {}).get("yours")
    return None if saved is None else {*saved, *changed}


def _refuse_other_teacher(run_dir: Path, ckpt: dict[str, Any], teacher: Teacher) -> None:
    """A resumed run distils the teacher it started with: a file changed since (retrained, replaced) is refused.

    Checkpoints written before the hash was kept, and runs without a teacher file (a transfer file), pass.
    """
    saved = ckpt.get("extra", {}).get("teacher_sha256")
    if saved and teacher.sha256 and saved != teacher.sha256:
        raise DfkdError(f"--resume {run_dir}: the teacher {teacher.source} is not the file the run started with "
                        f"(sha256 {teacher.sha256[:12]}... now, {saved[:12]}... then): a resumed run distils the same "
                        "teacher; put that file back, or start a new run (another --out) for this one")


def _refuse_world(run_dir: Path, ckpt: dict[str, Any], world: int) -> None:
    saved = int(ckpt.get("extra", {}).get("world", 1))
    if saved != world:
        how = "without torchrun" if saved == 1 else f"with torchrun on {saved} processes in all"
        raise DfkdError(f"--resume {run_dir}: the run was made by {saved} process(es) and this job has {world}; each "
                        f"process holds its own share of the data and RNG streams: resume it {how}")


def _resume_plan(run_dir: Path, steps: int | None, budget_minutes: float | None, params: dict[str, Any] | None,
                 device: str | None, eval_data: str | None, fixed: dict[str, Any] | None,
                 world: int, numerics: dict[str, Any] | None = None,
                 held: ExitStack | None = None) -> tuple[DistillConfig, dict[str, Any]]:
    """The resumed run's settings and its checkpoint, or the error that refuses the resume.

    `held` takes the lock on the run folder, kept until the resumed run ends (a resume of a run still going cut its
    log and both wrote the checkpoint).
    """
    run_dir = _run_folder(run_dir)
    if held is not None:
        held.enter_context(folder_lock(run_dir, _busy(run_dir)))
        remove_stale_temps(run_dir)  # a checkpoint-sized file each killed write left
    probe_writable(run_dir, f"--resume {run_dir}")  # before any step is made that could not be saved
    for name in ("checkpoint.pt", "metrics.jsonl"):  # an immutable (chattr +i) or read-only one the run replaces
        if (run_dir / name).exists() and not os.access(run_dir / name, os.W_OK):
            raise DfkdError(f"--resume {run_dir}: its {name} cannot be written (read-only or immutable), so no step "
                            "of the resumed run could be saved; make it writable (chmod u+w; chattr -i)")
    given = {**dict(zip(RESUMABLE, (steps, budget_minutes, device, eval_data))), **(numerics or {})}
    changes = {k: v for k, v in given.items() if v is not None}
    check_settings(changes, "flags")
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = _anchored(DistillConfig.from_dict(dict(ckpt["config"]), f"{run_dir}/checkpoint.pt"),
                    ckpt.get("extra", {}).get("cwd"))
    check_file_archs({k: v for k, v in cfg.to_dict().items() if (fixed or {}).get(k) is None},
                     f"{run_dir}/checkpoint.pt")  # the same name typed with --resume is the user's choice
    if cfg.trust_pickle and not (fixed or {}).get("trust_pickle"):
        raise DfkdError(f"--resume {run_dir}: the run read its teacher with --trust-pickle, which its checkpoint "
                        "cannot grant by itself (unpickling runs the file's code): if you trust "
                        f"{', '.join(cfg.teachers)}, add --trust-pickle: "
                        f"{resume_command(run_dir, int(ckpt.get('extra', {}).get('world', 1)), True)}")
    cfg = replace(cfg, params={**ADDED_SETTINGS, **cfg.params})  # a run saved before a setting existed
    cfg, fixed = _moved_teachers(run_dir, cfg, ckpt, fixed or {})
    _refuse_changes(run_dir, cfg, fixed)
    _refuse_missing(run_dir, cfg, eval_data)
    _refuse_world(run_dir, ckpt, world)
    if steps is not None and steps <= int(ckpt["step"]) and not ckpt["finished"]:
        raise DfkdError(f"--steps {steps}: the run in {run_dir} is already at step {ckpt['step']}; give a larger "
                        "--steps (or none, to finish the budget it was started with)")
    changes["out"] = str(run_dir)
    for key, why in FIXED_ON_RESUME.items():
        if key in (params or {}) and params[key] != cfg.params.get(key):
            value = params[key]
            flag = " ".join(f"--{key.replace('_', '-')} {v}" for v in (value if isinstance(value, list) else [value]))
            given = flag if key in OBJECTIVE_KEYS else f"-p {key}={value}"
            has = "none" if cfg.params.get(key) is None else repr(cfg.params.get(key))
            raise DfkdError(f"--resume {run_dir}: {given}: the run has {has}, and a resume cannot change it ({why}); "
                            "drop it, or start a new run")
    if params:
        changes["params"] = {**cfg.params, **params}
    cfg = replace(cfg, **changes)
    if ckpt["finished"] and steps is None and budget_minutes is None:
        if problem := student_problem(run_dir):
            raise DfkdError(f"--resume {run_dir}: this run finished, but {problem}; pass a larger --steps (or "
                            "--budget-minutes) to train further and write it again")
        raise DfkdError(f"--resume {run_dir}: this run already finished (student.pt is there); pass a larger "
                        "--steps or --budget-minutes to train further")
    if ckpt["finished"] and steps is not None and steps <= int(ckpt["step"]):
        raise DfkdError(f"--steps {steps}: the run in {run_dir} finished at step {ckpt['step']}; give a larger "
                        "--steps to train further")
    return cfg, ckpt
