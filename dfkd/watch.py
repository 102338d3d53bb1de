"""Mode-collapse watch: class coverage and teacher confidence of the synthetic batches, said once per episode.

A generator that makes a few classes teaches the student only those; without real data a user cannot see it.
Every `watch_every` student steps the run measures, on the method's latest synthetic batch, how many classes the
teacher sees in it (covered, and the effective number exp(H) of the batch's class histogram), how confident the
teacher is, and how often the student agrees with it; these go to TensorBoard and metrics.jsonl under
`synthetic/`. When the effective number of classes stays under `collapse_fraction` of the classes a batch can
show (min(classes, batch)) for `collapse_patience` checks in a row, the run warns once, naming the remedy; the
episode ends after as many healthy checks in a row, and the run says so in a `note:` line (event
`collapse_recovered`; `dfkd report` marks the warning "recovered by step N"), so an early collapse that the
generator grew out of does not read as the run's end state.

The same checks watch the student. When it gives one answer to every image of a batch (its effective classes
under `STUCK_CLASSES`) from logits that hardly change from image to image while the teacher's do (the spread of
its logits over the batch, relative to their spread over batch and classes together, under `STUCK_SPREAD` times
the teacher's) for `collapse_patience` checks in a row, its activations have died (usually a step too large for
it: a high student learning rate, or a feature objective's weight swamping the KD loss) and it will not learn
again; the run warns once (event `student_stuck`, in `dfkd report`), naming the setting to lower, instead of
training on at chance to the end. A fresh student often gives one answer to every image too, but its logits move
with the image (spread 0.06-0.16 for LeNet-5, LeNet-5-half and WRN-16-1 at initialisation on noise; 0.002 for a
LeNet-5-half whose activations died): the spread keeps the warning off a student that has not learned yet.

Remedies are options, never silent changes: `-p collapse_action=reset` re-draws the generator's weights (and
clears its Adam state) when a collapse episode starts, for the methods with a GAN generator; `-p balance=W` adds
DAFL's information-entropy class-balance term (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019)
to their generator loss (DAFL has it already as `ie`, DFQ as `balance`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dfkd.distributed import env_world
from dfkd.errors import DfkdError

#: Run-level settings every method takes (`-p key=value`); see the module docstring.
WATCH_DEFAULTS: dict[str, Any] = {
    "watch_every": 50,  # student steps between checks of the synthetic batch; 0: off
    "collapse_fraction": 0.5,  # collapsed below this fraction of the classes a batch can show
    "collapse_patience": 5,  # checks in a row before a warning (and after it, healthy checks to end the episode)
    "collapse_action": "warn",  # "warn", or "reset": re-draw the generator's weights when an episode starts
}

ACTIONS = ("warn", "reset")
#: A student is stuck when its answers on a batch cover fewer effective classes than this (one answer for all) ...
STUCK_CLASSES = 1.5
#: ... and the spread of its logits over the batch is under this fraction of the teacher's (`batch_stats`).
STUCK_SPREAD = 0.01


@torch.no_grad()
def eval_logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """`model`'s logits on `x` in eval mode (no BatchNorm statistics change), its train/eval mode restored."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    finally:
        model.train(was)


