"""A student that does not swing, chosen without real data: weight EMA and held-out synthetic agreement.

GAN-method students swing 10-20 points between evaluations; the one a run ends with is one draw. Two remedies:

- **EMA**: `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn` keeps an exponential moving average
  of the student's weights and BatchNorm buffers (`use_buffers=True`), updated after every round that made student
  steps with decay `d ** n`, n the round's own student steps (so the decay is per student step however the rounds
  vary: warm-up rounds make none, a time budget cuts rounds short, its first round is a short probe). The per-step
  decay `d` warms up as TensorFlow's `ExponentialMovingAverage(num_updates=...)` does: min(`ema_decay`,
  (1 + t) / (10 + t)), t the student steps averaged so far, so a short run's average is not mostly its first
  rounds' student (at 0.998 the first 500 steps kept 37 % of their weight after 500 more; a 5-minute run of a
  101M-multiply-add teacher makes about that many).
- **Data-free selection**: a held-out set of synthetic images the student never trains on, labelled by the
  teacher. Every `select_every` steps `heldout_chunk` fresh images are drawn from the method's own generator on
  a forked RNG stream seeded from the run's seed and the draw's index (the run's own randomness, and so its
  training, is unchanged; the training batches come from other latents), and enter a reservoir of
  `heldout_size` (uniform over every draw so far, so the set follows the generator's whole trajectory, early
  diverse batches included). The signal (`select_signal`) is by default the mean KL divergence KL(p_t || p_s) of
  the student's softmax from the teacher's on the set (`kl`, lower is better), or the student's top-1 agreement
  with the teacher's arg-max averaged per teacher class (`agreement`; a set dominated by one class does not drown
  the others). Both are logged. KL is the default because it ranked candidates closer to their real accuracy:
  on 12 three-minute runs of dafl, dfad, dfq and zskt on three LeNet-5 teachers (MNIST, MNIST-BN,
  Fashion-MNIST), over every raw and EMA copy taken at the checks, its Spearman correlation with real top-1
  averaged 0.85 against agreement's 0.80, and the student the end-of-run rule below would write fell short of
  the best copy by 2.4 points on average against 3.4, as good or better in 11 of the 12 runs
  (`bench/selection_signal.py`). The raw student, the EMA and the best snapshot seen so far are scored on the
  current set at each check; the best scorer is kept (in memory and in the checkpoint). At the end the better of
  the final raw student and the final EMA is written as student.pt, unless the kept snapshot scores better by
  over `select_margin` (0.01: nats of KL, or a point of agreement: about the set's sampling noise, so a near-tie
  goes to the student that trained longer).

Only methods whose synthesizer draws fresh samples (the GAN generators: dafl, dfad, zskt, dfq, online) have such
a set: the pool-served methods train on every image they keep, so they write the raw student as before (the EMA
is still logged beside it when eval data is given). `-p select_every=0` turns selection off, `-p ema_decay=0`
the EMA.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dfkd.errors import DfkdError
from dfkd.precision import eager
from dfkd.watch import eval_logits, generator_of

#: Run-level settings every method takes (`-p key=value`); see the module docstring.
SELECT_DEFAULTS: dict[str, Any] = {
    "ema_decay": 0.998,  # per student step; 0: no EMA
    "select_every": 100,  # student steps between held-out checks; 0: no selection (the raw student is written)
    "heldout_size": 1024,  # synthetic images in the held-out set
    "heldout_chunk": 128,  # fresh images drawn at each check into the set
    "select_margin": 0.01,  # an earlier snapshot replaces the final student only when it scores this much better
    "select_signal": "kl",  # kl: mean KL(teacher || student) on the set, lower is better; or agreement (top-1)
}

SIGNALS = ("kl", "agreement")

MAX_HELDOUT_VALUES = 2**24


def class_balanced_agreement(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over the teacher's classes present in `labels` of the top-1 agreement on that class.

    Shape:
        - logits: (N, K)
        - labels: (N,)
    """
    hit = (logits.argmax(1) == labels).float()
    per_class = torch.zeros(num_classes).index_add_(0, labels.cpu(), hit.cpu())
    counts = torch.bincount(labels.cpu(), minlength=num_classes).float()
    present = counts > 0
    return float((per_class[present] / counts[present]).mean()) if present.any() else 0.0


