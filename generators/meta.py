"""Fast-DFKD's meta generator: a shared initialisation each round's batch is made from in a few inner steps.

Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022 (zju-vipa/Fast-Datafree,
`datafree/synthesis/fast_meta.py`). Each round clones the meta generator into a fast generator, optimises the clone
and fresh learnable latents for `steps` inner iterations, and moves the meta generator with a first-order MAML or
a Reptile update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dfkd.generators.base import LossDict
from dfkd.generators.latent import LatentObjective, LatentSynthesizer, clone, optimise_latent
from dfkd.precision import loss_scaled, unscale

#: The Reptile multiplier hard-coded in Fast-Datafree's `reptile_grad`.
REPTILE_ALPHA = 67.0


def add_grads_(meta: nn.Module, fast: nn.Module, finite_only: bool = False) -> None:
    """First-order MAML: add the fast generator's current gradients into the meta generator's `.grad`.

    `finite_only` adds 0 for a non-finite gradient entry (an fp16 step the loss scale skips).
    """
    for p, q in zip(meta.parameters(), fast.parameters()):
        if q.grad is None:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(torch.nan_to_num(q.grad, 0.0, 0.0, 0.0) if finite_only else q.grad)


def reptile_grads_(meta: nn.Module, fast: nn.Module, alpha: float = REPTILE_ALPHA) -> None:
    """Reptile: set the meta gradient to alpha * (theta_meta - theta_fast), so a descent step moves toward fast."""
    for p, q in zip(meta.parameters(), fast.parameters()):
        p.grad = alpha * (p.detach() - q.detach())


class MetaSynthesizer(LatentSynthesizer):
    """Fast-DFKD synthesis: clone the meta generator, learn {clone, z} for `steps` inner steps, meta-update, pool.

    Args:
        generator, objective, pool, batch_size, steps, num_classes, device, sample_augment: see LatentSynthesizer
            (`generator` is the meta generator).
        lr_g: inner learning rate of the fast generator.
        lr_z: inner learning rate of z.
        maml: first-order MAML (True, `--is_maml 1`) or Reptile (False).
        alpha: Reptile multiplier (the reference's hard-coded 67).
        betas: betas of both Adams ((0.5, 0.999)).
        lr_meta: learning rate of the meta Adam; None: lr_g * steps (the reference's CIFAR rule).
    """

    def __init__(self, generator: nn.Module, objective: LatentObjective, pool: Any, batch_size: int, steps: int,
                 num_classes: int, lr_g: float, lr_z: float, maml: bool = True, alpha: float = REPTILE_ALPHA,
                 betas: tuple[float, float] = (0.5, 0.999), device: torch.device | str = "cpu",
                 sample_augment: nn.Module | None = None, lr_meta: float | None = None) -> None:
        super().__init__(generator, objective, pool, batch_size, steps, num_classes, device, sample_augment)
        self.lr_g, self.lr_z, self.maml, self.alpha, self.betas = lr_g, lr_z, maml, alpha, betas
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr_meta or lr_g * steps, betas=betas)

    def inner_optimizer(self, fast: nn.Module, z: Tensor) -> torch.optim.Optimizer:
        """Adam over the fast generator (lr_g) and z (lr_z)."""
        return torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": self.lr_z}],
                                lr=self.lr_g, betas=self.betas)

    def synthesize(self) -> tuple[Tensor, LossDict]:
        self.meta_optimizer.zero_grad(set_to_none=True)
        fast = clone(self.generator).train()
        z, y = self.latents()
        inner = self.inner_optimizer(fast, z)

        def after(_: int) -> None:  # first-order MAML reads the true-scale gradients
            unscale(inner)
            add_grads_(self.generator, fast, finite_only=loss_scaled())

        best = optimise_latent(fast, z, y, inner, self.objective, self.steps, after if self.maml else None,
                               self.stopper())
        if not self.maml:
            reptile_grads_(self.generator, fast, self.alpha)
        self.meta_optimizer.step()
        self.pool.add(best.x)
        return best.x, best.losses

    def reset_first_block(self) -> None:
        """Fast-DFKD's `--reset_l0`: first Linear and first BatchNorm weights N(0, 0.02), biases 0 (as reference)."""
        for name in ("l1", "bn0"):
            layer = getattr(self.generator, name, None)
            if layer is not None and getattr(layer, "weight", None) is not None:
                nn.init.normal_(layer.weight, 0.0, 0.02)
                nn.init.zeros_(layer.bias)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
