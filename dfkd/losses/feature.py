"""Feature-based distillation losses between matching teacher and student layers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dfkd.losses._registry import LOSSES


def attention_map(x: Tensor) -> Tensor:
    """Spatial attention of a feature map: L2-normalised, flattened channel mean of x^2.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

    Shape:
        - x: (B, C, H, W)
        - output: (B, H*W)
    """
    return F.normalize(x.pow(2).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
def attention_transfer(student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
    """Attention transfer: sum over matched layers of mean((a_s - a_t)^2).

    Zagoruyko & Komodakis, ICLR 2017; ZSKT (Micaelli & Storkey, NeurIPS 2019) weights it by beta = 250.
    Layers whose spatial sizes differ are skipped (nothing to compare position by position).

    Args:
        student_feats: student block outputs, (B, C_s, H, W) each.
        teacher_feats: teacher block outputs at the same depths, (B, C_t, H, W) each.

    Returns:
        Scalar loss.

    Shape:
        - student_feats[i]: (B, C_s, H, W); teacher_feats[i]: (B, C_t, H, W)
        - output: ()
    """
    total = student_feats[0].new_zeros(())
    for s, t in zip(student_feats, teacher_feats):
        if s.dim() == 4 and s.shape[-2:] == t.shape[-2:]:
            total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
    return total


def matching_stages(student_stages: list[str], teacher_stages: list[str]) -> list[tuple[str, str]]:
    """Pair stages by depth when both models declare the same number of them; otherwise none."""
    if not student_stages or len(student_stages) != len(teacher_stages):
        return []
    return list(zip(student_stages, teacher_stages))


__all__ = ["attention_map", "attention_transfer", "matching_stages"]

