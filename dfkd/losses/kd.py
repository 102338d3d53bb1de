"""Student-side distillation criteria on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.losses._registry import LOSSES
from dfkd.precision import fp32


@LOSSES.register("kl")
def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    T: float = 1.0,
    scale_T2: bool = True,
    reduction: str = "batchmean",
) -> Tensor:
    """Temperature-scaled KL(teacher || student) on logits.

    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015; zju-vipa `KLDiv`.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits (not detached here; detach them if the teacher must not learn).
        T: softmax temperature.
        scale_T2: multiply by T^2 so gradient magnitudes do not shrink with T (Hinton et al.).
        reduction: as `F.kl_div`: "batchmean" (sum / B), "sum", "mean" (sum / (B*K), ZSKT's old
            PyTorch default) or "none" (per element, shape (B, K)).

    Returns:
        The divergence, a scalar unless `reduction="none"`.

    Shape:
        - student_logits, teacher_logits: (B, K)
        - output: () or (B, K)
    """
    student_logits, teacher_logits = fp32(student_logits), fp32(teacher_logits)  # fp32 under autocast
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    # log_target keeps tiny teacher probabilities finite instead of log(0).
    if reduction == "mean":
        # PyTorch warns that its elementwise "mean" will become "batchmean"; pin ZSKT's meaning here.
        loss = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / log_p_s.numel()
    else:
        loss = F.kl_div(log_p_s, log_p_t, reduction=reduction, log_target=True)
    return loss * (T * T) if scale_T2 else loss


@LOSSES.register("l1")
def l1_logits(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean absolute error between raw logits.

    Fang et al., "Data-Free Adversarial Distillation" (DFAD), arXiv 1912.11006.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits.

    Returns:
        mean |s - t| over all elements.

    Shape:
        - student_logits, teacher_logits: (B, K)
        - output: ()
    """
    return F.l1_loss(fp32(student_logits), fp32(teacher_logits))


@LOSSES.register("js")
def js_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    T: float = 3.0,
    clamp: tuple[float, float] = (0.01, 0.99),
) -> Tensor:
    """Clamped Jensen-Shannon divergence between softened student and teacher predictions.

    Yin et al., "Dreaming to Distill" (DeepInversion / ADI), CVPR 2020; NVlabs/DeepInversion.

    Follows the reference code exactly: M = (P + Q) / 2 is formed before clamping, then P, Q, M are
    each clamped to `clamp`, and JS = KL(M || P) / 2 + KL(M || Q) / 2 (the code's argument order of
    `KLDivLoss(log P, M)`; the textbook JS uses KL(P || M)), batch-mean, natural log.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits.
        T: softmax temperature (3 in the reference).
        clamp: (low, high) bounds applied to every probability so the logs stay finite.

    Returns:
        The divergence, a scalar.

    Shape:
        - student_logits, teacher_logits: (B, K)
        - output: ()
    """
    p = F.softmax(fp32(student_logits) / T, dim=1)
    q = F.softmax(fp32(teacher_logits) / T, dim=1)
    lo, hi = clamp
    m = (0.5 * (p + q)).clamp(lo, hi)
    p, q = p.clamp(lo, hi), q.clamp(lo, hi)
    kl_m_p = F.kl_div(torch.log(p), m, reduction="batchmean")
    kl_m_q = F.kl_div(torch.log(q), m, reduction="batchmean")
    return 0.5 * kl_m_p + 0.5 * kl_m_q


@LOSSES.register("soft_ce")
def soft_cross_entropy(
    student_logits: Tensor,
    target_probs: Tensor,
    T: float = 1.0,
    scale_T2: bool = True,
) -> Tensor:
    """Cross-entropy of the softened student against soft target probabilities, batch-mean.

    Nayak et al., "Zero-Shot Knowledge Distillation in Deep Networks" (ZSKD), ICML 2019.

    Args:
        student_logits: student logits.
        target_probs: target distribution per sample (rows sum to 1), e.g. teacher softmax at T.
        T: student softmax temperature.
        scale_T2: multiply by T^2 as in Hinton-style KD.

    Returns:
        T^2 * mean_i(-sum_c target_ic * log softmax(s_i / T)_c), a scalar.

    Shape:
        - student_logits, target_probs: (B, K)
        - output: ()
    """
    log_p_s = F.log_softmax(fp32(student_logits) / T, dim=1)
    loss = -(fp32(target_probs) * log_p_s).sum(dim=1).mean()
    return loss * (T * T) if scale_T2 else loss
