"""FitNets hint regression through a learned adapter (Romero et al., ICLR 2015)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.generators.base import LossDict
from dfkd.losses import hint_loss, matching_stages
from dfkd.objectives._registry import register_objective
from dfkd.objectives.base import Feature, Objective, student_penultimate, teacher_penultimate
from dfkd.teacher import Teacher


@register_objective("fitnet")
class FitNet(Objective):
    """FitNets: a learned regressor maps the student's guided layer onto the teacher's hint layer (MSE).

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. Hint and guided layers are the middle stages
    when teacher and student declare as many stages (a 1x1-convolution regressor; the student map is average-
    pooled to the teacher's size when they differ), else the inputs of the final Linear layers (a linear
    regressor). The regressor is trained by the student's optimizer, jointly with the student (mdistiller's
    FitNet recipe, weight 100, rather than the paper's separate hint-pretraining stage).
    """

    paper: ClassVar[str] = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets, ICLR"
    default_weight: ClassVar[float] = 100.0

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        pairs = matching_stages(list(getattr(student, "stages", ())), teacher.stage_paths())
        if pairs:
            s_path, t_path = pairs[(len(pairs) - 1) // 2]
            self.s_feat: Feature = (s_path, "output")
            self.t_feat: Feature = (t_path, "output")
        else:
            self.s_feat = (student_penultimate(student), "input")
            self.t_feat = (teacher_penultimate(teacher, "--feature-loss fitnet"), "input")
        self.watch([self.s_feat[0]], [self.t_feat[0]])
        (s_shape,), (t_shape,) = self.probe([self.s_feat], [self.t_feat])
        conv = len(s_shape) == 4 and len(t_shape) == 4
        adapter = nn.Conv2d(s_shape[1], t_shape[1], 1, bias=False) if conv else \
            nn.Linear(s_shape[1:].numel(), t_shape[1:].numel())
        self.learned["adapter"] = adapter.to(device)
        self.t_size = tuple(t_shape[2:]) if conv else None

    def regress(self, s: torch.Tensor) -> torch.Tensor:
        """The student's guided-layer output mapped onto the teacher's hint shape."""
        if self.t_size is None:
            return self.learned["adapter"](s.flatten(1))
        r = self.learned["adapter"](s)
        return r if tuple(r.shape[2:]) == self.t_size else F.adaptive_avg_pool2d(r, self.t_size)

    def terms(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        (t,) = self.teacher_features(x, [self.t_feat])
        r = self.regress(self.student_feature(self.s_feat))
        return {"fitnet": self.weight * hint_loss(r, t.reshape(r.shape))}
