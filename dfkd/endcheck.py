"""Warnings at the end of a run: a collapse too short to start an episode, and a student that has not learned.

Both use data-free signals only (the user has no real data), and go where the collapse watch's warnings go: a
`warning:` line in the progress output, an event in metrics.jsonl (`collapse` with `at_end: true`, or
`not_learned`) and `dfkd report`.

- **Collapse at the end.** The watch (dfkd.watch) warns after `collapse_patience` collapsed checks in a row, so a
  run shorter than that (5 checks, 250 student steps by default) never warned. At the end, when no episode is in
  progress, the last check was collapsed and most of the last `collapse_patience` checks (all of them, when the
  run had fewer) were, the run warns once with the episode's message and remedy.
- **Not learned.** A student can sit at chance while the generator's batches are varied: it simply did not learn.
  At the end the written student's top-1 agreement with the teacher is measured on synthetic images it never
  trained on, the held-out set of dfkd.selection when the method has one, else on the watch's latest synthetic
  batch, averaged over the teacher's classes present (the teacher labels synthetic images unevenly: a student
  that answers one class everywhere agrees on all the images of that class, 20 % or more of a set it dominates,
  but on exactly 1/K averaged per class). A student whose answers are unrelated to the teacher's agrees on about
  1/K (K classes); the run warns when the agreement is at most `chance_threshold(K)` = min(1.5 / K, 1 / K + 0.1): half
  of chance again above it (on 1024 held-out images a chance-level student's agreement has a standard deviation
  of about 1 point at K = 10, so 15 % is over five of them away), and never more than 10 points above chance (at
  K = 2, 60 %). A student that learned anything useful agrees far above that.
- **Not learned, by the user's data.** Synthetic images can hold a student's agreement with the teacher above that
  line while it has learned nothing the teacher knows of real images (ZSKD's Dirichlet-sampled images on a CIFAR-10
  WRN-16-1, 81 % top-1: its student agreed on them and answered 13.5 % of the test set right). When `--eval-data`
  is given, the teacher recognises it (no `eval_doubt`) and the data-free check did not warn, the run warns when
  the written student's top-1 on it is at most the same `chance_threshold(K)`.
"""

from __future__ import annotations

from typing import Any

import torch

from dfkd.selection import class_balanced_agreement
from dfkd.watch import CollapseWatch


def collapsed_at_end(watch: CollapseWatch) -> bool:
    """True when the run ends collapsed without an episode in progress (see the module docstring)."""
    recent = watch.recent
    return bool(recent) and not watch.in_episode and recent[-1] and 2 * sum(recent) > len(recent)


def chance_threshold(num_classes: int) -> float:
    """The agreement at or below which a student has not learned: min(1.5 / K, 1 / K + 0.1)."""
    chance = 1.0 / num_classes
    return min(1.5 * chance, chance + 0.1)


def top1_agreement(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of rows whose arg-max is the teacher's label, averaged over the classes in `labels`.

    Shape:
        - logits: (N, K)
        - labels: (N,)
    """
    return class_balanced_agreement(logits, labels, logits.shape[1])


def remedy(method: Any, cfg: Any, device: torch.device, died: bool = False) -> str:
    """What to try when the student has not learned: a longer budget, the CPU recipe, another method, auto.

    A method that learns from the user's images (`Method.reads`) is sent to those images instead of another method.

    With a feature objective on, its weight comes first: at its paper's weight it can swamp the KD loss. When the
    student died during the run (`died`: the stuck-student warning fired) and its gradient is not clipped, the clip
    comes first of all: a dead student does not learn whatever the budget (DeepInversion's and ADI's paper recipes,
    student lr 0.1, killed a BN-free LeNet-5 student on a BN-free Fashion-MNIST VGG, 11.1 % of the teacher; with
    `-p clip_s=1` they reached 70.2 and 75.5 %, their CPU recipes 45.7 and 44.6).
    """
    tips = ["a longer budget (--steps or --budget-minutes)"]
    if len(method.objectives):
        tips.insert(0, "a smaller --feature-weight (the objectives can swamp the KD loss)")
    if died and method.p.get("clip_s") is None:
        tips.insert(0, "-p clip_s=1 (the student died during the run; a clipped gradient keeps it alive)")
    if device.type == "cpu" and method.p.get("recipe") != "cpu" and type(method).cpu_params():
        tips.append("-p recipe=cpu (the recipe measured on a CPU)")
    if getattr(method, "reads", None):  # the student learns from the user's images: no other method takes them
        tips.append(f"images of every class the teacher knows in {method.reads}")
    elif getattr(cfg, "auto_choice", None):
        tips.append(f"another method than the {method.name} that --method auto chose (--method NAME; dfkd methods)")
    else:
        tips += ["another method (dfkd methods)", "--method auto (a method picked for this teacher)"]
    return "try " + ", ".join(tips[:-1]) + f" or {tips[-1]}"


def not_learned_message(method: Any, cfg: Any, device: torch.device, agreement: float, num_classes: int,
                        heldout: bool, steps: int, died: bool = False) -> str:
    """One line: the problem (agreement, chance, where it was measured) and the remedy (`died`: see `remedy`)."""
    reads = getattr(method, "reads", None)
    if reads:
        where = f"held-out images of {reads}" if heldout else f"its latest batch of {reads}"
    else:
        where = "held-out synthetic images" if heldout else "its latest synthetic batch"
    return (f"{method.name}: the student agrees with the teacher on {100 * agreement:.1f}% of {where}, about "
            f"chance ({100 / num_classes:.1f}%): it has not learned in {steps} steps; "
            f"{remedy(method, cfg, device, died)}")


def not_learned_on_data_message(method: Any, cfg: Any, device: torch.device, top1: float, teacher_top1: float,
                                num_classes: int, agreement: float | None, steps: int, died: bool = False) -> str:
    """One line: the student near chance on --eval-data though its own images hid it, and the remedy."""
    reads = getattr(method, "reads", None)
    real = reads == "--data"  # kd on the user's real images: no synthetic one to blame (--transfer-data's are)
    seen = f"the images of {reads}" if reads else "the synthetic images"
    hid = "" if agreement is None else \
        f", though it agrees with the teacher on {100 * agreement:.1f}% of {seen} it was checked on"
    why = "" if real else " (the synthetic images do not carry what the teacher knows of real ones)"
    return (f"{method.name}: the student answers {100 * top1:.2f}% of --eval-data {cfg.eval_data} right, about "
            f"chance ({100 / num_classes:.1f}%; the teacher {100 * teacher_top1:.2f}%): it has not learned in "
            f"{steps} steps{hid}{why}; {remedy(method, cfg, device, died)}")
