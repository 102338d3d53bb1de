"""Generator-side priors computed on the teacher's outputs (no student involved)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.losses._registry import LOSSES


@LOSSES.register("oh")
def one_hot(teacher_logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """Cross-entropy of the teacher on synthetic inputs: makes them confidently classified.

    Chen et al., "DAFL: Data-Free Learning of Student Networks", ICCV 2019 (argmax pseudo-labels);
    DeepInversion / CMI / Fast-DFKD pass sampled class-conditional `targets` instead.

    Args:
        teacher_logits: teacher logits.
        targets: class indices; None uses the teacher's own argmax.

    Returns:
        Mean cross-entropy, a scalar.

    Shape:
        - teacher_logits: (B, K); targets: (B,)
        - output: ()
    """
    if targets is None:
        targets = teacher_logits.argmax(dim=1)
    return F.cross_entropy(teacher_logits, targets)


@LOSSES.register("ie")
def information_entropy(teacher_logits: Tensor, log_base: float = 10.0) -> Tensor:
    """Negative entropy of the batch-averaged teacher prediction; minimising it balances the classes.

    Chen et al., "DAFL", ICCV 2019 (official code uses log10; zju-vipa's "balance" term uses e).

    Args:
        teacher_logits: teacher logits.
        log_base: logarithm base; 10 as in DAFL, `math.e` for nats. The minimum is -log_base(K).

    Returns:
        sum_c pbar_c log(pbar_c) / log(log_base) with pbar = mean_i softmax(t_i), a scalar.

    Shape:
        - teacher_logits: (B, K)
        - output: ()
    """
    # log pbar via logsumexp stays finite (and so does its gradient) when a class probability underflows.
    log_p_mean = torch.logsumexp(F.log_softmax(teacher_logits, dim=1), dim=0) - math.log(teacher_logits.shape[0])
    return (log_p_mean.exp() * log_p_mean).sum() / math.log(log_base)


@LOSSES.register("act")
def activation(features: Tensor) -> Tensor:
    """Negative mean absolute activation of the teacher's features; minimising it excites them.

    Chen et al., "DAFL", ICCV 2019 (penultimate features of the teacher).

    Args:
        features: teacher features, any shape.

    Returns:
        -mean |f|, a scalar.

    Shape:
        - features: (B, *)
        - output: ()
    """
    return -features.abs().mean()


@LOSSES.register("inst_entropy")
def instance_entropy(teacher_logits: Tensor) -> Tensor:
    """Mean per-sample entropy of the teacher's prediction (nats); minimising it sharpens each sample.

    Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation", CVPRW 2020.

    Args:
        teacher_logits: teacher logits.

    Returns:
        mean_i H(softmax(t_i)), a scalar.

    Shape:
        - teacher_logits: (B, K)
        - output: ()
    """
    log_p = F.log_softmax(teacher_logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()
