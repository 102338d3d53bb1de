"""ZSKT: zero-shot knowledge transfer via adversarial belief matching (Micaelli & Storkey, NeurIPS 2019)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dfkd.generators import LossDict
from dfkd.hooks import FeatureTaps
from dfkd.losses import adv_kl, attention_transfer, kl_div, matching_stages
from dfkd.methods._gan import GANMethod
from dfkd.methods._recipes import cap_batches, teacher_kind
from dfkd.methods._registry import register_method
from dfkd.methods.base import step_logs
from dfkd.precision import backward, step


@register_method("zskt")
class ZSKT(GANMethod):
    """ZSKT: the generator maximises KL(t||s); the student minimises KL(t||s) + beta * attention transfer.

    Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS 2019. Each round
    draws one z, takes 1 generator step on it, then 10 student steps on the *same* z (the batch and the teacher's
    logits and attention maps are computed once and reused). Both nets: Adam (student 2e-3 without weight decay,
    generator 1e-3), cosine schedules, gradient norm clipped at 5; batch 128; nz 100; generator width 64, output
    BN (affine, no Tanh); beta 250 when teacher and student declare the same number of stages
    (polo5/ZeroShotKnowledgeTransfer `main.py`, `solver.py`; the paper's CIFAR-10/SVHN setting, which every
    teacher gets: the paper has no MNIST one). It has no ImageNet-size setting either: inputs of 64 px or more
    get batch 64 (`LARGE_BATCH`). The KL is the true batch-mean KL; `-p kl_reduction=mean` reproduces the
    reference code's element-wise mean.
    CPU recipe (`-p recipe=cpu`; the default for MNIST-kind teachers of any cost): generator width 16.

    `-p ta_verify=true` (off by default): TA-DFKD teacher verification (Shin & Choi, "Teacher as a Lenient Expert",
    AAAI 2024; `dfkd.methods._verify`): the student trains only on generated samples the teacher verifies as
    clean (a 2-component Gaussian mixture on its per-sample loss, clean above `-p ta_threshold=0.5`, the paper's),
    redrawn until a batch is full (at most `-p ta_max_draws=16` batches); the generator's loss sees its clean
    samples only. The round's batch (10 student steps) is the one refilled.
    """

    paper: ClassVar[str] = "Micaelli & Storkey 2019, Zero-shot Knowledge Transfer via Adversarial Belief Matching"
    summary: ClassVar[str] = "adversarial belief matching (generator maximises KL) plus attention transfer"
    ignores: ClassVar[dict[str, str]] = {"T": "its KL to the teacher is at temperature 1 (the paper's)"}
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "s_steps": 2}
    deviations: ClassVar[tuple[str, ...]] = (
        "KL(t||s) is the batch-mean KL; polo5's F.kl_div divides by batch x classes (-p kl_reduction=mean)",)
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 128, "s_optimizer": "adam", "lr_s": 2e-3, "weight_decay": 0.0, "lr_g": 1e-3, "nz": 100,
        "head": "bn", "schedule": "cosine", "grad_clip": 5.0, "g_steps": 1, "s_steps": 10, "at_beta": 250.0,
        "kl_reduction": "batchmean",
    }

    @classmethod
    def paper_params(cls, teacher: Any = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) == "imagenet":
            cap_batches(p)
        return p

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pairs = matching_stages(list(getattr(self.student, "stages", ())), self.teacher.stage_paths())
        self.at_pairs = pairs if self.p["at_beta"] else []
        self.s_taps = FeatureTaps(self.student, [s for s, _ in self.at_pairs], inputs=False, outputs=True)
        self.t_taps = FeatureTaps(self.teacher.module, [t for _, t in self.at_pairs], inputs=False, outputs=True)
        self.s_taps.__enter__()
        self.t_taps.__enter__()

    def _kl(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.p["kl_reduction"] == "mean":
            return F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="mean")
        return kl_div(s, t, T=1.0)

    def generator_loss(self, x: torch.Tensor) -> LossDict:
        adv = adv_kl(self.student(x), self.teacher(x)) if self.p["kl_reduction"] != "mean" else \
            -self._kl(self.student(x), self.teacher(x))
        return {"loss": adv, "loss/adv": adv}

    def round(self) -> dict[str, float]:
        n = self.student_steps_per_round
        z, _ = self.synth.noise(self.p["batch_size"])
        x, g_losses = self.synth.step_on(z, None)
        self.last_images = x = self.synth.generate(z)
        logs = step_logs("gen", g_losses)
        if self.p["ta_verify"]:  # the round's batch keeps its clean samples, topped up from fresh ones
            x = self.verified_from(x)
            logs["student/ta_clean"] = self.ta_clean
        with torch.no_grad(), self.objectives.capture_teacher(x):
            t_logits = self.teacher(x)
        t_feats = [self.t_taps.outputs[t] for _, t in self.at_pairs]
        t0 = time.perf_counter()
        for _ in self.student_steps(n):
            s_logits = self.student_forward(x)
            kd = self._kl(s_logits, t_logits)
            losses = {"loss": kd, "loss/kd": kd}
            if self.at_pairs:
                at = attention_transfer([self.s_taps.outputs[s] for s, _ in self.at_pairs], t_feats)
                losses.update({"loss": kd + self.p["at_beta"] * at, "loss/at": at})
            losses = self.with_objectives(losses, x, s_logits, t_logits)
            self.opt_s.zero_grad(set_to_none=True)
            backward(losses["loss"])
            self.clip_student(losses, self.p["grad_clip"])  # the paper's clip (5), or -p clip_s if smaller
            step(self.opt_s)
            losses.update(self.objectives.extra_step(x, s_logits, t_logits))
            logs.update(step_logs("student", losses))
        self.student_seconds += time.perf_counter() - t0
        return logs

    def close(self) -> None:
        self.s_taps.remove()
        self.t_taps.remove()
        super().close()
