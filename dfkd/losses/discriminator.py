"""GAN losses of a discriminator that tells teacher (real) from student (fake) outputs, and of its student."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dfkd.losses._registry import LOSSES


@LOSSES.register("gan_d")
def discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Discriminator loss: binary cross-entropy with teacher outputs as real (1) and student outputs as fake (0).

    Goodfellow et al., "Generative Adversarial Nets", NeurIPS 2014; used on logits by Xu et al., "Training Shallow
    and Thin Networks for Acceleration via Knowledge Distillation with Conditional Adversarial Networks", ICLRW
    2018, and on features by Belagiannis et al., "Adversarial Network Compression", ECCVW 2018.

    Args:
        real_scores: discriminator logits on teacher outputs.
        fake_scores: discriminator logits on student outputs.

    Returns:
        mean softplus(-real) + mean softplus(fake), a scalar.

    Shape:
        - real_scores: (B,) or (B, 1); fake_scores: the same
        - output: ()
    """
    return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()


@LOSSES.register("gan_g")
def generator_loss(fake_scores: Tensor) -> Tensor:
    """Non-saturating generator ("fool the discriminator") loss of the student: -log D(student outputs).

    Goodfellow et al., NeurIPS 2014, section 3 (the non-saturating form).

    Args:
        fake_scores: discriminator logits on student outputs.

    Returns:
        mean softplus(-fake), a scalar.

    Shape:
        - fake_scores: (B,) or (B, 1)
        - output: ()
    """
    return F.softplus(-fake_scores).mean()


__all__ = ["discriminator_loss", "generator_loss"]
