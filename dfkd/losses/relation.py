"""Relation- and hint-based distillation losses: RKD distance/angle, similarity preserving, FitNets hints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.losses._registry import LOSSES


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of `e`, zero on the diagonal (as the RKD reference `pdist`).

    Shape:
        - e: (B, D)
        - output: (B, B)
    """
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


@LOSSES.register("rkd_distance")
def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss: Huber loss between mean-normalised pairwise distances of the two embeddings.

    Park et al., "Relational Knowledge Distillation", CVPR 2019 (weight 25 in the paper). The teacher side carries
    no gradient. Embedding sizes may differ: only distances within each batch are compared.

    Args:
        student: student embeddings.
        teacher: teacher embeddings.

    Returns:
        mean smooth-L1(d_s / mean(d_s), d_t / mean(d_t)) over all B^2 pairs, a scalar.

    Shape:
        - student: (B, D_s); teacher: (B, D_t)
        - output: ()
    """
    with torch.no_grad():
        t = pairwise_distances(teacher.flatten(1))
        t = t / t[t > 0].mean()
    s = pairwise_distances(student.flatten(1))
    s = s / s[s > 0].mean()
    return F.smooth_l1_loss(s, t)


def _angles(e: Tensor) -> Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@LOSSES.register("rkd_angle")
def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss: Huber loss between the cosines of the angles formed by every triplet of embeddings.

    Park et al., "Relational Knowledge Distillation", CVPR 2019 (weight 50 in the paper). The cosine at i of the
    triplet (j, i, k) is <(e_j - e_i)/|.|, (e_k - e_i)/|.|>; degenerate pairs (j = i) give 0, as in the reference.

    Args:
        student: student embeddings.
        teacher: teacher embeddings.

    Returns:
        mean smooth-L1 over all B^3 cosines, a scalar.

    Shape:
        - student: (B, D_s); teacher: (B, D_t)
        - output: ()
    """
    with torch.no_grad():
        t = _angles(teacher.flatten(1))
    return F.smooth_l1_loss(_angles(student.flatten(1)), t)


def similarity_matrix(f: Tensor) -> Tensor:
    """Row-L2-normalised batch Gram matrix G = normalize(F F^T) of flattened features (Tung & Mori 2019).

    Shape:
        - f: (B, ...)
        - output: (B, B)
    """
    f = f.flatten(1)
    return F.normalize(f @ f.t(), p=2, dim=1)


@LOSSES.register("sp")
def similarity_preserving(student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
    """Similarity-preserving loss: sum over layer pairs of ||G_s - G_t||_F^2 / B^2.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (gamma = 3000 in the paper). Only
    batch relations are compared, so channel counts and spatial sizes may differ.

    Args:
        student_feats: student activations, (B, ...) each.
        teacher_feats: teacher activations at the paired layers, (B, ...) each.

    Returns:
        Scalar loss.

    Shape:
        - student_feats[i]: (B, ...); teacher_feats[i]: (B, ...), sizes may differ
        - output: ()
    """
    total = student_feats[0].new_zeros(())
    for s, t in zip(student_feats, teacher_feats):
        b = s.shape[0]
        total = total + (similarity_matrix(s) - similarity_matrix(t).detach()).pow(2).sum() / (b * b)
    return total


@LOSSES.register("fitnet")
def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between the regressed student guided layer and the teacher hint.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (their 1/2 ||u_h - r(v_g)||^2, here averaged
    over elements as in mdistiller, whose FitNet recipe weights it by 100).

    Args:
        regressed: the student's guided-layer output passed through the learned regressor.
        hint: the teacher's hint-layer output (no gradient).

    Returns:
        mean (regressed - hint)^2, a scalar.

    Shape:
        - regressed, hint: (B, ...) of the same shape
        - output: ()
    """
    return F.mse_loss(regressed, hint.detach())


__all__ = ["hint_loss", "pairwise_distances", "rkd_angle", "rkd_distance", "similarity_matrix",
           "similarity_preserving"]
