"""ZeroQ-style synthesis: inputs matching the teacher's BN statistics per sample, no labels (Cai et al., CVPR 2020)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfkd.generators import LossDict
from dfkd.losses import bn_zeroq, input_prior_zeroq, one_hot
from dfkd.methods._inversion import InversionMethod
from dfkd.methods._recipes import cap_batches, teacher_kind
from dfkd.methods._registry import register_method
from dfkd.teacher import Teacher

#: The CPU recipe: the loss of the demo LeNet-5-BN teacher is flat after ~100 iterations; measured with student
#: wd 5e-4 and no augmentation of pool samples.
CPU = {"iterations": 100, "lr_s": 0.01, "weight_decay": 5e-4, "kd_augment": "none"}


@register_method("zeroq")
class ZeroQ(InversionMethod):
    """ZeroQ "distilled data": each sample's conv-output statistics pulled to the teacher's BN statistics, unlabelled.

    Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020. L(x) = bn*sum_l(||rm - mu_i||^2 +
    ||sqrt(rv) - sigma_i||^2)/B + input*(||mu_i(x)||^2 + ||1 - sigma_i(x)||^2)/B on per-sample statistics, no class
    term. Defaults are amirgholami/ZeroQ's (`classification/distill_data.py`, `run.sh`), which it uses for its
    CIFAR-10 and its ImageNet models alike: batch 64, 500 Adam iterations at lr 0.5 with default
    betas, ReduceLROnPlateau (patience 100, min lr 1e-4) on the loss, start (randint[0,255) - 127.5)/5418.75, no
    jitter, no clipping. ZeroQ calibrates quantisation and has no KD loop; here the student distils from a pool of
    these batches exactly as DeepInversion's does (T 3, a new batch every 50 KD steps, KD minibatch 256; 64, the
    synthesis batch, from 64 px up, as DeepInversion's ImageNet setting; student SGD 0.1, wd 1e-4, cosine, crop +
    flip of pool samples, zju-vipa's). CPU recipe (`-p recipe=cpu`; the default for small MNIST-kind teachers,
    `_recipes.cpu_teacher`): 100 iterations (the loss is flat by then) and student SGD lr 0.01 (0.1
    diverges on LeNet-5-half), so a round takes seconds on a CPU, with the wd 5e-4 and unaugmented pool samples it
    was measured with. `-p recipe=paper` gives the paper's settings.

    ZeroQ's data are for calibration, not for teaching classes: on the demo teacher the label-free batches are
    called "8" 86 % of the time and the student learns to answer "8" (9.7 % MNIST test top-1 after 3 minutes).
    `-p oh=1` adds DeepInversion's cross-entropy on sampled classes (not in the paper): the classes balance and the
    student reached 35.4 % in 3 single-thread minutes. For KD, deepinversion is the method to use.
    """

    paper: ClassVar[str] = "Cai et al. 2020, ZeroQ: A Novel Zero Shot Quantization Framework, CVPR"
    summary: ClassVar[str] = "unlabelled inputs matching per-sample BN statistics (calibration data); KD from a pool"
    cpu: ClassVar[dict[str, Any]] = CPU
    cpu_reason: ClassVar[str] = "100 iterations a batch (the demo teacher's loss is flat by then); student lr 0.01"
    deviations: ClassVar[tuple[str, ...]] = (
        "ZeroQ has no KD loop: the student distils from a pool of its batches as DeepInversion's does",)
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256, "synth_batch_size": 64, "iterations": 500, "lr_inv": 0.5, "betas_inv": [0.9, 0.999],
        "inv_schedule": "plateau", "plateau_patience": 100, "plateau_min_lr": 1e-4, "init": "zeroq", "jitter": 0,
        "clip": False, "warmup": 0.0, "bn": 1.0, "input": 1.0, "oh": 0.0,
    }

    @classmethod
    def paper_params(cls, teacher: Teacher | None = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) == "imagenet":
            cap_batches(p)
        return p

    def inversion_loss(self, x: torch.Tensor, y: torch.Tensor) -> LossDict:
        t_logits = self.teacher(x)
        layers = self.bn_layers()
        bn = bn_zeroq(layers) if layers else t_logits.new_zeros(())
        prior = input_prior_zeroq(x)
        losses = {"loss": self.p["bn"] * bn + self.p["input"] * prior, "loss/bn": bn, "loss/input": prior}
        if self.p["oh"]:  # ZeroQ has no label term; `-p oh=W` adds cross-entropy on the sampled classes
            oh = one_hot(t_logits, y)
            losses["loss"] = losses["loss"] + self.p["oh"] * oh
            losses["loss/oh"] = oh
        return losses
