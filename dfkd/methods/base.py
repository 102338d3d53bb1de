"""What every distillation method is: a recipe (paper defaults) plus the steps of one round."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.bnstats import BN_DEFAULTS
from dfkd.errors import DfkdError
from dfkd.generators.base import LossDict, Synthesizer
from dfkd.losses import kl_div
from dfkd.methods._budget import StepPlanner
from dfkd.methods._recipes import Recipe
from dfkd.objectives import build_objectives
from dfkd.precision import backward, loss_scaled, step, unscale
from dfkd.selection import SELECT_DEFAULTS
from dfkd.teacher import Teacher
from dfkd.watch import WATCH_DEFAULTS

#: Defaults every method shares; a method's `defaults` override them, config files and flags override both.
BASE_DEFAULTS: dict[str, Any] = {
    "recipe": "paper",  # "paper" or "cpu" (dfkd.methods._recipes): resolved from the teacher unless set
    "batch_size": 256,
    "s_optimizer": "sgd",  # "sgd" or "adam"
    "lr_s": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "constant",  # "constant", "cosine" or "multistep" over the run's progress
    "milestones": [],  # fractions of the run, for "multistep"
    "gamma": 0.1,
    "T": 1.0,  # KD temperature of the student loss
    "clip_s": None,  # None, or the largest L2 norm of the student's gradient in one step (clipped above it)
    "clip_unnormalised": True,  # clip_s None and a student without normalisation layers: clip at 1 (dfkd.build)
    "g_steps": 1,
    "s_steps": 1,
    # Student-side objectives added to any method's own loss (dfkd.objectives):
    "feature_loss": None,  # None, or "at", "rkd", "sp", "fitnet", or a list of them
    "feature_weight": None,  # None: each objective's paper weight; a number, or {"name": weight}
    "discriminator": None,  # None, "logits" or "features": adversarial KD against a discriminator
    "disc_weight": 1.0,  # weight of the student's fool-the-discriminator term
    "lr_d": 2e-4,  # the discriminator's Adam learning rate
    # Several --teacher files (dfkd.ensemble): fixed weights per teacher, and "mean" or "confidence" weighting.
    "teacher_weights": None,
    "teacher_weighting": "mean",
    # Run-level: the collapse watch (dfkd.watch), the student EMA and held-out model selection (dfkd.selection).
    **WATCH_DEFAULTS,
    **SELECT_DEFAULTS,
}

#: Settings added after runs were saved, with the value such a run trained with: a run whose checkpoint lacks one
#: resumes with it, not with today's recipe, so it still ends with the student it would have.
ADDED_SETTINGS: dict[str, Any] = {"clip_s": None, "clip_unnormalised": False}

#: The settings above, BN-statistics methods' `input_stats` and where pools are stored: dfkd's own, no paper's.
OWN_SETTINGS = frozenset({"recipe", "feature_loss", "feature_weight", "discriminator", "disc_weight", "lr_d",
                          "clip_unnormalised", "teacher_weights", "teacher_weighting", "pool_dir", "pool_dtype",
                          "ram_budget_mib", *WATCH_DEFAULTS, *SELECT_DEFAULTS, *BN_DEFAULTS})


def step_logs(prefix: str, losses: LossDict) -> dict[str, torch.Tensor | float]:
    """{"loss": t, "loss/bn": b} -> {"<prefix>/total": t, "<prefix>/bn": b}, detached, for logging.

    Tensors stay tensors on their device: reading them (`float`, `.item()`) would wait for the device every step;
    the run sums them there and reads them back on logging steps only (dfkd.logbuf).
    """
    out: dict[str, torch.Tensor | float] = {}
    for k, v in losses.items():
        name = "total" if k == "loss" else k.removeprefix("loss/")
        out[f"{prefix}/{name}"] = v.detach() if torch.is_tensor(v) else float(v)
    return out


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients to `module`'s weights (they still flow through it to its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


#: `Method.needs`: setting -> (whether the run uses it, given the resolved settings; why not, and what would).
Needs = dict[str, tuple[Callable[[dict[str, Any]], bool], str]]


class Method(Recipe):
    """A registered distillation recipe. Subclasses set `paper`, `summary`, `defaults` and implement `round()`.

    Its settings (`default_params`, `cpu`, `deviations`, ...) are `dfkd.methods._recipes.Recipe`'s.

    The loop calls `round()` repeatedly; a round runs the method's synthesis steps and `student_steps_per_round`
    student steps and returns a flat dict of float losses. `set_progress(p)` applies the learning-rate schedule
    (p in [0, 1] is the fraction of the run done).

    Args:
        teacher: the frozen teacher.
        student: the student to train (in train mode).
        params: resolved hyper-parameters (BASE_DEFAULTS < `defaults` < config file < flags).
        device: where everything runs.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    base_defaults: ClassVar[dict[str, Any]] = BASE_DEFAULTS
    own_settings: ClassVar[frozenset[str]] = OWN_SETTINGS
    #: BatchNorm-statistics matching is part of the objective (a BN-free teacher gets it on its input statistics,
    #: `dfkd.bnstats`, or loses it with `-p input_stats=false`).
    uses_bn: ClassVar[bool] = False
    #: The flag of the images this method trains on (`--data`, `--transfer-data`); None: it synthesizes its own.
    #: The collapse watch names it, and its remedy, when those images show the teacher few classes.
    reads: ClassVar[str | None] = None
    #: Whether --eval-data is of another modality than the teacher's (crossmodal: the student's sensor), so the
    #: teacher's top-1 there is no doubt about the data and no mark for the student.
    eval_other_modality: ClassVar[bool] = False
    #: Whether a time budget may cut a round's student steps (`student_steps_per_round`). A pool-served method
    #: then makes more rounds of fewer steps; the GAN methods keep their recipe's student steps per generator step.
    fit_steps_to_budget: ClassVar[bool] = True
    #: Overrides that make a round take well under a second on a LeNet-scale teacher (the tests use them).
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8}
    #: Shared settings (`BASE_DEFAULTS`) this method never reads, and what it has instead: a user who sets one is
    #: told it has no effect (`no_effect`).
    ignores: ClassVar[dict[str, str]] = {}
    #: Settings another setting turns off: key -> (whether the run uses it, given the resolved settings; why it does
    #: not, and what would make it count). Gathered over the class's bases by `no_effect`.
    needs: ClassVar[Needs] = {}
    #: Whether the run keeps a held-out set of the method's own generated images for data-free selection (the GAN
    #: methods: their generator makes fresh images on demand; the others serve the student from a pool or data).
    heldout: ClassVar[bool] = False

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        self.teacher, self.student, self.device = teacher, student, device
        self.p = params
        self.student.train()
        self.objectives = build_objectives(teacher, student, params, device)
        self.opt_s = self.make_student_optimizer()
        if self.objectives.parameters():  # adapters learn with the student, under its schedule
            self.opt_s.add_param_group({"params": self.objectives.parameters()})
        self._base_lrs: list[tuple[torch.optim.Optimizer, list[float]]] = [self._lrs(self.opt_s)]
        self.synth: Synthesizer | None = None
        self.last_images: torch.Tensor | None = None
        #: Wall-clock seconds spent in student updates (the rest of a round is synthesis), for perf/ logging.
        self.student_seconds = 0.0
        #: Student steps the run's budget has left (None: no step budget); the round in progress takes no more.
        self.steps_left: int | None = None
        #: The run's time budget in seconds (None: a step budget only); slow rounds are planned to fit it.
        self.time_budget: float | None = None
        #: Seconds of that budget left when the round in progress began (None: no time budget).
        self.time_left: float | None = None
        #: The budget's clock (`time.process_time` under `--budget-clock cpu`); the engine sets it.
        self.clock: Callable[[], float] = time.perf_counter
        self._notices: list[str] = []
        #: Caps a round's student steps under a time budget (`dfkd.methods._budget.StepPlanner`).
        self.steps_planner = StepPlanner(self.name, self.notice)

    # --- description ----------------------------------------------------------------------------------------
    @classmethod
    def describe(cls) -> str:
        """One line: what it does, and its paper."""
        return f"{cls.summary} [{cls.paper}]"

    @classmethod
    def no_effect(cls, params: dict[str, Any]) -> dict[str, str]:
        """The settings that do nothing in a run with the resolved `params`, each with why and what does instead.

        The method's own `ignores` and `needs`, and shared settings that another setting turns off: the momentum of
        an Adam student, a multistep schedule's milestones under another schedule, the discriminator's settings
        without a discriminator, feature weights without a feature loss, the selection's settings without a held-out
        set, the flip probability without augmentation.
        """
        out = dict(cls.ignores)
        for klass in reversed(cls.__mro__):
            for key, (used, why) in vars(klass).get("needs", {}).items():
                if key in params and not used(params):
                    out[key] = why
        chosen = ("heldout_size", "heldout_chunk", "select_margin", "select_signal")
        if not cls.heldout:
            for key in ("select_every", *chosen):
                out[key] = ("it keeps no held-out set of synthetic images to select a student on: only the GAN "
                            "methods, whose generator makes them on demand, do")
        elif not params.get("select_every"):
            for key in chosen:
                out[key] = "-p select_every=0 turns the data-free selection off"
        if params.get("augment") == "none":
            out["flip_p"] = "-p augment=none: no flip; another augment kind flips with this probability"
        if params.get("s_optimizer") == "adam":
            out["momentum"] = "the student's optimizer is adam; -p s_optimizer=sgd uses it"
        if params.get("schedule") != "multistep":
            for key in ("gamma", "milestones"):
                out[key] = f"the schedule is {params.get('schedule')}; -p schedule=multistep uses it"
        if params.get("discriminator") is None:
            for key in ("lr_d", "disc_weight"):
                out[key] = "the run has no discriminator; --discriminator logits (or features) adds one"
        if not params.get("feature_loss"):
            out["feature_weight"] = "the run has no feature loss; --feature-loss adds one"
        return out

    # --- optimisation -------------------------------------------------------------------------------------
    def make_student_optimizer(self, params: Iterable[nn.Parameter] | None = None) -> torch.optim.Optimizer:
        """The recipe's student optimizer over `params` (default: the student's parameters)."""
        p = self.p
        params = self.student.parameters() if params is None else params
        if p["s_optimizer"] == "adam":
            return torch.optim.Adam(params, lr=p["lr_s"], weight_decay=p["weight_decay"])
        if p["s_optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=p["lr_s"], momentum=p["momentum"], weight_decay=p["weight_decay"])
        raise DfkdError(f"-p s_optimizer={p['s_optimizer']!r}: use sgd or adam")

    @staticmethod
    def _lrs(opt: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, list[float]]:
        return opt, [g["lr"] for g in opt.param_groups]

    def track_lr(self, opt: torch.optim.Optimizer) -> None:
        """Put another optimizer (a generator's) under the run's learning-rate schedule."""
        self._base_lrs.append(self._lrs(opt))

    def lr_factor(self, progress: float) -> float:
        """The schedule's multiplier at `progress` in [0, 1]."""
        kind = self.p["schedule"]
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        if kind == "multistep":
            return self.p["gamma"] ** sum(progress >= m for m in self.p["milestones"])
        if kind == "constant":
            return 1.0
        raise DfkdError(f"-p schedule={kind!r}: use constant, cosine or multistep")

    def set_progress(self, progress: float) -> None:
        """Apply the learning-rate schedule for a run that is `progress` done."""
        f = self.lr_factor(progress)
        for opt, bases in self._base_lrs:
            for g, base in zip(opt.param_groups, bases):
                g["lr"] = base * f

    # --- steps --------------------------------------------------------------------------------------------
    @property
    def student_steps_per_round(self) -> int:
        """The student steps of the next round: `s_steps`, or fewer when the budget ends first.

        Under a step budget, what `steps_left` allows; under a time budget (and `fit_steps_to_budget`), what
        `steps_planner` fits (a round's steps take at most a tenth of the budget and end inside the time left,
        after the round's synthesis, `synthesis_reserve`). A round computes it before its synthesis, as the
        engine does, and runs its student steps in `student_steps(n)`, which measures them for the next plan.
        """
        n = int(self.p["s_steps"])
        n = n if self.steps_left is None else max(0, min(n, self.steps_left))
        if not self.fit_steps_to_budget:
            return n
        return self.steps_planner.cap(n, self.time_budget, self.time_left, self.synthesis_reserve())

    def synthesis_reserve(self) -> float:
        """Seconds of the round's synthesis, expected from the last one (0 for a method without a planner)."""
        planner = getattr(self, "planner", None)
        return 0.0 if planner is None else planner.batch_seconds

    def student_steps(self, n: int) -> Iterator[int]:
        """range(n): the student steps of a round (`n` from student_steps_per_round).

        Timed on the budget's clock where the budget may cut them (`fit_steps_to_budget`), for the next plan.
        """
        if not self.fit_steps_to_budget:
            yield from range(n)
            return
        with self.steps_planner.timing(n, self.clock):
            yield from range(n)

    def student_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        """KD loss: T^2-scaled KL at temperature T (override for L1 etc.)."""
        kd = kl_div(s_logits, t_logits, T=self.p["T"])
        return {"loss": kd, "loss/kd": kd}

    def student_step(self, x: torch.Tensor, t_logits: torch.Tensor | None = None) -> LossDict:
        """One student update on transfer images `x` (teacher logits computed unless given)."""
        t0 = time.perf_counter()
        if t_logits is None:
            with torch.no_grad(), self.objectives.capture_teacher(x):
                t_logits = self.teacher(x)
        s_logits = self.student_forward(x)
        losses = self.with_objectives(self.student_loss(s_logits, t_logits), x, s_logits, t_logits)
        self.opt_s.zero_grad(set_to_none=True)
        backward(losses["loss"])
        self.clip_student(losses)
        step(self.opt_s)
        losses.update(self.objectives.extra_step(x, s_logits, t_logits))
        self.student_seconds += time.perf_counter() - t0
        return losses

    def clip_student(self, losses: LossDict, own: float | None = None,
                     nets: tuple[tuple[torch.optim.Optimizer, nn.Module], ...] = ()) -> None:
        """Clip the student's gradient (after backward, before the step) to `clip_s` and a method's `own` clip.

        The smaller of the two norms wins; neither set, nothing is done. `nets` are further (optimizer, network)
        pairs clipped alike (a second student). The student's norm before clipping is logged as loss/grad_norm.
        """
        caps = [c for c in (self.p["clip_s"], own) if c is not None]
        if not caps:
            return
        for opt, net in ((self.opt_s, self.student), *nets):
            unscale(opt)
            norm = nn.utils.clip_grad_norm_(net.parameters(), min(caps))
            if net is self.student and not loss_scaled():  # an fp16 step that overflowed has an inf norm (the
                losses["loss/grad_norm"] = norm  # scaler skips it): no divergence

    def student_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits on `x`, with the objectives' feature taps recording (use for student updates)."""
        with self.objectives.capture():
            return self.student(x)

    def with_objectives(self, losses: LossDict, x: torch.Tensor, s_logits: torch.Tensor,
                        t_logits: torch.Tensor) -> LossDict:
        """The method's own student `losses` plus the objectives' terms (`s_logits` from `student_forward(x)`).

        A method running its own student loop calls this, then `self.objectives.extra_step(...)` after its update.
        """
        return self.objectives.add_terms(losses, x, s_logits, t_logits) if self.objectives else losses

    def round(self) -> dict[str, float]:
        """One round of synthesis and student steps; returns float losses keyed "<phase>/<term>"."""
        raise NotImplementedError

    def stores(self) -> dict[str, Any]:
        """The record stores this method keeps (its image pool; CMI adds its memory bank), by name."""
        pool = getattr(self, "pool", None)
        return {} if pool is None else {"pool": pool}

    def planners(self) -> dict[str, Any]:
        """The time-budget planners this method keeps (`dfkd.methods._budget`), by attribute name."""
        return {k: v for k in ("planner", "steps_planner") if (v := getattr(self, k, None)) is not None}

    def attach_storage(self, folder: str | Path) -> None:
        """Append the stores' records to files in `folder` (the run folder), so checkpoints hold only counts.

        Stores already given a folder (`-p pool_dir=...`) keep it.
        """
        for store in self.stores().values():
            if getattr(store, "store", store).folder is None:
                store.attach(folder)

    def waiting(self) -> str | None:
        """What the next round does before it takes a student step, where the step count may sit still long.

        A warm-up that only synthesizes; the progress bar shows it. None: nothing to say.
        """
        return None

    def notice(self, message: str) -> None:
        """Queue a one-line note for the run's output and log (a setting the method changed to fit the run)."""
        self._notices.append(message)

    def pop_notices(self) -> list[str]:
        """The notes queued since the last call."""
        notes, self._notices = self._notices, []
        return notes

    def close(self) -> None:
        """Release hooks, files and other resources."""
        self.objectives.close()
        for store in self.stores().values():
            store.close()

    # --- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "opt_s": self.opt_s.state_dict(),
                "synth": self.synth.state_dict() if self.synth else {}, "extra": self.extra_state(),
                "objectives": self.objectives.state_dict(),
                "planners": {k: v.state_dict() for k, v in self.planners().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.opt_s.load_state_dict(state["opt_s"])
        if self.synth:
            self.synth.load_state_dict(state["synth"])
        self.load_extra_state(state.get("extra", {}))
        self.objectives.load_state_dict(state.get("objectives", {}))
        for k, planner in self.planners().items():  # older checkpoints have none: the planner probes again
            planner.load_state_dict(state.get("planners", {}).get(k, {}))

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state beyond student, optimizer and synthesizer."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state
