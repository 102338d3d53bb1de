"""CMI: contrastive model inversion (Fang et al., IJCAI 2021; zju-vipa/CMI)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from dfkd.augment import make_augment
from dfkd.generators import LossDict
from dfkd.generators.contrastive import ContrastiveCritic, ContrastiveSynthesizer, instance_means
from dfkd.hooks import FeatureTaps
from dfkd.losses import adv_masked_kl, bn_deepinversion, one_hot
from dfkd.methods._latent import LatentMethod
from dfkd.methods._recipes import cap_batches, teacher_kind
from dfkd.methods._registry import register_method
from dfkd.teacher import Teacher


@register_method("cmi")
class CMI(LatentMethod):
    """CMI: model inversion whose batches are pushed apart from each other and from the past by a contrastive loss.

    Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021. Per round a freshly
    re-initialised generator and learnable z minimise bn*R_DI + oh*CE(t(global), y) + adv*masked-KL(s, t) +
    cr*InfoNCE(local view, global view; memory bank) for g_steps Adam (0.5, 0.999) steps; the lowest-loss batch
    goes to the image pool, its features to the bank; then s_steps (the reference's kd_steps) student steps on pool
    samples with KL at T=20 (zju-vipa/CMI `datafree/synthesis/contrastive.py`). Defaults are the CIFAR-10 script
    `cmi_cifar10.sh`: batch 256 / 256, g_steps 200, lr_g 1e-3, adv 0.5, bn 1, oh 1, cr 0.8, cr_T 0.2, 400 KD steps,
    student SGD 0.1 wd 1e-4 cosine, nz 256, generator width 64, bank 40,960 rows, 4,096 negatives, for every input
    kind; CMI has no ImageNet-size recipe, so inputs of 64 px or more get batches of 64 (`LARGE_BATCH`).
    CPU recipe (`-p recipe=cpu`; the default for MNIST-kind teachers of any cost, `Recipe.cpu_default`):
    g_steps / 5 = 40 with lr_g x 5 = 5e-3 (lr * steps kept), synthesis batch 64, s_steps 50, batch 128 (a round
    costs ~1/20 of the reference's), generator width 16, and student lr 0.05 with its gradient clipped to norm 1
    (`clip_s`): at T=20 the reference's 0.1 kills a BN-free LeNet-5-half (constant output), and 0.05 unclipped
    took a Fashion-MNIST BN CNN's student from 75.4 % (at 0.01) to 45.4 and a Caffe LeNet's (MNIST) from 94.6 % to
    chance; clipped, 5 CPU-minutes, 0.01 -> 0.05 gave 75.41 -> 75.90 % on the Fashion-MNIST BN CNN, 96.99 -> 98.24
    on the Caffe MNIST LeNet, 96.23 -> 97.32 on the MNIST LeNet-5-BN and 75.28 / 76.94 (two seeds) -> 78.23 on a
    BN-free Fashion-MNIST LeNet-5. `-p recipe=paper` gives the paper's settings.
    A BN-free teacher (no BN inputs and not a ResNet) leaves CMI without contrastive features, and its BN term
    matches the synthetic batch's input statistics to the teacher's normalisation instead (`dfkd.bnstats`;
    `-p input_stats=false` drops it): a generator inversion with the input-statistics, class and adversarial terms
    and the pool (dfkd warns).
    The contrastive features are the per-sample channel means of the teacher's BN inputs, or, for a ResNet teacher
    (modules layer1..layer4: zoo, torchvision and timm ResNets), of the inputs of its four stages, as the
    reference does for its ResNet-34 teachers (`InstanceMeanHook` on `teacher.layer1..4`).
    Deviations: the pool is an ImagePool (float16, up to 60,000 images; on disk past `ram_budget_mib`), not PNG
    files; 1-channel teachers get no flips.
    """

    paper: ClassVar[str] = "Fang et al. 2021, Contrastive Model Inversion for Data-Free Knowledge Distillation, IJCAI"
    summary: ClassVar[str] = "model inversion with a contrastive memory bank for diverse synthetic batches"
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "synth_batch_size": 8, "g_steps": 2, "s_steps": 2,
                                       "n_neg": 16}
    cpu: ClassVar[dict[str, Any]] = {"g_steps": 40, "lr_g": 5e-3, "synth_batch_size": 64, "s_steps": 50,
                                     "batch_size": 128, "lr_s": 0.05, "clip_s": 1.0}
    cpu_reason: ClassVar[str] = ("a round at ~1/20 of the reference's cost (g_steps 40 at 5x lr_g, batches 64/128, "
                                 "50 KD steps); student lr 0.05 with its gradient clipped to norm 1: at T=20, 0.1 "
                                 "kills a BN-free LeNet-5-half, 0.05 unclipped took two of four teachers' students "
                                 "down (one to chance), clipped it beat 0.01 on all four")
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256, "synth_batch_size": 256, "lr_s": 0.1, "weight_decay": 1e-4, "schedule": "cosine",
        "g_steps": 200, "s_steps": 400, "lr_g": 1e-3, "adv": 0.5, "bn": 1.0, "oh": 1.0, "cr": 0.8, "cr_T": 0.2,
        "proj_dim": 256, "n_neg": 4096, "bank_size": 40960, "local_scale": [0.25, 1.0],
    }

    @classmethod
    def paper_params(cls, teacher: Teacher | None = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher_kind(teacher) == "imagenet":
            cap_batches(p)
        return p

    def stores(self) -> dict[str, Any]:
        return {**super().stores(), "bank": self.synth.critic.bank}

    def make_synthesizer(self) -> ContrastiveSynthesizer:
        p, size = self.p, self.teacher.spec.hw
        self.local_augment = make_augment("resized_crop", size, flip_p=p["flip_p"], scale=tuple(p["local_scale"]))
        self.stage_taps = self._stage_taps()
        feat_dim = sum(m.running_mean.numel() for m in self.bn.modules)
        if self.stage_taps is not None:
            with torch.no_grad():  # the stage inputs' widths, from one probe forward (as the reference)
                self.teacher(torch.zeros(self.teacher.spec.shape(1), device=self.device))
            feat_dim = sum(self.stage_taps.inputs[q].shape[1] for q in self.stage_taps.paths)
            self.stage_taps.active = False
            self.stage_taps.clear()
        critic = ContrastiveCritic(max(feat_dim, 1), p["lr_g"], p["proj_dim"], p["cr_T"], p["n_neg"], p["bank_size"],
                                   self.device, p["ram_budget_mib"])
        return ContrastiveSynthesizer(self.generator, self.objective, self.pool, p["synth_batch_size"], p["g_steps"],
                                      self.teacher.num_classes, critic, p["cr"] if feat_dim else 0.0, p["lr_g"],
                                      tuple(p["betas_g"]), self.device, self.augment)

    def _stage_taps(self) -> FeatureTaps | None:
        """Taps on the inputs of a ResNet teacher's four stages (None for other teachers)."""
        paths = [f"layer{i}" for i in range(1, 5)]
        if not self.teacher.hookable or not set(paths) <= {n for n, _ in self.teacher.module.named_modules()}:
            return None
        return self.teacher.tap(paths, inputs=True).__enter__()

    @contextmanager
    def synthesis(self) -> Iterator[None]:
        if self.stage_taps is not None:
            self.stage_taps.active = True
        try:
            with super().synthesis():
                yield
        finally:
            if self.stage_taps is not None:
                self.stage_taps.active = False
                self.stage_taps.clear()

    def _features(self) -> tuple[torch.Tensor | None, list]:
        layers = self.bn.layers()
        if self.stage_taps is not None:
            return instance_means([self.stage_taps.inputs[q] for q in self.stage_taps.paths]), layers
        if not self.bn.modules:  # no BatchNorm: no contrastive features (layers() may hold the input's statistics)
            return None, layers
        return (instance_means([x for x, _, _ in layers]) if layers else None), layers

    def close(self) -> None:
        if getattr(self, "stage_taps", None) is not None:
            self.stage_taps.remove()
        super().close()

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[LossDict, torch.Tensor | None]:
        p = self.p
        global_view = self.augment(x)
        t_logits = self.teacher(global_view)
        g_feat, layers = self._features()
        bn = bn_deepinversion(layers) if layers else t_logits.new_zeros(())
        oh = one_hot(t_logits, y)
        adv = adv_masked_kl(self.student(global_view), t_logits) if p["adv"] else t_logits.new_zeros(())
        losses = {"loss": p["bn"] * bn + p["oh"] * oh + p["adv"] * adv, "loss/bn": bn, "loss/oh": oh,
                  "loss/adv": adv}
        if g_feat is None or not p["cr"]:
            return losses, None
        self.teacher(self.local_augment(x))
        l_feat, _ = self._features()
        return losses, torch.cat([l_feat, g_feat], dim=1)
