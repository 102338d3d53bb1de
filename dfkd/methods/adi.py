"""Adaptive DeepInversion: DeepInversion plus a teacher-student competition term (Yin et al., CVPR 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfkd.generators import LossDict
from dfkd.losses import adv_js
from dfkd.methods._registry import register_method
from dfkd.methods.deepinversion import DeepInversion


@register_method("adi")
class ADI(DeepInversion):
    """Adaptive DeepInversion: DeepInversion inputs that the student being distilled disagrees with the teacher on.

    Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020, Sec. 3.3.
    L(x) = L_DI(x) + adi*(1 - clamp(JS_T(s(x), t(x)), 0, 1)) with JS at T=3 on probabilities clamped to
    [0.01, 0.99] (NVlabs). The competition uses the student currently being distilled (NVlabs/DeepInversion#7, #20:
    it starts from scratch and is the KD student), in eval mode with frozen weights, so its gradient reaches only
    the pixels. adi = 0.2 is the paper's (NVlabs `--adi_scale`); every other default, and the scaling to the
    teacher (CIFAR and ImageNet settings), is DeepInversion's.
    """

    paper: ClassVar[str] = "Yin et al. 2020, Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR"
    summary: ClassVar[str] = "DeepInversion plus a competition term: inputs the student still gets wrong"
    defaults: ClassVar[dict[str, Any]] = {"adi": 0.2, "adi_T": 3.0}

    def inversion_loss(self, x: torch.Tensor, y: torch.Tensor) -> LossDict:
        t_logits = self.teacher(x)
        losses = self.inversion_terms(x, y, t_logits)
        competition = adv_js(self.student(x), t_logits, T=self.p["adi_T"])
        losses["loss"] = losses["loss"] + self.p["adi"] * competition
        losses["loss/adi"] = competition
        return losses
