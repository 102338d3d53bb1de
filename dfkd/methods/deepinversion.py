"""DeepInversion: inputs optimised to match the teacher's BN statistics and class scores (Yin et al., CVPR 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfkd.generators import LossDict
from dfkd.losses import bn_deepinversion, l2_prior, one_hot, tv_l1, tv_l2
from dfkd.methods._inversion import InversionMethod
from dfkd.methods._recipes import teacher_kind
from dfkd.methods._registry import register_method
from dfkd.teacher import Teacher

#: NVlabs `imagenet_inversion.py` setting 0: 2k iterations at half resolution then 1k at full, Adam (0.5, 0.9),
#: clipping, linear warm-up then cosine per stage, first-BN multiplier 10.
IMAGENET = {"batch_size": 64, "iterations": 3000, "lowres": 2 / 3, "lr_inv": 0.25, "jitter": 30, "flip_p": 0.5,
            "bn": 0.01, "tv_l2": 1e-4, "l2": 1e-5, "first_bn": 10.0, "betas_inv": [0.5, 0.9], "clip": True,
            "inv_schedule": "cosine", "warmup": 0.05}
#: The CPU recipe, as measured: short batches at a higher rate, so a round takes seconds, not minutes, and the
#: priors that make a LeNet's inversions look like digits (first-BN multiplier 1, stronger TV-L2, jitter 4, half
#: the iterations coarse), on the settings it was measured with (Adam (0.5, 0.9), clipping, warm-up + cosine,
#: student wd 5e-4, no augmentation of pool samples).
CPU = {"batch_size": 128, "synth_batch_size": 256, "iterations": 100, "lr_inv": 0.5, "lr_s": 0.01,
       "first_bn": 1.0, "tv_l2": 3e-2, "jitter": 4, "lowres": 0.5, "betas_inv": [0.5, 0.9], "clip": True,
       "inv_schedule": "cosine", "warmup": 0.05, "weight_decay": 5e-4, "kd_augment": "none", "clip_unnormalised": False}


@register_method("deepinversion")
class DeepInversion(InversionMethod):
    """DeepInversion: a batch of pixels optimised so the teacher's BN statistics match and it scores sampled classes.

    Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020. L(x) =
    oh*CE(t(jit(x)), y) + bn*sum_l w_l(||var_l - rv_l|| + ||mu_l - rm_l||) + tv_l1*TV1 + tv_l2*TV2 + l2*||x||,
    w_0 = first_bn; the student distils at T=3 from a pool that gains one batch every `s_steps` KD steps.

    Defaults are the paper's CIFAR-10 settings (NVlabs/DeepInversion `cifar10/deepinversion_cifar10.py`, README
    "paper parameters"), for MNIST- and CIFAR-kind teachers alike: batch 256, 2000 Adam iterations (default betas)
    at a constant lr 0.05, bn 10 with no first-BN multiplier, TV-L2 2.5e-5, l2 0, jitter 2, no flip, no clipping.
    The KD side (T 3, a new batch every 50 student steps, a pool of up to 256k images) is the maintainers'
    account in NVlabs/DeepInversion#6/#9; the student side (SGD 0.1, wd 1e-4, cosine, crop + flip of pool
    samples) is zju-vipa's (`datafree_kd.py`), the paper gives none. Inputs 64 px or larger get the ImageNet
    setting 0 (NVlabs `imagenet_inversion.py --setting_id 0`: batch 64, 3000 iterations of which 2/3 on the
    2x-pooled view, Adam (0.5, 0.9) at lr 0.25 with 100-iteration warm-up and cosine, clipping, jitter 30, flip,
    bn 0.01, first-BN multiplier 10, TV-L2 1e-4, l2 1e-5).

    CPU recipe (`-p recipe=cpu`; the default for small MNIST-kind teachers, `_recipes.cpu_teacher`):
    batches of 256 optimised for 100 iterations at lr 0.5, the first half through the 2x-pooled view (pooled, then
    upsampled back: a LeNet takes only its own input size), KD minibatches of 128 and student SGD lr 0.01 (DFAD's
    MNIST value; 0.1 diverges on LeNet-5-half, 10 % even on real images); and priors for a LeNet: first-BN
    multiplier 1, TV-L2 3e-2, jitter 4; with the settings it was measured with (Adam (0.5, 0.9), clipping,
    5 % warm-up + cosine, student wd 5e-4, no augmentation of pool samples). With the CIFAR priors the demo
    teacher's inversions were stroke fragments; with these, 0s, 1s, 2s and 3s are recognisable in the TensorBoard
    grid, and the student learns faster (3 single-thread CPU-minutes: 91.6 % against 89.8 % with the CIFAR priors
    and 50 iterations). `-p recipe=paper` gives the paper's settings.
    """

    paper: ClassVar[str] = "Yin et al. 2020, Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion, CVPR"
    summary: ClassVar[str] = "input pixels optimised to match teacher BN statistics and sampled classes; KD from a pool"
    cpu: ClassVar[dict[str, Any]] = CPU
    deviations: ClassVar[tuple[str, ...]] = (
        "ImageNet setting: the warm-up is 5 % of each stage (100 then 50 iterations; NVlabs: 100 in each)",)
    cpu_reason: ClassVar[str] = ("100 iterations a batch and LeNet priors: demo teacher, 3 CPU-minutes, 91.6 % "
                                 "against 89.8 % with the CIFAR priors; a BN-free student unclipped (its lr 0.01 "
                                 "does not kill it; clipped, deepinversion and adi ended 2.8-6.2 points lower on a "
                                 "Fashion-MNIST LeNet-5, two seeds each)")
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256, "iterations": 2000, "lr_inv": 0.05, "betas_inv": [0.9, 0.999], "inv_schedule": "constant",
        "warmup": 0.0, "clip": False, "bn": 10.0, "first_bn": 1.0, "oh": 1.0, "tv_l1": 0.0, "tv_l2": 2.5e-5,
        "l2": 0.0, "jitter": 2, "flip_p": 0.0,
    }

    @classmethod
    def paper_params(cls, teacher: Teacher | None = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) == "imagenet":
            p.update(IMAGENET)
        return p

    def inversion_loss(self, x: torch.Tensor, y: torch.Tensor) -> LossDict:
        return self.inversion_terms(x, y, self.teacher(x))

    def inversion_terms(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        """The DeepInversion terms on `x` given the teacher's logits on it (ADI adds its own)."""
        p = self.p
        layers = self.bn_layers()
        bn = bn_deepinversion(layers, p["first_bn"]) if layers else t_logits.new_zeros(())
        oh = one_hot(t_logits, y)
        t1, t2, l2 = tv_l1(x), tv_l2(x), l2_prior(x)
        total = p["oh"] * oh + p["bn"] * bn + p["tv_l1"] * t1 + p["tv_l2"] * t2 + p["l2"] * l2
        return {"loss": total, "loss/bn": bn, "loss/oh": oh, "loss/tv_l1": t1, "loss/tv_l2": t2, "loss/l2": l2}
