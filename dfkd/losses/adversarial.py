"""Generator-side adversarial terms: minimising them makes the student disagree with the teacher."""

from __future__ import annotations

from torch import Tensor

from dfkd.losses._registry import LOSSES
from dfkd.losses.kd import js_divergence, kl_div, l1_logits


@LOSSES.register("adv_l1")
def adv_l1(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Negative logit L1 distance.

    Fang et al., "Data-Free Adversarial Distillation" (DFAD), arXiv 1912.11006.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits.

    Returns:
        -mean |s - t|, a scalar.

    Shape:
        - student_logits, teacher_logits: (B, K)
        - output: ()
    """
    return -l1_logits(student_logits, teacher_logits)


@LOSSES.register("adv_kl")
def adv_kl(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """Negative KL(teacher || student), batch-mean, scaled by T^2 like `kl_div`.

    Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching" (ZSKT), NeurIPS 2019;
    zju-vipa DFQ re-implementation.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits.
        T: softmax temperature (1 in both references).

    Returns:
        -T^2 KL(softmax(t/T) || softmax(s/T)) / B, a scalar.

    Shape:
        - student_logits, teacher_logits: (B, K)
        - output: ()
    """
    return -kl_div(student_logits, teacher_logits, T=T)


@LOSSES.register("adv_masked_kl")
def adv_masked_kl(student_logits: Tensor, teacher_logits: Tensor, T: float = 1.0) -> Tensor:
    """Negative KL(teacher || student) on the samples where student and teacher agree on the class.

    Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation" (CMI), IJCAI 2021;
    also Fast-DFKD. Samples the student already gets wrong are masked out so the generator does not
    push them further into meaningless regions.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits.
        T: softmax temperature (1 in the references); the KL is scaled by T^2 like `kl_div`.

    Returns:
        -mean_i[ KL_i(t || s) * 1(argmax s_i == argmax t_i) ], the mean over ALL B samples, a scalar.

    Shape:
        - student_logits, teacher_logits: (B, K)
        - output: ()
    """
    per_sample = kl_div(student_logits, teacher_logits, T=T, reduction="none").sum(dim=1)
    agree = (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).to(per_sample.dtype)
    return -(per_sample * agree).mean()


@LOSSES.register("adv_js")
def adv_js(student_logits: Tensor, teacher_logits: Tensor, T: float = 3.0) -> Tensor:
    """Adaptive DeepInversion competition term: 1 - clamp(JS, 0, 1).

    Yin et al., "Dreaming to Distill" (ADI), CVPR 2020; NVlabs/DeepInversion. See `js_divergence`.

    Args:
        student_logits: student logits.
        teacher_logits: teacher logits.
        T: softmax temperature.

    Returns:
        1 - clamp(JS_T(s, t), 0, 1), a scalar in [0, 1].

    Shape:
        - student_logits, teacher_logits: (B, K)
        - output: ()
    """
    return 1.0 - js_divergence(student_logits, teacher_logits, T=T).clamp(0.0, 1.0)
