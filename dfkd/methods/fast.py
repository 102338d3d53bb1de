"""Fast-DFKD: a meta-learned generator makes each batch in a few steps (Fang et al., AAAI 2022; zju-vipa)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfkd.generators import LossDict
from dfkd.generators.meta import REPTILE_ALPHA, MetaSynthesizer
from dfkd.losses import adv_masked_kl, bn_momentum, one_hot, update_bn_ema
from dfkd.methods._latent import LatentMethod
from dfkd.methods._recipes import teacher_kind
from dfkd.methods._registry import register_method
from dfkd.methods.base import Needs
from dfkd.teacher import Teacher

#: Fast-DFKD's ImageNet setting (zju-vipa/Fast-Datafree `datafree_kd_imagenet.py` logs: ResNet-50 teacher).
IMAGENET: dict[str, Any] = {"batch_size": 100, "synth_batch_size": 100, "g_steps": 50, "adv": 0.01, "bn": 0.1,
                            "oh": 0.1, "T": 5.0, "lr_s": 0.01, "lr_g": 2e-4, "lr_z": 0.01, "lr_meta": 1e-4,
                            "is_maml": 0, "s_steps": 100}


@register_method("fast")
class Fast(LatentMethod):
    """Fast-DFKD: meta-learn a generator initialisation so that g_steps inner steps make a new batch.

    Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022. Per round the meta generator is
    cloned; the clone and learnable z minimise bn*R_BN-momentum + oh*CE(t(aug), y) + adv*masked-KL(s, t) (adv after
    the `warmup` fraction of the run) for g_steps inner Adam (0.5, 0.999) steps (lr_g, lr_z); the meta generator
    then takes one Adam step (lr_g * g_steps) on the summed inner gradients (first-order MAML, `is_maml=1`) or on
    reptile_alpha * (theta_meta - theta_fast) (Reptile, `is_maml=0`; alpha defaults to the reference's hard-coded
    67); the BN EMA (m = bn_mmt) is updated after each round; the best batch goes to the pool; s_steps (kd_steps)
    student steps with KL at T=20 (zju-vipa/Fast-Datafree `datafree/synthesis/fast_meta.py`). Defaults are Fast-5
    for WRN pairs on CIFAR (`scripts/fast_cifar.sh`): adv 1.1, oh 0.4, bn 10, g_steps 5, lr_z 0.01, lr_g 3e-3,
    bn_mmt 0.9, batch 256, 400 KD steps, student SGD 0.2 wd 1e-4 cosine, warmup 20/220 of the run, reset_l0 at
    (120 + 20)/220. Inputs of 64 px or more get the ImageNet setting (`datafree_kd_imagenet.py`,
    `fast_meta_imagenet.py`): batch 100, g_steps 50, adv 0.01, bn 0.1, oh 0.1, T 5, student lr 0.01, lr_g 2e-4,
    lr_z 0.01, meta lr 1e-4, Reptile, 100 KD steps per batch (not its meta-learned z, its generator re-initialised
    every 50 epochs, nor its pre-synthesised pool). The meta learning rate `lr_meta` is lr_g * g_steps (the
    reference's rule) unless set. CPU recipe (`-p recipe=cpu`; the default for MNIST-kind teachers of any cost,
    `Recipe.cpu_default`): synthesis batch 64, s_steps 50, batch 128, keeping g_steps 5, generator
    width 16, and student lr 0.05 (at T=20 the reference's 0.2 kills a BN-free LeNet-5-half: constant output, 10 %
    on MNIST; 5 CPU-minutes, LeNet-5-half on a Fashion-MNIST BN CNN: 0.01 79.0 %, 0.05 82.3, 0.1 76.7 top-1; on
    the MNIST LeNet-5-BN: 0.01 98.62, 0.05 98.69), with the student's gradient clipped to norm 1 (`clip_s`:
    unclipped, a BN-free LeNet-5-half on a Fashion-MNIST LeNet-5 had lost 4 of its 8 second-layer channels for
    good after one CPU-minute, none clipped); `-p recipe=paper` gives the paper's settings. Deviations:
    student steps run during warmup too (a step is a student update here, so a step budget must advance); the
    cosine schedule has no eta_min (2e-4 in the reference); the pool is an ImagePool (float16, up to 60,000
    images; on disk past `ram_budget_mib`), not PNG files; 1-channel teachers get no flips.
    On a BN-free teacher the BN term matches the synthetic batch's input statistics to the teacher's normalisation
    (`dfkd.bnstats`; `-p input_stats=false` drops it); with it fast is `--method auto`'s pick for BN-free teachers
    (`dfkd.auto`).
    """

    paper: ClassVar[str] = "Fang et al. 2022, Up to 100x Faster Data-free Knowledge Distillation, AAAI"
    summary: ClassVar[str] = "meta-learned generator: each synthetic batch in a few inner steps (first-order MAML)"
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "synth_batch_size": 8, "g_steps": 2, "s_steps": 2}
    needs: ClassVar[Needs] = {
        "reptile_alpha": (lambda p: not p["is_maml"], "the meta step is first-order MAML, is_maml=1; -p is_maml=0 "
                                                      "(Reptile) uses it"),
        "reset_at": (lambda p: bool(p["reset_l0"]), "-p reset_l0=0: no reset; -p reset_l0=1 resets there"),
        "warmup": (lambda p: bool(p["adv"]), "-p adv=0: no adversarial term to hold back"),
        "bn_mmt": (lambda p: bool(p["bn"]), "-p bn=0: no BN-statistics term"),
    }
    cpu: ClassVar[dict[str, Any]] = {"synth_batch_size": 64, "s_steps": 50, "batch_size": 128, "lr_s": 0.05,
                                     "clip_s": 1.0}
    cpu_reason: ClassVar[str] = ("batches 64/128 and 50 KD steps a round for a CPU; student lr 0.05: at T=20, 0.2 "
                                 "kills a BN-free LeNet-5-half (constant output, 10 % on MNIST), 0.1 and 0.01 "
                                 "trail 0.05 on a Fashion-MNIST BN CNN; the student's gradient clipped to norm 1: "
                                 "unclipped, a BN-free LeNet-5-half loses units for good early in the run")
    deviations: ClassVar[tuple[str, ...]] = (
        "student steps run during warmup too (a step budget must advance)",
        "the cosine schedule has no eta_min (2e-4 in the reference)")
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256, "synth_batch_size": 256, "lr_s": 0.2, "weight_decay": 1e-4, "schedule": "cosine",
        "g_steps": 5, "s_steps": 400, "lr_g": 3e-3, "lr_z": 0.01, "adv": 1.1, "bn": 10.0, "oh": 0.4, "bn_mmt": 0.9,
        "is_maml": 1, "reptile_alpha": REPTILE_ALPHA, "lr_meta": None,
        "warmup": 20 / 220, "reset_l0": 1, "reset_at": 140 / 220,
    }

    @classmethod
    def paper_params(cls, teacher: Teacher | None = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) == "imagenet":
            p.update(IMAGENET)
        return p

    @classmethod
    def finalize(cls, params: dict[str, Any]) -> dict[str, Any]:
        params = super().finalize(params)
        if params.get("lr_meta") is None:  # the reference's meta rate: lr_g * g_steps
            params = {**params, "lr_meta": params["lr_g"] * params["g_steps"]}
        return params

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ema: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.progress, self.reset_done = 0.0, False
        self._last_layers: list = []
        super().__init__(*args, **kwargs)

    def make_synthesizer(self) -> MetaSynthesizer:
        p = self.p
        return MetaSynthesizer(self.generator, self.objective, self.pool, p["synth_batch_size"], p["g_steps"],
                               self.teacher.num_classes, p["lr_g"], p["lr_z"], bool(p["is_maml"]),
                               p["reptile_alpha"], tuple(p["betas_g"]), self.device, self.augment,
                               lr_meta=p["lr_meta"])

    def set_progress(self, progress: float) -> None:
        super().set_progress(progress)
        self.progress = progress

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[LossDict, None]:
        return momentum_objective(self, x, y, bool(self.p["adv"]) and self.progress >= self.p["warmup"]), None

    def after_synthesis(self) -> None:
        if self._last_layers and self.p["bn_mmt"]:
            self.ema = update_bn_ema(self._last_layers, self.ema, self.p["bn_mmt"])
        self._last_layers = []
        if self.p["reset_l0"] and not self.reset_done and self.progress >= self.p["reset_at"]:
            self.synth.reset_first_block()
            self.reset_done = True

    def extra_state(self) -> dict[str, Any]:
        return {"bn_ema": None if self.ema is None else [[m.clone(), v.clone()] for m, v in self.ema],
                "reset_done": self.reset_done}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        ema = state.get("bn_ema")
        self.ema = None if ema is None else [(m.to(self.device), v.to(self.device)) for m, v in ema]
        self.reset_done = bool(state.get("reset_done", False))


def momentum_objective(method: Any, x: torch.Tensor, y: torch.Tensor, use_adv: bool) -> LossDict:
    """Fast's synthesis loss, shared with NAYER: bn*BN-momentum + oh*CE + adv*masked adversarial KL.

    The teacher sees the augmented view of `x`; its BN inputs are kept (detached) for the EMA update after the
    batch. `method` holds `p`, `augment`, `teacher`, `student`, `bn`, `ema` and receives `_last_layers`.
    """
    p = method.p
    view = method.augment(x)
    t_logits = method.teacher(view)
    layers = method.bn.layers()
    method._last_layers = [(h.detach(), rm, rv) for h, rm, rv in layers]
    bn = bn_momentum(layers, method.ema, p["bn_mmt"]) if layers else t_logits.new_zeros(())
    oh = one_hot(t_logits, y)
    adv = adv_masked_kl(method.student(view), t_logits) if use_adv else t_logits.new_zeros(())
    total = p["bn"] * bn + p["oh"] * oh + p["adv"] * adv
    return {"loss": total, "loss/bn": bn, "loss/oh": oh, "loss/adv": adv}
