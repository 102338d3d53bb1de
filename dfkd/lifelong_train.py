"""The training loops of `dfkd extend` (see `dfkd.lifelong`): the grown model, its batches, losses and checkpoints."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dfkd.data import ImageData, to_model_input
from dfkd.errors import DfkdError
from dfkd.evaluate import predict
from dfkd.hooks import FeatureTaps
from dfkd.io import atomic_torch_save
from dfkd.loading import read_weights_only
from dfkd.models import ZooModel
from dfkd.spec import InputSpec
from dfkd.stopping import on_stop_signals
from dfkd.teacher import Teacher
from dfkd.utils import on_terminal, progress_bar

#: Phases in the order a run trains them: the extended model, then the two references.
PHASES = ("extend", "finetune", "joint")


def head_path(model: nn.Module) -> str:
    """Path of the classifier layer (zoo models: `classifier`; others: the last Linear)."""
    if isinstance(model, ZooModel):
        return "classifier"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DfkdError("--teacher: the model has no Linear classifier layer to grow; dfkd extend needs one")
    return linears[-1]


def grow_model(teacher: Teacher, k_all: int) -> nn.Module:
    """A copy of the teacher's architecture with `k_all` outputs: old weights kept, the head's new rows fresh.

    Raises:
        DfkdError: when the teacher's architecture cannot be rebuilt (TorchScript/export archives, pickles).
    """
    from dfkd.archs import build_model

    if not teacher.arch or teacher.arch in ("torchscript", "export"):
        raise DfkdError(f"--teacher {teacher.source}: a {teacher.fmt} file cannot be rebuilt with more classes; give a "
                        "dfkd model file or a state_dict with --teacher-arch")
    model = build_model(teacher.arch, {**(teacher.arch_kwargs or {}), "num_classes": k_all}, trusted=False)
    old = teacher.module.state_dict()
    state = model.state_dict()
    for key, value in old.items():
        if key not in state:
            raise DfkdError(f"--teacher {teacher.source}: its weights do not fit {teacher.arch} (no {key})")
        if state[key].shape == value.shape:
            state[key] = value.clone()
        else:  # the classifier: old rows first, the new classes' rows keep their fresh initialisation
            state[key][: value.shape[0]] = value
    model.load_state_dict(state)
    return model


class Batches:
    """One batch from each source per step, drawn from a generator seeded by (seed, step): resumes are exact.

    Args:
        sources: labelled image sets (uint8 pixels).
        spec: the model's input spec.
        batch_size: images per source per step.
        seed: random seed.
    """

    def __init__(self, sources: list[ImageData], spec: InputSpec, batch_size: int, seed: int) -> None:
        self.sources, self.spec, self.batch_size, self.seed = sources, spec, batch_size, seed

    def __call__(self, step: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = []
        for data in self.sources:
            idx = torch.randint(len(data), (min(self.batch_size, len(data)),), generator=g)
            out.append((to_model_input(data.x[idx], self.spec).to(device), data.y[idx].to(device)))
        return out


@dataclass
class Phase:
    """One training phase: "extend" (the Always-Be-Dreaming losses) or a reference ("finetune", "joint": CE)."""

    name: str
    model: nn.Module
    teacher: Teacher
    k_old: int
    batches: Batches
    steps: int
    lr: float
    hkd_weight: float
    checkpoint_every: int
    checkpoint: Path


def importance(teacher: Teacher) -> torch.Tensor:
    """Per-feature importance to the old head: mean |weight| over the old classes, normalised to mean 1."""
    w = teacher.module_at(head_path(teacher.module)).weight.detach().abs().mean(0)
    return w / w.mean().clamp_min(1e-12)


def abd_loss(phase: Phase, real: tuple[torch.Tensor, torch.Tensor], replay: tuple[torch.Tensor, torch.Tensor],
             omega: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Always-Be-Dreaming objective on one batch of new real images and one of replay images."""
    x = torch.cat([real[0], replay[0]])
    path, k = head_path(phase.model), phase.k_old
    with FeatureTaps(phase.model, [path]) as taps:
        logits = phase.model(x)
        h = taps.inputs[path]
    with torch.no_grad(), phase.teacher.tap([path]) as ttaps:
        phase.teacher(x)
        h_old = ttaps.inputs[path]
    n, y = len(real[0]), torch.cat([real[1], replay[1]])
    losses = {"loss/ce_new": F.cross_entropy(logits[:n, k:], real[1] - k),
              "loss/ce_old": F.cross_entropy(logits[n:, :k], replay[1]),
              "loss/hkd": (omega * (h - h_old)).pow(2).mean(),
              "loss/head": F.cross_entropy(phase.model.get_submodule(path)(h.detach()), y)}
    losses["loss"] = (losses["loss/ce_new"] + losses["loss/ce_old"] + phase.hkd_weight * losses["loss/hkd"]
                      + losses["loss/head"])
    return losses


