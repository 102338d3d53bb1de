"""Attention transfer between matched stages (Zagoruyko & Komodakis, ICLR 2017)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.generators.base import LossDict
from dfkd.losses import attention_transfer, matching_stages
from dfkd.objectives._registry import register_objective
from dfkd.objectives.base import Objective
from dfkd.teacher import Teacher


@register_objective("at")
class AttentionTransfer(Objective):
    """AT: the student's spatial attention maps match the teacher's at stages of the same depth.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017. Stages pair by depth when teacher and
    student declare as many (LeNet-5 with LeNet-5-half, WRN-40-2 with WRN-16-1); pairs of different spatial size
    are left out with a warning, and refused when that is every pair. Weight 500: the official code's beta/2 with
    beta = 1000 (ZSKT uses 250).
    """

    paper: ClassVar[str] = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention, ICLR"
    default_weight: ClassVar[float] = 500.0

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        s_stages, t_stages = list(getattr(student, "stages", ())), teacher.stage_paths()
        self.pairs = matching_stages(s_stages, t_stages)
        if not self.pairs:
            raise DfkdError(f"--feature-loss at: attention transfer pairs stages by depth, but the teacher "
                            f"{teacher.source} declares {len(t_stages)} stage(s) and the student {len(s_stages)}; "
                            "pick a student of the teacher's family or use --feature-loss sp/rkd")
        self.watch([s for s, _ in self.pairs], [t for _, t in self.pairs])
        self.pairs = self._same_size(teacher)

    def _same_size(self, teacher: Teacher) -> list[tuple[str, str]]:
        """The pairs whose maps have the same spatial size (attention is compared position by position).

        A torchvision or timm ResNet at 32 px (an ImageNet stem: 8, 4, 2, 1 px) against a CIFAR-form student (32,
        16, 8, 4 px) had every pair skipped: the loss was 0 for the whole run, unsaid.
        """
        s_shapes, t_shapes = self.probe([(p, "output") for p, _ in self.pairs],
                                        [(p, "output") for _, p in self.pairs])
        same = [pair for pair, a, b in zip(self.pairs, s_shapes, t_shapes) if len(a) == 4 and a[-2:] == b[-2:]]
        sizes = ", ".join(f"{'x'.join(map(str, a[-2:]))} / {'x'.join(map(str, b[-2:]))}"
                          for a, b in zip(s_shapes, t_shapes))
        if not same:
            raise DfkdError(f"--feature-loss at: no stage of the student has the spatial size of the teacher "
                            f"{teacher.source}'s stage at the same depth (student / teacher: {sizes}), and attention "
                            "maps are compared position by position; use --feature-loss sp/rkd/fitnet, or a student "
                            "whose stem shrinks the input as the teacher's does")
        if len(same) < len(self.pairs):
            warnings.warn(f"--feature-loss at: {len(self.pairs) - len(same)} of the {len(self.pairs)} stage pairs "
                          f"differ in spatial size (student / teacher: {sizes}) and are left out", stacklevel=3)
        return same

    def terms(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        t = self.teacher_features(x, [(p, "output") for _, p in self.pairs])
        s = [self.student_feature((p, "output")) for p, _ in self.pairs]
        return {"at": self.weight * attention_transfer(s, t)}
