"""DAFL: data-free learning of student networks (Chen et al., ICCV 2019; huawei-noah DAFL)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from dfkd.generators import LossDict
from dfkd.losses import activation, information_entropy, one_hot
from dfkd.methods._gan import GANMethod
from dfkd.methods._recipes import cap_batches, teacher_kind
from dfkd.methods._registry import register_method
from dfkd.methods.base import step_logs


@register_method("dafl")
class DAFL(GANMethod):
    """DAFL: the generator makes images the teacher finds confident, class-balanced and strongly activating.

    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019. L_G = oh*CE(t, argmax t) +
    ie*sum(pbar log10 pbar) + a*(-mean|f_T|); the student learns KL(t||s) at T=1 on the same (detached) batch, one
    joint G+S iteration per round. Defaults are the paper's MNIST ones (huawei-noah DAFL `DAFL-train.py`: batch
    512, G Adam 0.2, S Adam 2e-3, oh 1 / ie 5 / a 0.1, nz 100, BN eps 0.8, log10 entropy); CIFAR-like teachers
    (`dfkd.methods._recipes.input_kind`) get the README's CIFAR-10 ones (batch 1024, nz 1000, G Adam 0.02, S SGD
    0.1 wd 5e-4 x0.1 at epochs 800/1600 of 2000, oh 0.05 / ie 5 / a 0.01). The paper has no ImageNet-size setting:
    inputs of 64 px or more get the CIFAR-10 one at batch 64 (`LARGE_BATCH`; 1024 images of 224 px would need
    tens of GB). The run's learning-rate schedule decays only the student (the reference's `adjust_learning_rate`
    touches `optimizer_S` alone); the generator's rate stays constant.

    CPU recipe (`-p recipe=cpu`; the default for MNIST-kind teachers of any cost, `Recipe.cpu_default`):
    batch 64 and generator width 16: 8x the iterations in the same time (on the demo teacher, 2 single-thread
    minutes: 50 % at batch 64, 35 % at 128; batch 32 was no better than 64). `-p recipe=paper` gives the paper's.

    `-p ta_verify=true` (off by default): TA-DFKD teacher verification (Shin & Choi, "Teacher as a Lenient Expert",
    AAAI 2024; `dfkd.methods._verify`): the student trains only on generated samples the teacher verifies as
    clean (a 2-component Gaussian mixture on its per-sample loss, clean above `-p ta_threshold=0.5`, the paper's),
    redrawn until a batch is full (at most `-p ta_max_draws=16` batches); the generator's loss sees its clean
    samples only. DAFL's one joint batch is not refilled: the student steps on its clean samples.
    """

    paper: ClassVar[str] = "Chen et al. 2019, Data-Free Learning of Student Networks, ICCV"
    summary: ClassVar[str] = "generator trained for confident, balanced, high-activation teacher outputs"
    ignores: ClassVar[dict[str, str]] = {"s_steps": "each round is one joint generator and student step"}
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8}
    decay_generator: ClassVar[bool] = False
    cpu: ClassVar[dict[str, Any]] = {"batch_size": 64}
    cpu_reason: ClassVar[str] = ("batch 64: 8x the iterations in the same CPU time (demo LeNet-5 teacher, 2 minutes: "
                                 "50 % at batch 64, 35 % at 128)")
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 512, "lr_g": 0.2, "s_optimizer": "adam", "lr_s": 2e-3, "weight_decay": 0.0, "nz": 100,
        "bn_eps": 0.8, "oh": 1.0, "ie": 5.0, "a": 0.1, "ie_log_base": 10.0, "T": 1.0,
    }

    @classmethod
    def paper_params(cls, teacher: Any = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) in ("cifar", "imagenet"):
            p.update(batch_size=1024, nz=1000, lr_g=0.02, s_optimizer="sgd", lr_s=0.1, weight_decay=5e-4,
                     schedule="multistep", milestones=[0.4, 0.8], oh=0.05, ie=5.0, a=0.01)
        if teacher_kind(teacher) == "imagenet":
            cap_batches(p)
        return p

    def generator_loss(self, x: torch.Tensor) -> LossDict:
        p = self.p
        t_logits, feats = self.teacher.forward_with_features(x)
        self._cache["t_logits"] = t_logits.detach()
        oh = one_hot(t_logits)
        base = math.e if p["ie_log_base"] in ("e", None) else float(p["ie_log_base"])
        ie = information_entropy(t_logits, log_base=base)
        act = activation(feats)
        return {"loss": p["oh"] * oh + p["ie"] * ie + p["a"] * act, "loss/oh": oh, "loss/ie": ie, "loss/act": act}

    @property
    def student_steps_per_round(self) -> int:
        """One joint generator and student iteration a round, whatever `s_steps` says."""
        return 1

    def round(self) -> dict[str, float]:
        logs = self.generator_step()
        # The same batch, detached, with the teacher logits already computed on it (one joint iteration).
        x = self.last_images[self.ta_mask] if self.p["ta_verify"] else self.last_images  # what the loss saw
        student = self.student_step(x, self._cache.pop("t_logits"))
        if self.p["ta_verify"]:
            student["loss/ta_clean"] = float(self.ta_mask.float().mean())
        logs.update(step_logs("student", student))
        return logs