def ce_loss(phase: Phase, *batches: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The references: plain cross-entropy over every class on the real batches."""
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return {"loss": F.cross_entropy(phase.model(x), y)}


def train_phase(phase: Phase, device: torch.device) -> None:
    """Train `phase.model` for `phase.steps` steps, checkpointing; continue from `phase.checkpoint` when it exists.

    A stop signal (Ctrl-C, SIGTERM, SIGHUP) checkpoints after the current step and raises KeyboardInterrupt: a
    SIGTERM killed the phase silently, losing the steps since its last checkpoint.
    """
    opt = torch.optim.Adam(phase.model.parameters(), lr=phase.lr)
    start = _load(phase, opt)
    omega = importance(phase.teacher).to(device) if phase.name == "extend" else None
    phase.model.train()
    bar = progress_bar(iterable=range(start, phase.steps), desc=phase.name, initial=start, total=phase.steps,
                       leave=False)
    with stop_between_steps() as stop:
        for step in bar:
            batches = phase.batches(step, device)
            losses = abd_loss(phase, *batches, omega) if omega is not None else ce_loss(phase, *batches)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            if (step + 1) % phase.checkpoint_every == 0 or step + 1 == phase.steps or stop["stop"]:
                _save(phase, opt, step + 1)
                bar.set_postfix(loss=f"{losses['loss'].item():.3f}", refresh=on_terminal())
            if stop["stop"]:  # at the phase's last step too: the next phase would not start
                raise KeyboardInterrupt(f"stopped at step {step + 1} of the {phase.name} phase; checkpoint saved")
    phase.model.eval()


@contextmanager
def stop_between_steps() -> Iterator[dict[str, bool]]:
    """The first stop signal sets `stop["stop"]` (the loop checkpoints and stops); a second one stops at once."""
    stop = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if stop["stop"]:
            raise KeyboardInterrupt
        stop["stop"] = True
        tqdm.write("stopping: the step ends, a checkpoint is saved and the run stops (a second stop signal stops "
                   "at once, losing the steps since the last checkpoint)", file=sys.stderr)

    with on_stop_signals(handler):
        yield stop


def _save(phase: Phase, opt: torch.optim.Optimizer, step: int) -> None:
    atomic_torch_save({"phase": phase.name, "step": step, "model": phase.model.state_dict(),
                       "opt": opt.state_dict(), "rng": torch.get_rng_state()}, phase.checkpoint)


def _load(phase: Phase, opt: torch.optim.Optimizer) -> int:
    if not phase.checkpoint.exists():
        return 0
    state = read_weights_only(phase.checkpoint, "--resume")  # a truncated file: one line, not torch's traceback
    if not isinstance(state, dict) or not {"model", "opt", "step"} <= set(state):
        raise DfkdError(f"--resume {phase.checkpoint}: not a checkpoint of this phase; remove it to train the "
                        "phase again from its start")
    phase.model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if "rng" in state:  # a model with dropout draws from it: the steps after a resume draw what they would have
        torch.set_rng_state(state["rng"])
    return int(state["step"])


def evaluate_split(model: nn.Module, test: ImageData, spec: InputSpec, k_old: int, k_all: int,
                   device: torch.device) -> dict[str, float]:
    """Top-1 (fractions) on the old classes (< k_old), the new ones (k_old..k_all-1) and all of them.

    A model with only the old classes (the teacher) gets `old` alone.
    """
    logits = predict(model, test, spec, device)
    right = logits.argmax(1) == test.y
    out = {}
    for name, mask in (("old", test.y < k_old), ("new", (test.y >= k_old) & (test.y < k_all)), ("all", test.y < k_all)):
        if mask.any() and (name == "old" or k_all > k_old):
            out[name] = right[mask].float().mean().item()
    return out
