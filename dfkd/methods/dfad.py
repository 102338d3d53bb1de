"""DFAD: data-free adversarial distillation (Fang et al., arXiv 1912.11006)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfkd.generators import LossDict
from dfkd.losses import adv_l1, l1_logits
from dfkd.methods._gan import GANMethod
from dfkd.methods._recipes import teacher_kind
from dfkd.methods._registry import register_method


@register_method("dfad")
class DFAD(GANMethod):
    """DFAD: the student minimises, the generator maximises, the mean absolute logit gap |s(G(z)) - t(G(z))|.

    Fang et al., "Data-Free Adversarial Distillation", arXiv 1912.11006. Each round is 5 student steps on fresh
    samples, then 1 generator step (VainF/Data-Free-Adversarial-Distillation). Defaults are the paper's MNIST
    settings (`DFAD_mnist.py`: batch 512, student SGD 0.01 / momentum 0.9 / wd 1e-4, generator Adam 1e-3, nz 100,
    Tanh + BN output); CIFAR-like teachers (`dfkd.methods._recipes.input_kind`) get the CIFAR settings
    (`DFAD_cifar.py`: batch 256, SGD 0.1, wd 5e-4, nz 256, x0.1 at epochs 100 and 200 of 500); inputs of 64 px or
    more the 224 px Caltech-101 one (`DFAD_caltech101.py`: batch 64, student lr 0.05, generator 1e-3).

    CPU recipe (`-p recipe=cpu`; the default for MNIST-kind teachers of any cost, `Recipe.cpu_default`),
    measured on the demo teacher: batch 64, student Adam 2e-3, generator Adam 1e-2, generator width 16. The
    paper's settings need ~2000 generator steps (hours on a CPU); with them the student was still at 10 % after
    1.5 idle CPU-minutes, with the CPU recipe at 37 % after 2 single-thread minutes.
    The losses and the 5:1 schedule are unchanged. `-p recipe=paper` gives the paper's settings.

    `-p ta_verify=true` (off by default): TA-DFKD teacher verification (Shin & Choi, "Teacher as a Lenient Expert",
    AAAI 2024; `dfkd.methods._verify`): the student trains only on generated samples the teacher verifies as
    clean (a 2-component Gaussian mixture on its per-sample loss, clean above `-p ta_threshold=0.5`, the paper's),
    redrawn until a batch is full (at most `-p ta_max_draws=16` batches); the generator's loss sees its clean
    samples only.
    """

    paper: ClassVar[str] = "Fang et al. 2019, Data-Free Adversarial Distillation, arXiv:1912.11006"
    summary: ClassVar[str] = "adversarial generator maximises the teacher-student L1 logit gap"
    ignores: ClassVar[dict[str, str]] = {
        "T": "its student loss is the L1 distance between logits, which has no temperature"}
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "s_steps": 2}
    cpu: ClassVar[dict[str, Any]] = {"batch_size": 64, "s_optimizer": "adam", "lr_s": 2e-3, "lr_g": 1e-2}
    cpu_reason: ClassVar[str] = ("batch 64, student Adam 2e-3, generator 1e-2: the paper's settings need ~2000 "
                                 "generator steps (hours on a CPU); demo teacher, 2 minutes: 37 % against 10 %")
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 512, "lr_s": 0.01, "weight_decay": 1e-4, "lr_g": 1e-3, "nz": 100, "s_steps": 5, "g_steps": 1,
    }

    @classmethod
    def paper_params(cls, teacher: Any = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) in ("cifar", "imagenet"):
            p.update(batch_size=256, lr_s=0.1, weight_decay=5e-4, nz=256, schedule="multistep", milestones=[0.2, 0.4])
        if teacher_kind(teacher) == "imagenet":
            p.update(batch_size=64, lr_s=0.05)
        return p

    def student_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        loss = l1_logits(s_logits, t_logits)
        return {"loss": loss, "loss/l1": loss}

    def generator_loss(self, x: torch.Tensor) -> LossDict:
        adv = adv_l1(self.student(x), self.teacher(x))
        return {"loss": adv, "loss/adv": adv}

    def round(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        for _ in self.student_steps(self.student_steps_per_round):
            logs.update(self.fresh_student_step())
        logs.update(self.generator_step())
        return logs