def effective_classes(counts: torch.Tensor) -> float:
    """exp(entropy) of a class histogram: 1 for a single class, K for K equally frequent ones.

    Shape:
        - counts: (K,)
    """
    p = counts.float() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def batch_stats(t_logits: torch.Tensor, s_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Class coverage, effective classes, teacher confidence and spread of one batch; the student's when given.

    A model's spread is how much its logits change with the image: their standard deviation over the batch,
    averaged over the classes, over their standard deviation over batch and classes together (0: the same logits
    for every image). With `s_logits`: how often the student's answer is the teacher's (`student_agreement`), the
    effective classes of its own answers (`student_classes`) and its spread.

    Shape:
        - t_logits, s_logits: (B, K)
    """
    prob = t_logits.float().softmax(1)
    t_cls = prob.argmax(1)
    counts = torch.bincount(t_cls.cpu(), minlength=prob.shape[1])
    stats = {"classes_covered": float((counts > 0).sum()), "effective_classes": effective_classes(counts),
             "teacher_confidence": float(prob.max(1).values.mean()), "teacher_spread": logit_spread(t_logits)}
    if s_logits is not None:
        s_cls = s_logits.argmax(1)
        stats["student_agreement"] = float((s_cls == t_cls).float().mean())
        stats["student_classes"] = effective_classes(torch.bincount(s_cls.cpu(), minlength=prob.shape[1]))
        stats["student_spread"] = logit_spread(s_logits)
    return stats


@dataclass
class EpisodeWatch:
    """Counts bad checks; `record` says when an episode starts (warn then, once); `recovered` when it ends.

    Args:
        patience: bad checks in a row that start an episode; good checks in a row that end it.
    """

    patience: int = 5
    streak: int = 0
    healthy: int = 0
    in_episode: bool = False
    episodes: int = 0
    recent: list[bool] = field(default_factory=list)  # the last `patience` checks: bad or not
    recovered: bool = False  # the last record ended an episode

    def record(self, bad: bool) -> bool:
        """Record one check; True exactly when this check starts an episode."""
        self.recent = [*self.recent, bad][-self.patience:]
        self.recovered = False
        if bad:
            self.streak, self.healthy = self.streak + 1, 0
            if not self.in_episode and self.streak >= self.patience:
                self.in_episode, self.episodes = True, self.episodes + 1
                return True
            return False
        self.streak, self.healthy = 0, self.healthy + 1
        if self.in_episode and self.healthy >= self.patience:
            self.in_episode, self.recovered = False, True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "healthy": self.healthy, "in_episode": self.in_episode,
                "episodes": self.episodes, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class CollapseWatch(EpisodeWatch):
    """The collapse episodes: a check is collapsed when its batch covers too few effective classes.

    Args:
        num_classes: the teacher's classes.
        fraction: collapsed when effective classes < fraction * min(num_classes, batch size) (at least 1.5).
        patience: collapsed checks in a row that start an episode; healthy checks in a row that end it.
    """

    def __init__(self, num_classes: int, fraction: float = 0.5, patience: int = 5) -> None:
        super().__init__(patience)
        self.num_classes, self.fraction = num_classes, fraction

    def threshold(self, batch: int) -> float:
        return max(self.fraction * min(self.num_classes, batch), 1.5)

    def update(self, effective: float, batch: int) -> bool:
        """Record one check; True exactly when this check starts a collapse episode."""
        return self.record(effective < self.threshold(batch))


def logit_spread(logits: torch.Tensor) -> float:
    """How much logits change with the image: std over the batch (mean over classes) / std overall; 0 if constant.

    Shape:
        - logits: (B, K)
    """
    x = logits.float()
    if len(x) < 2:
        return 0.0
    return float(x.std(0).mean() / x.std().clamp_min(1e-12))


def student_stuck(stats: dict[str, float]) -> bool:
    """One answer for every image of a batch, from logits that change under `STUCK_SPREAD` of the teacher's."""
    if "student_classes" not in stats:
        return False
    return stats["student_classes"] < STUCK_CLASSES and \
        stats["student_spread"] < STUCK_SPREAD * stats["teacher_spread"]


def generator_of(method: Any) -> Any:
    """The method's trainable GAN synthesizer (`GeneratorSynthesizer`), or None for pool-served methods."""
    from dfkd.generators import GeneratorSynthesizer

    synth = getattr(method, "synth", None)
    return synth if isinstance(synth, GeneratorSynthesizer) else None


def check_watch_params(method: Any, p: dict[str, Any]) -> None:
    """Refuse settings the watch cannot honour, before training (one line naming the key and the fix)."""
    if p["collapse_action"] not in ACTIONS:
        raise DfkdError(f"-p collapse_action={p['collapse_action']!r}: use warn or reset")
    if p["collapse_action"] == "reset" and generator_of(method) is None:
        raise DfkdError(f"-p collapse_action=reset: method {method.name} has no GAN generator to reset; "
                        "use -p collapse_action=warn")
    if not 0 < float(p["collapse_fraction"]) <= 1 or int(p["collapse_patience"]) < 1:
        raise DfkdError(f"-p collapse_fraction={p['collapse_fraction']} / collapse_patience="
                        f"{p['collapse_patience']}: use a fraction in (0, 1] and a patience >= 1")


def reset_generator(synth: Any) -> None:
    """Re-draw the generator's initial weights (each layer's own `reset_parameters`) and clear its Adam state."""
    for m in synth.generator.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    synth.optimizer.state.clear()


def batches(method: Any) -> str:
    """What the watch looked at: the method's synthetic batches, or the batches of the file it reads."""
    reads = getattr(method, "reads", None)
    return f"the batches of {reads}" if reads else "the synthetic batches"


def remedy(method: Any, p: dict[str, Any]) -> str:
    """What the user can do about a collapse with this method, as `-p` settings (or about the file it reads)."""
    reads = getattr(method, "reads", None)
    if reads == "--transfer-data":
        return ("the transfer file shows the teacher few of its classes; make it again with more iterations per "
                "batch or with another method (dfkd synthesize)")
    if reads:
        return f"the teacher sees few of its classes in {reads}; give the run images of every class"
    if generator_of(method) is None:
        # inversion's and ZSKD's iterations per batch, else the latent generators' steps
        key = next((k for k in ("iterations", "di_iters", "g_steps") if p.get(k)), None)
        more = f" (-p {key}={2 * int(p[key])})" if key else ""
        gan = "" if env_world() > 1 else ", or try a GAN method with -p collapse_action=reset"
        return f"its synthesis does not reach the classes it targets; give it more iterations per batch{more}{gan}"
    if "ie" in p:
        balance = f"raise DAFL's class-balance weight (-p ie={2 * float(p['ie']):g})"
    else:
        balance = f"raise the class-balance weight (-p balance={max(2 * float(p.get('balance') or 0), 5):g})"
    if p["collapse_action"] == "reset":
        return f"the generator was reset (collapse_action=reset); if it collapses again, {balance}"
    if env_world() > 1:  # torchrun refuses the reset (each rank would draw its own generator)
        return balance
    return f"{balance}, or re-draw the generator when it happens (-p collapse_action=reset)"


def recovery_message(method: Any, stats: dict[str, float], num_classes: int, since: int) -> str:
    """One line: the episode warned of at step `since` is over (the warning stays in the log, this follows it)."""
    return (f"{method.name}: recovered from the mode collapse warned at step {since}: {batches(method)} cover "
            f"about {stats['effective_classes']:.1f} of {num_classes} classes again")


def collapse_message(method: Any, stats: dict[str, float], num_classes: int, steps: int) -> str:
    """One line: the problem (with its numbers) and the remedy."""
    agree = stats.get("student_agreement")
    agree_txt = f", student agrees on {100 * agree:.0f}%" if agree is not None else ""
    return (f"{method.name}: mode collapse: {batches(method)} have covered about "
            f"{stats['effective_classes']:.1f} of {num_classes} classes for {steps} steps (teacher "
            f"{100 * stats['teacher_confidence']:.0f}% confident{agree_txt}), so the student learns only those; "
            f"{remedy(method, method.p)}")


def stuck_remedy(method: Any) -> str:
    """What to lower when the student is stuck: an objective's weight when one is on, its lr, or clip its gradient."""
    lr = f"the student's learning rate (-p lr_s={float(method.p['lr_s']) / 5:g}; now {float(method.p['lr_s']):g})"
    if method.p.get("clip_s") is None:
        lr += " or clip its gradient (-p clip_s=1)"
    objectives = list(method.objectives)
    if objectives:
        weights = ", ".join(f"{o.name} {o.weight:g}" for o in objectives)
        return (f"lower the objectives' weight (--feature-weight; now {weights}) or {lr}, and start again: a dead "
                "student does not come back")
    return f"lower {lr} and start again: a dead student does not come back"


def stuck_message(method: Any, stats: dict[str, float], steps: int) -> str:
    """One line: the student answers one class whatever the image (with the numbers), and what to lower."""
    return (f"{method.name}: the student has given one answer to every synthetic image for {steps} steps (the "
            f"teacher sees about {stats['effective_classes']:.1f} classes in the same batches; the student agrees "
            f"on {100 * stats['student_agreement']:.0f}%): its activations have died and it will not learn; "
            f"{stuck_remedy(method)}")
