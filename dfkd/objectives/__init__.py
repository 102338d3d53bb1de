"""Student-side objectives that any method adds to its own KD loss: attention, relations, hints, discriminators.

One file per objective, registered with `@register_objective`; every public module here is imported, so a new
objective is one new file. A method's params choose them: `feature_loss` (a name or a list of names),
`feature_weight`, `discriminator` ("logits" or "features"), `disc_weight`, `lr_d`.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.generators.base import LossDict
from dfkd.objectives._registry import OBJECTIVES, get_objective, list_objectives, register_objective
from dfkd.objectives.base import Objective
from dfkd.teacher import Teacher


class ObjectiveSet:
    """The objectives of one method, used together: one `capture()` block, summed terms, one state dict.

    Args:
        objectives: the built objectives, in the order their terms are logged.
    """

    def __init__(self, objectives: list[Objective]) -> None:
        self.objectives = objectives

    def __iter__(self) -> Iterator[Objective]:
        return iter(self.objectives)

    def __len__(self) -> int:
        return len(self.objectives)

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record every objective's student features during the forwards in this block."""
        with ExitStack() as stack:
            for o in self.objectives:
                stack.enter_context(o.capture())
            yield

    @contextmanager
    def capture_teacher(self, x: torch.Tensor) -> Iterator[None]:
        """Record every objective's teacher features during the teacher's forward on `x` in this block."""
        with ExitStack() as stack:
            for o in self.objectives:
                stack.enter_context(o.capture_teacher(x))
            yield

    def add_terms(self, losses: LossDict, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        """`losses` with every objective's terms added (to "loss" and as "loss/<term>")."""
        out = dict(losses)
        for o in self.objectives:
            for k, v in o.terms(x, s_logits, t_logits).items():
                key = f"loss/{k}" if f"loss/{k}" not in out else f"loss/{k}_obj"  # e.g. ZSKT's own "at"
                out[key] = v
                out["loss"] = out["loss"] + v
            o.release()
        return out

    def extra_step(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        """Every objective's own optimisation step (after the student's update); their logged terms."""
        out: LossDict = {}
        for o in self.objectives:
            out.update({f"loss/{k}": v for k, v in o.extra_step(x, s_logits, t_logits).items()})
        return out

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the student's optimizer trains alongside the student (adapters)."""
        return [p for o in self.objectives for p in o.parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {o.name: o.state_dict() for o in self.objectives}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [o.name for o in self.objectives if o.name not in state]
        if missing:
            raise DfkdError(f"the checkpoint holds no state for objective(s) {missing}; resume with the objectives "
                            "the run was started with")
        for o in self.objectives:
            o.load_state_dict(state[o.name])

    def close(self) -> None:
        for o in self.objectives:
            o.close()


def objective_names(params: dict[str, Any]) -> list[str]:
    """The objectives `params` ask for: `feature_loss` names, then "discriminator" when `discriminator` is set."""
    fl = params.get("feature_loss")
    names = [] if fl in (None, "", []) else [fl] if isinstance(fl, str) else fl
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DfkdError(f"-p feature_loss={fl!r}: give an objective's name or a list of names, from "
                        f"{', '.join(sorted(set(list_objectives()) - {'discriminator'}))}")
    names = list(names)
    for n in names:
        get_objective(n)  # an unknown name: the registry's error lists the known ones
    mode = params.get("discriminator")
    if mode not in (None, "logits", "features"):
        raise DfkdError(f"-p discriminator={mode!r}: use logits or features (or leave it unset)")
    if len(set(names)) != len(names):
        raise DfkdError(f"--feature-loss {names}: each objective may be named once")
    if mode is not None and "discriminator" not in names:
        names.append("discriminator")
    return names


def stray_weights(params: dict[str, Any]) -> str | None:
    """What is wrong with a `feature_weight` table naming objectives the run does not have (None: nothing).

    A typo ({"AT": 100}) or another run's objective left the named one at its paper weight, unsaid.
    """
    weights = params.get("feature_weight")
    names = [n for n in objective_names(params) if n != "discriminator"]  # weighed by disc_weight
    stray = sorted(set(weights) - set(names)) if isinstance(weights, dict) else []
    if not stray:
        return None
    disc = " (the discriminator's weight is --disc-weight)" if "discriminator" in stray else ""
    return (f"feature_weight={json.dumps(weights)} names {', '.join(stray)}, not an objective of this run "
            f"({', '.join(names) or 'none'}; --feature-loss names them){disc}")


def build_objectives(teacher: Teacher, student: nn.Module, params: dict[str, Any],
                     device: torch.device) -> ObjectiveSet:
    """Build the objectives `params` select (see `objective_names`) for this teacher and student."""
    return ObjectiveSet([get_objective(n)(teacher, student, params, device) for n in objective_names(params)])


for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["OBJECTIVES", "Objective", "ObjectiveSet", "build_objectives", "get_objective", "list_objectives",
           "objective_names", "register_objective", "stray_weights"]
