"""Relational knowledge distillation on penultimate features (Park et al., CVPR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.generators.base import LossDict
from dfkd.losses import rkd_angle, rkd_distance
from dfkd.objectives._registry import register_objective
from dfkd.objectives.base import Objective, student_penultimate, teacher_penultimate
from dfkd.teacher import Teacher


@register_objective("rkd")
class RKD(Objective):
    """RKD: the student's batch of penultimate embeddings keeps the teacher's pairwise distances and angles.

    Park et al., "Relational Knowledge Distillation", CVPR 2019: 25 * RKD-D + 50 * RKD-A (the paper's weights).
    A number in `feature_weight` sets the distance weight and the angle weight to twice it (the paper's ratio).
    Embeddings are the inputs of the final Linear layers (their sizes may differ).
    """

    paper: ClassVar[str] = "Park et al. 2019, Relational Knowledge Distillation, CVPR"
    default_weight: ClassVar[float] = 25.0

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        self.s_feat = (student_penultimate(student), "input")
        self.t_feat = (teacher_penultimate(teacher, "--feature-loss rkd"), "input")
        self.watch([self.s_feat[0]], [self.t_feat[0]])

    def terms(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        (t,) = self.teacher_features(x, [self.t_feat])
        s = self.student_feature(self.s_feat)
        return {"rkd_distance": self.weight * rkd_distance(s, t), "rkd_angle": 2 * self.weight * rkd_angle(s, t)}
