"""DFQ: data-free adversarial KD with BN-statistics priors (Choi et al., CVPRW 2020; zju-vipa re-implementation)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from dfkd.bnstats import BN_DEFAULTS
from dfkd.generators import LossDict
from dfkd.losses import adv_kl, bn_deepinversion, bn_dfq, information_entropy, one_hot
from dfkd.methods._gan import GANMethod
from dfkd.methods._recipes import cap_batches, teacher_kind
from dfkd.methods._registry import register_method
from dfkd.teacher import Teacher


@register_method("dfq")
class DFQ(GANMethod):
    """DFQ: a generator matching the teacher's BN statistics, confident and class-balanced, and adversarial.

    Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation", CVPRW 2020. L_G =
    bn*R_BN + oh*CE(t, argmax t) + balance*sum(pbar ln pbar) + adv*(-KL(t||s)); 1 generator step then 10 student
    steps on fresh samples. Defaults follow the verified zju-vipa CIFAR recipe (Fast-Datafree `scripts/dfq_cifar.sh`
    and `datafree_kd.py`: bn 1 in DeepInversion form, oh 1, balance 20, adv 1, generator Adam (0.5, 0.999) 1e-3 at
    a constant rate, nz 256, width 64, Sigmoid generator, student SGD 0.1, wd 1e-4, cosine), for every input kind;
    there is no ImageNet-size recipe to follow, so inputs of 64 px or more get batch 64 (`LARGE_BATCH`). As in
    the reference synthesizer, the student is in eval mode during generator steps (its BN running statistics move
    on student batches only) and the run's schedule decays only the student.
    `-p bn_form=gaussian_kl` uses the paper's per-channel Gaussian KL instead. The adversarial term compares the
    teacher with the student being trained (the reference engine passed the teacher twice) and `-p T=...` sets the
    student's KD temperature (the reference engine ignored it).

    CPU recipe (`-p recipe=cpu`; the default for MNIST-kind teachers of any cost, `Recipe.cpu_default`):
    batch 64, student Adam 2e-3, generator width 16 (SGD 0.1 drove the BN-free LeNet-5-half to a constant output;
    on the demo teacher, 2 single-thread minutes: SGD 0.01 at batch 256 18 %, Adam at batch 128 47 %, at batch
    64 74 %). It was measured with wd 5e-4, which it keeps. `-p recipe=paper` gives the paper's settings.

    `-p ta_verify=true` (off by default): TA-DFKD teacher verification (Shin & Choi, "Teacher as a Lenient Expert",
    AAAI 2024; `dfkd.methods._verify`): the student trains only on generated samples the teacher verifies as
    clean (a 2-component Gaussian mixture on its per-sample loss, clean above `-p ta_threshold=0.5`, the paper's),
    redrawn until a batch is full (at most `-p ta_max_draws=16` batches); the generator's loss sees its clean
    samples only.
    """

    paper: ClassVar[str] = "Choi et al. 2020, Data-Free Network Quantization With Adversarial KD, CVPRW"
    summary: ClassVar[str] = "adversarial generator with BN-statistics, one-hot and class-balance priors"
    uses_bn: ClassVar[bool] = True
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "s_steps": 2}
    own_balance: ClassVar[bool] = True
    decay_generator: ClassVar[bool] = False
    deviations: ClassVar[tuple[str, ...]] = (
        "the adversarial term uses the student being trained (zju-vipa's engine passed the teacher twice)",
        "-p T sets the student's KD temperature (zju-vipa's engine ignored it)")
    student_eval_in_g: ClassVar[bool] = True
    cpu: ClassVar[dict[str, Any]] = {"batch_size": 64, "s_optimizer": "adam", "lr_s": 2e-3, "weight_decay": 5e-4}
    cpu_reason: ClassVar[str] = ("batch 64, student Adam 2e-3: SGD 0.1 drove a BN-free LeNet-5-half to a constant "
                                 "output; demo teacher, 2 minutes: 74 % against 18 % with SGD")
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256, "lr_s": 0.1, "weight_decay": 1e-4, "schedule": "cosine", "lr_g": 1e-3,
        "betas_g": [0.5, 0.999], "nz": 256, "head": "sigmoid", "g_steps": 1, "s_steps": 10,
        "adv": 1.0, "bn": 1.0, "oh": 1.0, "balance": 20.0, "bn_form": "di", **BN_DEFAULTS,
    }

    @classmethod
    def paper_params(cls, teacher: Teacher | None = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) == "imagenet":
            cap_batches(p)
        return p

    def generator_loss(self, x: torch.Tensor) -> LossDict:
        p = self.p
        t_logits = self.teacher(x)
        layers = self.bn.layers() if self.bn is not None else []
        bn_fn = bn_dfq if p["bn_form"] == "gaussian_kl" else bn_deepinversion
        bn = bn_fn(layers) if layers else t_logits.new_zeros(())
        oh = one_hot(t_logits)
        balance = information_entropy(t_logits, log_base=math.e)
        adv = adv_kl(self.student(x), t_logits)
        total = p["bn"] * bn + p["oh"] * oh + p["balance"] * balance + p["adv"] * adv
        return {"loss": total, "loss/bn": bn, "loss/oh": oh, "loss/balance": balance, "loss/adv": adv}
