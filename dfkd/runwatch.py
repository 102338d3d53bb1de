"""What the loop watches besides its losses: mode collapse (dfkd.watch), EMA and held-out selection (dfkd.selection).

At the end (`finish`) it also checks the run's last batch, and says when the run ended collapsed too soon for the
watch's episode to start, or with a student that has not learned (dfkd.endcheck).

The engine makes one `RunWatch` per run and calls `after_round` after every round, `evaluate` beside its own
evaluation, `finish` before writing student.pt, and `state_dict`/`load_state_dict` with its checkpoint. Nothing
here draws from the run's RNG streams (held-out draws fork them), so a run's training is the same with or
without the watch, and a resumed run ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dfkd.endcheck import (
    chance_threshold,
    collapsed_at_end,
    not_learned_message,
    not_learned_on_data_message,
    top1_agreement,
)
from dfkd.evaluate import accuracy
from dfkd.methods.transfer import NoTeacher
from dfkd.precision import eager
from dfkd.qat import fake_quantized, strip_qat
from dfkd.selection import Selector, flat_scores
from dfkd.watch import (
    CollapseWatch,
    EpisodeWatch,
    batch_stats,
    check_watch_params,
    collapse_message,
    eval_logits,
    generator_of,
    recovery_message,
    reset_generator,
    stuck_message,
    student_stuck,
)


def selection_detail(scores: dict[str, dict[str, float]], signal: str) -> str:
    """The candidates' held-out scores, the selection's `signal` first.

    E.g. "held-out KL from the teacher: raw 0.312, ema 0.287; agreement: raw 95.0%, ema 97.1%".
    """
    kl = ", ".join(f"{k} {s['kl']:.3f}" for k, s in scores.items())
    agree = ", ".join(f"{k} {100 * s['agreement']:.1f}%" for k, s in scores.items())
    if signal == "kl":
        return f"held-out KL from the teacher: {kl}; agreement: {agree}"
    return f"held-out agreement: {agree}; KL from the teacher: {kl}"


class RunWatch:
    """Collapse watch, EMA and model selection of one run.

    Args:
        run: the engine's `Run` (its method, teacher, params, config and step are read).
    """

    def __init__(self, run: Any) -> None:
        self.run, p = run, run.params
        check_watch_params(run.method, p)
        self.watch_every, self.select_every = int(p["watch_every"]), int(p["select_every"])
        self.collapse = CollapseWatch(run.teacher.num_classes, float(p["collapse_fraction"]),
                                      int(p["collapse_patience"]))
        # A --quantize run's int8 export is made from the raw (fake-quantized) student: student.pt stays that one.
        self.selector = Selector(run.method, run.cfg.seed, enabled=not getattr(run.cfg, "quantize", None))
        self.last = self._counters()
        self.watch_step = -1  # the step of the last check of the synthetic batch
        self.collapse_stats: dict[str, float] = {}  # the last collapsed check's statistics, for the end warning
        self.warned_at: int | None = None  # the step the running collapse episode was warned of
        self.stuck = EpisodeWatch(int(p["collapse_patience"]))  # the student giving one answer to every image

    def _counters(self) -> dict[str, int]:
        step = self.run.step
        return {"watch": step // max(self.watch_every, 1), "select": step // max(self.select_every, 1)}

    def _due(self, key: str, every: int) -> bool:
        if every <= 0 or self.run.step // every <= self.last[key]:
            return False
        self.last[key] = self.run.step // every
        return True

    # --- hooks --------------------------------------------------------------------------------------------
    def after_round(self, log: Any, steps: int) -> None:
        """Show the method's notes; update the EMA (`steps`: the round's student steps); check what is due.

        On their cadences: the synthetic batch (collapse watch) and the held-out agreement.
        """
        for message in self.run.method.pop_notices():
            tqdm.write(f"note: step {self.run.step}: {message}", file=sys.stderr)
            log.event(self.run.step, event="note", message=message)
        self.selector.update_ema(steps)
        if self._due("watch", self.watch_every):
            self._watch(log)
        if self._due("select", self.select_every):
            scores = self.selector.check(self.run.step)
            if scores:
                log.scalars(self.run.step, scores, "select/")

    def _batch_logits(self, student: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(teacher, `student` (default: the method's)) logits on the latest synthetic batch; None without one."""
        method = self.run.method
        x = method.last_images
        if x is None:
            return None
        x = x[:256]
        t_logits = getattr(method, "last_logits", None)  # the transfer method's stored labels
        if t_logits is None:
            if isinstance(method.teacher, NoTeacher):
                return None  # no teacher to ask (stored transfer data without its teacher)
            t_logits = eval_logits(method.teacher, x)
        return t_logits[:256], eval_logits(method.student if student is None else student, x)

    def _watch(self, log: Any) -> None:
        logits = self._batch_logits()
        if logits is None:
            return
        stats = batch_stats(*logits)
        log.scalars(self.run.step, stats, "synthetic/")
        self.watch_step = self.run.step
        started = self.collapse.update(stats["effective_classes"], len(logits[0]))
        if self.collapse.recent[-1]:
            self.collapse_stats = stats
        if started:
            # checks at the ends of short runs and their resumes come closer than the interval: at most the run's steps
            steps = min(self.collapse.streak * self.watch_every, self.run.step)
            message = collapse_message(self.run.method, stats, self.run.teacher.num_classes, steps)
            tqdm.write(f"warning: step {self.run.step}: {message}", file=sys.stderr)
            log.event(self.run.step, event="collapse", message=message, **stats)
            self.warned_at = self.run.step
            if self.run.params["collapse_action"] == "reset":
                reset_generator(generator_of(self.run.method))
                log.event(self.run.step, event="generator_reset")
        if self.collapse.recovered and self.warned_at is not None:
            message = recovery_message(self.run.method, stats, self.run.teacher.num_classes, self.warned_at)
            tqdm.write(f"note: step {self.run.step}: {message}", file=sys.stderr)
            log.event(self.run.step, event="collapse_recovered", message=message, since=self.warned_at, **stats)
            self.warned_at = None
        if self.stuck.record(student_stuck(stats)):
            message = stuck_message(self.run.method, stats, self.stuck.streak * self.watch_every)
            tqdm.write(f"warning: step {self.run.step}: {message}", file=sys.stderr)
            log.event(self.run.step, event="student_stuck", message=message, **stats)

    def evaluate(self) -> dict[str, float]:
        """The EMA's real accuracy beside the raw student's (when eval data is given and there is an EMA)."""
        run = self.run
        if run.eval_data is None or self.selector.ema is None:
            return {}
        return {"top1_ema": self._accuracy(self.selector.ema.module)["top1"]}

    def _accuracy(self, model: nn.Module) -> dict[str, float]:
        run = self.run
        res = accuracy(model, run.eval_data, run.teacher.spec, run.device)
        return {"top1": res["top1"], "top5": res["top5"]}

    def finish(self, log: Any, final: dict[str, float]) -> tuple[nn.Module, dict[str, float], str]:
        """The student to write, its final metrics and a one-line account of the choice.

        Returns:
            (the chosen model; `final` with top1/top5 of the chosen one (with `--quantize`, of its float weights,
            which student.pt holds; top1_fakequant of the network trained) and top1_raw, top1_ema, top1_best (the kept
            snapshot) beside them; e.g. "ema at step 2400 (held-out KL from the teacher: raw 0.312, ema 0.287;
            agreement: raw 95.0%, ema 97.1%)", the selection's signal first).
        """
        label, model, scores = self.selector.choose(self.run.step)
        measured = self._end_warnings(log, model)
        if scores:
            log.scalars(self.run.step, flat_scores(scores), "select/")
        metrics = dict(final)
        if final:
            metrics["top1_raw"] = final["top1"]
            metrics.update(self.evaluate())
            if self.selector.best is not None:  # the kept snapshot's real accuracy, for judging the signal (bench)
                metrics["top1_best"] = self._accuracy(self.selector.best)["top1"]
            if model is not self.run.method.student:
                metrics.update(self._accuracy(model))
            if fake_quantized(model):  # student.pt holds the float weights: its accuracy is theirs
                metrics["top1_fakequant"] = metrics["top1"]
                metrics.update(self._accuracy(strip_qat(eager(copy.deepcopy(model)))))
            metrics["top1_selected"] = metrics["top1"]
            log.scalars(self.run.step, {k: v for k, v in metrics.items() if k in ("top1_ema", "top1_selected")},
                        "student/")
            if measured is None or measured[0] > chance_threshold(self.run.teacher.num_classes):
                self._check_learned_on_data(log, metrics["top1"], measured)
        if not scores:
            return model, metrics, ""
        return model, metrics, f"{label} ({selection_detail(scores, self.selector.signal)})"

    # --- end of run (dfkd.endcheck) ---------------------------------------------------------------------------
    def _end_warnings(self, log: Any, model: nn.Module) -> tuple[float, int, bool] | None:
        """Check the last batch (however short the run), then warn of a late collapse or a student at chance.

        Returns `model`'s agreement with the teacher on synthetic images as `_agreement` measured it.
        """
        if self.watch_every > 0 and self.watch_step != self.run.step:
            self._watch(log)
        if collapsed_at_end(self.collapse) and self.collapse_stats:
            steps = min(sum(self.collapse.recent) * self.watch_every, self.run.step)  # a check: its interval
            message = collapse_message(self.run.method, self.collapse_stats, self.run.teacher.num_classes, steps)
            tqdm.write(f"warning: step {self.run.step} (end of run): {message}", file=sys.stderr)
            log.event(self.run.step, event="collapse", at_end=True, message=message, **self.collapse_stats)
        return self._check_learned(log, model)

    def _agreement(self, model: nn.Module) -> tuple[float, int, bool] | None:
        """(top-1 agreement of `model` with the teacher, images, held-out?) on the held-out set, else the last batch."""
        heldout = self.selector.heldout
        if heldout is not None and len(heldout):
            n = min(heldout.seen, heldout.size)
            return top1_agreement(eval_logits(model, heldout.x[:n]), heldout.labels[:n]), n, True
        logits = self._batch_logits(model)
        if logits is None:
            return None
        return top1_agreement(logits[1], logits[0].argmax(1)), len(logits[0]), False

    def _check_learned(self, log: Any, model: nn.Module) -> tuple[float, int, bool] | None:
        """Warn when the written student agrees with the teacher at about chance on synthetic images.

        Returns the agreement measured (see `_agreement`), whether it warned or not.
        """
        run, k = self.run, self.run.teacher.num_classes
        measured = self._agreement(model)
        if measured is None or measured[0] > chance_threshold(k):
            return measured
        agreement, images, heldout = measured
        message = not_learned_message(run.method, run.cfg, run.device, agreement, k, heldout, run.step,
                                      died=self.stuck.episodes > 0)
        tqdm.write(f"warning: step {run.step}: {message}", file=sys.stderr)
        log.event(run.step, event="not_learned", message=message, agreement=agreement, chance=1 / k,
                  threshold=chance_threshold(k), images=images, heldout=heldout)
        return measured

    def _check_learned_on_data(self, log: Any, top1: float, measured: tuple[float, int, bool] | None) -> None:
        """Warn when the written student is at about chance on --eval-data that the teacher recognises.

        Only where the data-free check above did not warn (`measured`: its agreement, over the line or unmeasured).
        """
        run, k = self.run, self.run.teacher.num_classes
        teacher_top1 = getattr(run, "teacher_top1", None)
        if teacher_top1 is None or top1 > chance_threshold(k):
            return
        message = not_learned_on_data_message(run.method, run.cfg, run.device, top1, teacher_top1, k,
                                              None if measured is None else measured[0], run.step,
                                              died=self.stuck.episodes > 0)
        tqdm.write(f"warning: step {run.step}: {message}", file=sys.stderr)
        log.event(run.step, event="not_learned", message=message, top1=top1, teacher_top1=teacher_top1,
                  chance=1 / k, threshold=chance_threshold(k), on="eval_data")

    # --- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"collapse": self.collapse.state_dict(), "collapse_stats": self.collapse_stats,
                "warned_at": self.warned_at, "selector": self.selector.state_dict(), "stuck": self.stuck.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("collapse"):
            self.collapse.load_state_dict(state["collapse"])
        self.collapse_stats = dict(state.get("collapse_stats") or {})
        self.warned_at = state.get("warned_at")
        if state.get("stuck"):
            self.stuck.load_state_dict(state["stuck"])
        if state.get("selector"):
            self.selector.load_state_dict(state["selector"])
        self.last = self._counters()
