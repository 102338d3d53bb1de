"""Adversarial KD with a discriminator that tells teacher outputs (logits or features) from the student's."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.generators.base import LossDict
from dfkd.losses import discriminator_loss, generator_loss
from dfkd.objectives._registry import register_objective
from dfkd.objectives.base import Objective, student_penultimate, teacher_penultimate
from dfkd.precision import backward, step
from dfkd.teacher import Teacher


class Discriminator:
    """A small MLP critic with its own Adam optimizer: dim -> 256 -> 256 -> 1, LeakyReLU(0.2).

    Args:
        dim: size of the vectors it judges.
        lr: Adam learning rate (2e-4, betas (0.5, 0.999): the DCGAN settings).
        device: where it runs.
    """

    def __init__(self, dim: int, lr: float, device: torch.device) -> None:
        self.net = nn.Sequential(nn.Linear(dim, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256), nn.LeakyReLU(0.2),
                                 nn.Linear(256, 1)).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.5, 0.999))

    def fool(self, fake: torch.Tensor) -> torch.Tensor:
        """The non-saturating loss of whoever made `fake` (gradient flows to `fake`, not used for the critic)."""
        return generator_loss(self.net(fake))

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One Adam step on the critic's BCE loss (real -> 1, fake -> 0); returns the loss."""
        loss = discriminator_loss(self.net(real.detach()), self.net(fake.detach()))
        self.opt.zero_grad(set_to_none=True)
        backward(loss)
        step(self.opt)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


@register_objective("discriminator")
class AdversarialKD(Objective):
    """Adversarial KD: a discriminator tells teacher from student outputs; the student learns to fool it.

    On logits (`-p discriminator=logits`, the softmax outputs): Xu et al., "Training Shallow and Thin Networks for
    Acceleration via Knowledge Distillation with Conditional Adversarial Networks", ICLRW 2018. On penultimate
    features (`features`; a learned linear adapter, trained with the student, maps the student's to the teacher's
    size when they differ): Belagiannis et al., "Adversarial Network Compression", ECCVW 2018. The student adds
    `disc_weight` * the non-saturating fool-the-discriminator loss to its KD loss; the discriminator takes one Adam
    step (`lr_d`) per student step, on the same batch.
    """

    paper: ClassVar[str] = "Xu et al. 2018 (ICLRW); Belagiannis et al. 2018, Adversarial Network Compression (ECCVW)"

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        self.mode = params.get("discriminator") or "logits"
        dim = teacher.num_classes
        if self.mode == "features":
            self.s_feat = (student_penultimate(student), "input")
            self.t_feat = (teacher_penultimate(teacher, "--discriminator features"), "input")
            self.watch([self.s_feat[0]], [self.t_feat[0]])
            (s_shape,), (t_shape,) = self.probe([self.s_feat], [self.t_feat])
            dim = t_shape[1:].numel()
            if s_shape[1:].numel() != dim:
                self.learned["adapter"] = nn.Linear(s_shape[1:].numel(), dim).to(device)
        self.disc = Discriminator(dim, float(params.get("lr_d", 2e-4)), device)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def resolve_weight(self) -> float:
        return float(self.p.get("disc_weight", 1.0))

    def outputs(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(teacher, student) vectors the discriminator judges."""
        if self.mode == "logits":
            return F.softmax(t_logits.detach(), 1), F.softmax(s_logits, 1)
        (t,) = self.teacher_features(x, [self.t_feat])
        s = self.student_feature(self.s_feat).flatten(1)
        return t.flatten(1), self.learned["adapter"](s) if "adapter" in self.learned else s

    def terms(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        real, fake = self.outputs(x, s_logits, t_logits)
        self._pending = (real.detach(), fake.detach())
        return {"disc_fool": self.weight * self.disc.fool(fake)}

    def extra_step(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        if self._pending is None:
            return {}
        real, fake = self._pending
        self._pending = None
        return {"disc_d": self.disc.step(real, fake)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "disc": self.disc.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.disc.load_state_dict(state["disc"])