class HeldOut:
    """A reservoir of teacher-labelled synthetic images the student never trains on, with the teacher's logits.

    It holds at most MAX_HELDOUT_VALUES pixel values (64 MiB as float32, in memory and in the checkpoint): 1024
    images up to 64x64x3, about 110 at 224x224x3.

    Args:
        size: images kept (capped as above).
        seed: seeds each draw's forked RNG (with the draw's index) and the reservoir's choices.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.x: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # the teacher's, float32
        self.seen = 0
        self.draws = 0
        self.rng = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def draw(self, synth: Any, teacher: nn.Module, n: int) -> None:
        """`n` fresh images of `synth` on a forked, seeded RNG stream, labelled by `teacher`, into the reservoir.

        The generator's BatchNorm buffers are restored afterwards: the draw leaves no trace in the run.
        """
        device = next(synth.generator.parameters()).device
        buffers = {k: v.clone() for k, v in synth.generator.named_buffers()}
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + self.draws)
            x = synth.sample(n)
        for k, v in synth.generator.named_buffers():
            v.copy_(buffers[k])
        self.draws += 1
        self.add(x.detach(), eval_logits(teacher, x).float())

    def add(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Reservoir sampling (Vitter's algorithm R): every image drawn so far is kept with equal probability."""
        for i in range(len(x)):
            if self.x is None:
                self.size = max(1, min(self.size, MAX_HELDOUT_VALUES // x[0].numel()))
                self.x = x.new_empty((self.size, *x.shape[1:]))
                self.logits = logits.new_empty((self.size, *logits.shape[1:]))
            if self.seen < self.size:
                slot = self.seen
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.rng))
            if slot < self.size:
                self.x[slot], self.logits[slot] = x[i], logits[i]
            self.seen += 1

    @property
    def labels(self) -> torch.Tensor | None:
        """The teacher's arg-max on the kept images (all `size` slots; the first `seen` are filled)."""
        return None if self.logits is None else self.logits.argmax(1)

    def scores(self, model: nn.Module, num_classes: int) -> dict[str, float]:
        """`model` against the teacher on the set: {"kl": mean KL(p_t || p_s), "agreement": class-balanced top-1}."""
        n = min(self.seen, self.size)
        s, t = eval_logits(model, self.x[:n]).float(), self.logits[:n]
        kl = F.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean")
        return {"kl": float(kl), "agreement": class_balanced_agreement(s, t.argmax(1), num_classes)}

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "logits": self.logits, "seen": self.seen, "draws": self.draws,
                "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None,
                        teacher: nn.Module | None = None) -> None:
        """The saved set, moved to `device` (a checkpoint loads on the CPU; a GPU run scores on its GPU).

        A checkpoint from before the set kept the teacher's logits has only its labels: `teacher` labels it again.
        """
        self.x, self.logits = state["x"], state.get("logits")
        if self.x is not None:
            self.x = self.x.to(device)
            if self.logits is None:
                if teacher is None:
                    raise DfkdError("the checkpoint's held-out set has no teacher logits; resume it with its teacher")
                self.logits = eval_logits(teacher, self.x).float()
            self.logits = self.logits.to(device)
            self.size = len(self.x)  # the cap applied when the set was first filled
        self.seen, self.draws = int(state["seen"]), int(state["draws"])
        self.rng.set_state(state["rng"])


def flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Scores by candidate as logged under select/: agreement, agreement_ema, kl_best, ... (raw unsuffixed)."""
    return {(key if name == "raw" else f"{key}_{name}"): v for name, s in scores.items() for key, v in s.items()}


class StepDecay:
    """The EMA's averaging for rounds of any length, with the warm-up of the module doc.

    `steps` (the round's student steps) is set before each update; `done` counts the steps averaged so far (kept
    in the checkpoint). A round's decay is min(per_step, (1 + t) / (10 + t)) ** steps, t = `done` after the round.
    """

    def __init__(self, per_step: float) -> None:
        self.per_step, self.steps, self.done = per_step, 1, 0

    def decay(self) -> float:
        t = self.done + self.steps
        return min(self.per_step, (1 + t) / (10 + t)) ** self.steps

    def __call__(self, ema_params: Any, current_params: Any, num_averaged: Any) -> None:
        get_ema_multi_avg_fn(self.decay())(ema_params, current_params, num_averaged)


def make_ema(student: nn.Module, decay: float) -> AveragedModel | None:
    """The EMA of `student` (weights and BN buffers), `decay` per student step; None when `decay` is 0.

    Update it with `update_ema`, which gives the steps the student made since the last update.
    """
    if not 0 <= decay < 1:
        raise DfkdError(f"-p ema_decay={decay}: use a decay in [0, 1) (0 turns the EMA off), e.g. 0.998")
    if decay == 0:
        return None
    return AveragedModel(student, multi_avg_fn=StepDecay(decay), use_buffers=True)


def update_ema(ema: AveragedModel, student: nn.Module, steps: int) -> None:
    """Average `student` into `ema` after `steps` student steps (none: nothing to average)."""
    if steps > 0:
        ema.multi_avg_fn.steps = steps
        ema.update_parameters(student)  # the first update copies the student; later ones average
        ema.multi_avg_fn.done += steps


class Selector:
    """The EMA, the held-out set and the best student by held-out agreement, for one run.

    Args:
        method: the run's method (its `student`, `synth`, `teacher`, `p`).
        seed: the run's seed.
        enabled: False keeps neither EMA nor held-out set (the raw student is written).
    """

    def __init__(self, method: Any, seed: int, enabled: bool = True) -> None:
        p = method.p
        self.method, self.num_classes = method, method.teacher.num_classes
        decay = float(p["ema_decay"]) if enabled else 0.0
        self.ema = make_ema(method.student, decay)
        self.synth = generator_of(method) if enabled and int(p["select_every"]) > 0 else None
        self.chunk, self.margin = int(p["heldout_chunk"]), float(p["select_margin"])
        self.signal = str(p["select_signal"])
        if self.signal not in SIGNALS:
            raise DfkdError(f"-p select_signal={self.signal!r}: use kl (mean KL divergence from the teacher on the "
                            "held-out set) or agreement (its class-balanced top-1 agreement)")
        if self.synth is not None and (int(p["heldout_size"]) < 1 or self.chunk < 1):
            raise DfkdError(f"-p heldout_size={p['heldout_size']} / heldout_chunk={p['heldout_chunk']}: use "
                            "positive sizes (or -p select_every=0 to turn selection off)")
        self.heldout = HeldOut(int(p["heldout_size"]), seed) if self.synth is not None else None
        self.best: nn.Module | None = None
        self.best_info: dict[str, Any] = {}

    def candidates(self) -> list[tuple[str, nn.Module]]:
        """(name, model) of the raw student, the EMA and the kept best, in the order ties are broken."""
        out = [("raw", self.method.student)]
        if self.ema is not None:
            out.append(("ema", self.ema.module))
        if self.best is not None:
            out.append(("best", self.best))
        return out

    def update_ema(self, steps: int) -> None:
        """Average the student into the EMA after a round of `steps` student steps."""
        if self.ema is not None:
            update_ema(self.ema, self.method.student, steps)

    def _scored(self) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """Every candidate's scores on the current set, and the selection's value of each (higher is better)."""
        scores = {name: self.heldout.scores(m, self.num_classes) for name, m in self.candidates()}
        sign = -1.0 if self.signal == "kl" else 1.0
        return scores, {name: sign * s[self.signal] for name, s in scores.items()}

    def check(self, step: int) -> dict[str, float]:
        """Draw into the held-out set, score every candidate, keep the best; returns the scores to log."""
        if self.heldout is None:
            return {}
        self.heldout.draw(self.synth, self.method.teacher, self.chunk)
        scores, value = self._scored()
        name = max(value, key=value.get)
        if name != "best":
            self._keep(dict(self.candidates())[name], name, step)
        self.best_info[self.signal] = scores[name][self.signal]
        return flat_scores(scores)

    def _keep(self, model: nn.Module, kind: str, step: int) -> None:
        if self.best is None:
            self.best = eager(copy.deepcopy(self.method.student)).eval()
        self.best.load_state_dict(model.state_dict())
        self.best_info = {"kind": kind, "step": step}

    def choose(self, step: int) -> tuple[str, nn.Module, dict[str, dict[str, float]]]:
        """The student to write: the better of final raw and final EMA, or the kept snapshot when clearly better.

        Returns:
            (a description such as "ema (step 1200)", the model, the held-out scores by candidate:
            {"raw": {"kl": ..., "agreement": ...}, ...}).
        """
        if self.heldout is None or not len(self.heldout):
            return "raw", self.method.student, {}
        scores, value = self._scored()
        final = max((k for k in value if k != "best"), key=value.get)
        name = "best" if value.get("best", -math.inf) > value[final] + self.margin else final
        if name == "best":
            label = f"{self.best_info['kind']} at step {self.best_info['step']}"
        else:
            label = f"{name} at step {step}"
        return label, dict(self.candidates())[name], scores

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None,
                "ema_steps": self.ema.multi_avg_fn.done if self.ema is not None else 0,
                "heldout": self.heldout.state_dict() if self.heldout is not None else None,
                "best": self.best.state_dict() if self.best is not None else None, "best_info": self.best_info}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
            # a checkpoint from before the warm-up: its EMA continues without one
            self.ema.multi_avg_fn.done = int(state.get("ema_steps", 10**9))
        if self.heldout is not None and state.get("heldout") is not None:
            self.heldout.load_state_dict(state["heldout"], next(self.method.student.parameters()).device,
                                         self.method.teacher)
        if state.get("best") is not None:
            self.best = eager(copy.deepcopy(self.method.student)).eval()
            self.best.load_state_dict(state["best"])
        self.best_info = dict(state.get("best_info") or {})
