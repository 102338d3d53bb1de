"""Similarity-preserving distillation on the last stage's activations (Tung & Mori, ICCV 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.generators.base import LossDict
from dfkd.losses import similarity_preserving
from dfkd.objectives._registry import register_objective
from dfkd.objectives.base import Feature, Objective, student_penultimate, teacher_penultimate
from dfkd.teacher import Teacher


@register_objective("sp")
class SimilarityPreserving(Objective):
    """SP: inputs that excite similar activations in the teacher should excite similar activations in the student.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019: gamma / B^2 * ||G_s - G_t||_F^2 with
    gamma = 3000, on the outputs of the last stage of each network (the paper's CIFAR choice: only batch
    relations are compared, so the stages need not match in count, channels or size). Models that declare no
    stages use the inputs of their final Linear layer instead.
    """

    paper: ClassVar[str] = "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation, ICCV"
    default_weight: ClassVar[float] = 3000.0

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        s_stages, t_stages = list(getattr(student, "stages", ())), teacher.stage_paths()
        self.s_feat: Feature = (s_stages[-1], "output") if s_stages else (student_penultimate(student), "input")
        self.t_feat: Feature = (t_stages[-1], "output") if t_stages else \
            (teacher_penultimate(teacher, "--feature-loss sp"), "input")
        self.watch([self.s_feat[0]], [self.t_feat[0]])

    def terms(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        t = self.teacher_features(x, [self.t_feat])
        return {"sp": self.weight * similarity_preserving([self.student_feature(self.s_feat)], t)}
