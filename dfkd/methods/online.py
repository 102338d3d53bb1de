"""Online adversarial KD: two students learn jointly, from the teacher and from each other, on DFAD's generator."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.generators import LossDict
from dfkd.hooks import FeatureTaps
from dfkd.losses import adv_l1, kl_div
from dfkd.methods._registry import register_method
from dfkd.methods.base import frozen
from dfkd.methods.dfad import DFAD
from dfkd.objectives.base import student_penultimate
from dfkd.objectives.discriminator import Discriminator
from dfkd.precision import backward, step
from dfkd.teacher import Teacher


def fresh_copy(model: nn.Module) -> nn.Module:
    """A model of the same architecture with newly initialised weights (and BatchNorm statistics)."""
    peer = copy.deepcopy(model)
    for m in peer.modules():
        m._forward_hooks.clear()  # the copy must not feed the original's feature taps
        m._forward_pre_hooks.clear()
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return peer


@register_method("online")
class Online(DFAD):
    """Online adversarial KD: two students each minimise DFAD's L1 to the teacher + KL to the peer + fooling a critic.

    Chung et al., "Feature-map-level Online Adversarial Knowledge Distillation", ICML 2020 (AFD), made data-free
    with DFAD's generator (Fang et al. 2019, which maximises the students' mean L1 gap to the teacher). Two students
    of the run's architecture (the second freshly initialised) train together: each adds `mutual` * KL(peer ||
    self) at T = 1 (deep mutual learning) and `adv` * the non-saturating loss of its own discriminator, which
    learns to tell the peer's penultimate features (real) from this student's (fake): one Adam step (`lr_d`,
    betas (0.5, 0.999)) per student step. AFD's convolutional feature-map critics are MLPs on the pooled
    penultimate features here. Schedule and optimisers are DFAD's; the first student is the run's student.pt, the
    second lives in the method state. Settings per input kind (MNIST, CIFAR, ImageNet size) are DFAD's.

    CPU recipe (`-p recipe=cpu`; the default for small MNIST-kind teachers): DFAD's, and
    `adv` = 0.01: with no real data anchoring either student, the critic term at weight 1 drags both students'
    features toward each other instead of toward the teacher. Measured on the plain MNIST LeNet-5 teacher, 1500
    student steps, one thread: top-1 20.7 % at adv 1, 83.0 % at 0.1, 91.0 % at 0.01, 92.8 % at 0 (the term
    off). 0.01 keeps the method's critic while letting it learn.

    `-p ta_verify=true` (off by default): TA-DFKD teacher verification (Shin & Choi, "Teacher as a Lenient Expert",
    AAAI 2024; `dfkd.methods._verify`): the student trains only on generated samples the teacher verifies as
    clean (a 2-component Gaussian mixture on its per-sample loss, clean above `-p ta_threshold=0.5`, the paper's),
    redrawn until a batch is full (at most `-p ta_max_draws=16` batches); the generator's loss sees its clean
    samples only.
    """

    paper: ClassVar[str] = "Chung et al. 2020, Feature-map-level Online Adversarial Knowledge Distillation, ICML"
    summary: ClassVar[str] = "two students with mutual KD and a discriminator each, on DFAD's adversarial generator"
    ignores: ClassVar[dict[str, str]] = {
        "T": "its student losses are the L1 distance to the teacher's logits and the peer KL at T = 1"}
    @classmethod
    def no_effect(cls, params: dict[str, Any]) -> dict[str, str]:
        """As every method's, but `lr_d` is the learning rate of online's own critics."""
        return {k: v for k, v in super().no_effect(params).items() if k != "lr_d"}

    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "s_steps": 2}
    defaults: ClassVar[dict[str, Any]] = {"mutual": 1.0, "adv": 1.0}
    cpu: ClassVar[dict[str, Any]] = {"adv": 0.01}
    cpu_reason: ClassVar[str] = ("critic weight adv 0.01: plain LeNet-5 teacher, 1500 steps: "
                                 "91.0 % at 0.01, 20.7 % at 1")
    cpu_any_cost: ClassVar[bool] = False  # a loss weight set on a LeNet, not a step's cost
    deviations: ClassVar[tuple[str, ...]] = (
        "AFD's convolutional feature-map critics are MLPs on the pooled penultimate features",)

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        self.peer = fresh_copy(student).to(device).train()
        self.opt_peer = self.make_student_optimizer(self.peer.parameters())
        self.track_lr(self.opt_peer)
        path = student_penultimate(student)
        self.taps = [FeatureTaps(m, [path], inputs=True).__enter__() for m in (student, self.peer)]
        self._feature_taps(False)
        with torch.no_grad(), self._recording():
            was = student.training
            student.eval()
            student(torch.zeros(teacher.spec.shape(2), device=device))
            student.train(was)
            dim = self.taps[0].inputs[path].flatten(1).shape[1]
        self.discs = [Discriminator(dim, float(params["lr_d"]), device) for _ in range(2)]

    def _feature_taps(self, active: bool) -> None:
        for t in self.taps:
            t.active = active

    @contextmanager
    def _recording(self) -> Iterator[None]:
        self._feature_taps(True)
        try:
            yield
        finally:
            self._feature_taps(False)

    def _features(self) -> list[torch.Tensor]:
        feats = [next(iter(t.inputs.values())).flatten(1) for t in self.taps]
        for t in self.taps:
            t.clear()
        return feats

    def generator_loss(self, x: torch.Tensor) -> LossDict:
        t = self.teacher(x)
        with frozen(self.peer):
            adv = (adv_l1(self.student(x), t) + adv_l1(self.peer(x), t)) / 2
        return {"loss": adv, "loss/adv": adv}

    def _own_loss(self, s: torch.Tensor, peer: torch.Tensor, t: torch.Tensor, f: torch.Tensor,
                  disc: Discriminator) -> LossDict:
        l1, mutual, fool = self.student_loss(s, t)["loss"], kl_div(s, peer.detach()), disc.fool(f)
        total = l1 + self.p["mutual"] * mutual + self.p["adv"] * fool
        return {"loss": total, "loss/l1": l1, "loss/mutual": mutual, "loss/fool": fool}

    def student_step(self, x: torch.Tensor, t_logits: torch.Tensor | None = None) -> LossDict:
        """One update of both students (and of both discriminators) on transfer images `x` (teacher logits `t_logits`).

        The joint update is this method's student step: DFAD's round calls it on each fresh batch.
        """
        t0 = time.perf_counter()
        t = t_logits
        if t is None:
            with torch.no_grad(), self.objectives.capture_teacher(x):
                t = self.teacher(x)
        with self._recording():
            s1, s2 = self.student_forward(x), self.peer(x)
        f1, f2 = self._features()
        losses = self.with_objectives(self._own_loss(s1, s2, t, f1, self.discs[0]), x, s1, t)
        peer = self._own_loss(s2, s1, t, f2, self.discs[1])
        self.opt_s.zero_grad(set_to_none=True)
        self.opt_peer.zero_grad(set_to_none=True)
        backward(losses["loss"] + peer["loss"])
        self.clip_student(losses, nets=((self.opt_peer, self.peer),))
        step(self.opt_s, self.opt_peer)
        d1, d2 = self.discs[0].step(real=f2, fake=f1), self.discs[1].step(real=f1, fake=f2)
        losses.update({"loss/peer": peer["loss"], "loss/peer_l1": peer["loss/l1"], "loss/d1": d1, "loss/d2": d2})
        losses.update(self.objectives.extra_step(x, s1, t))
        self.student_seconds += time.perf_counter() - t0
        return losses

    def extra_state(self) -> dict[str, Any]:
        return {"peer": self.peer.state_dict(), "opt_peer": self.opt_peer.state_dict(),
                "d1": self.discs[0].state_dict(), "d2": self.discs[1].state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.peer.load_state_dict(state["peer"])
        self.opt_peer.load_state_dict(state["opt_peer"])
        self.discs[0].load_state_dict(state["d1"])
        self.discs[1].load_state_dict(state["d2"])

    def close(self) -> None:
        for t in self.taps:
            t.remove()
        super().close()
