"""Learnable-latent synthesis (CMI, Fast-DFKD): per round, optimise a generator and its latents z for one batch.

Each round draws z ~ N(0, I) as a learnable tensor and sorted target labels, runs `steps` Adam iterations on
{generator, z}, keeps the lowest-loss batch and pushes it into an image pool the student learns from.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dfkd.generators.base import LossDict, Synthesizer
from dfkd.precision import backward, step

#: objective(x, y) -> (losses with "loss", memo): `memo` (or None) is kept with the best batch (CMI: its features).
LatentObjective = Callable[[Tensor, Tensor], tuple[LossDict, Tensor | None]]


def reinit_(module: nn.Module) -> nn.Module:
    """CMI's `reset_model`: conv/linear weights N(0, 0.02) and biases 0; BatchNorm weight N(1, 0.02), bias 0.

    Args:
        module: a generator (modified in place).

    Returns:
        The same module.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


def clone(module: nn.Module) -> nn.Module:
    """An independent copy (parameters and buffers) of `module`, as Fast-DFKD's `generator.clone()`."""
    return copy.deepcopy(module)


@dataclass
class Best:
    """The lowest-loss batch of a round: images (detached), its total loss, the objective's memo, all losses."""

    x: Tensor
    loss: Tensor
    memo: Tensor | None
    losses: LossDict


def optimise_latent(generator: nn.Module, z: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                    objective: LatentObjective, steps: int,
                    after_backward: Callable[[int], None] | None = None,
                    stop: Callable[[int], bool] | None = None) -> Best:
    """Run `steps` iterations of x = G(z), loss = objective(x, y), backward, step; return the best batch.

    The best batch is judged on the loss of the iteration that made it (as the reference does: before the update).

    Args:
        generator: the generator being optimised (train mode).
        z: learnable latents (requires_grad), in `optimizer` together with the generator's parameters.
        y: target labels.
        optimizer: Adam over {generator, z}.
        objective: see `LatentObjective`.
        steps: iterations (`g_steps`).
        after_backward: called with the iteration index after each backward, before the optimizer step
            (Fast-DFKD's first-order MAML reads the fresh gradients there).
        stop: called with the iterations made after each one; True ends the batch there (a time limit).

    Returns:
        The lowest-loss batch.

    Shape:
        - z: (B, nz); y: (B,)
        - Best.x: (B, C, H, W)
    """
    best: Best | None = None
    for it in range(steps):
        x = generator(z)
        losses, memo = objective(x, y)
        best = _keep_best(best, x.detach(), losses, None if memo is None else memo.detach())
        optimizer.zero_grad(set_to_none=True)
        backward(losses["loss"])
        if after_backward is not None:
            after_backward(it)
        step(optimizer)
        if stop is not None and stop(it + 1):
            break
    if best is None:
        raise ValueError("optimise_latent needs steps >= 1")
    return best


def _keep_best(best: Best | None, x: Tensor, losses: LossDict, memo: Tensor | None) -> Best:
    """The lower-loss batch of `best` and this iteration's, chosen on the device (no host sync per iteration)."""
    value = losses["loss"].detach()
    if best is None:
        return Best(x.clone(), value, None if memo is None else memo.clone(),
                    {k: v.detach() for k, v in losses.items()})
    better = value < best.loss
    return Best(torch.where(better, x, best.x), torch.where(better, value, best.loss),
                None if memo is None else torch.where(better, memo, best.memo),
                {k: torch.where(better, v.detach(), best.losses[k]) for k, v in losses.items()})


class LatentSynthesizer(Synthesizer):
    """Common part of the CMI and Fast-DFKD synthesizers: latents, sorted targets, the pool, pool sampling.

    Args:
        generator: the generator (its `nz` attribute gives the latent size).
        objective: see `LatentObjective`.
        pool: where each round's best batch goes (an `ImagePool`).
        batch_size: synthesis batch.
        steps: generator/latent iterations a round.
        num_classes: targets are drawn uniformly from range(num_classes).
        device: where z lives.
        sample_augment: applied to pool samples served to the student (the reference's train transform).
    """

    def __init__(self, generator: nn.Module, objective: LatentObjective, pool: Any, batch_size: int, steps: int,
                 num_classes: int, device: torch.device | str = "cpu", sample_augment: nn.Module | None = None) -> None:
        self.generator = generator.to(device)
        self.objective, self.pool = objective, pool
        self.batch_size, self.steps, self.num_classes = batch_size, steps, num_classes
        self.device = torch.device(device)
        self.sample_augment = sample_augment
        self.nz: int = generator.nz
        self.time_limit: float | None = None  # seconds a batch's iterations may take (one at least); None: no limit
        self.clock: Callable[[], float] = time.perf_counter  # what time_limit counts (a method sets its budget's)
        self.done_steps = 0  # iterations the last batch made (`steps`, or fewer where time_limit ended it)

    def stopper(self) -> Callable[[int], bool]:
        """`optimise_latent`'s stop for a batch starting now: records the iterations made, ends past time_limit."""
        start = self.clock()

        def stop(done: int) -> bool:
            self.done_steps = done
            return self.time_limit is not None and self.clock() - start > self.time_limit

        return stop

    def latents(self) -> tuple[Tensor, Tensor]:
        """Learnable z ~ N(0, I) and uniform targets, sorted (as the reference, for tidy image grids)."""
        z = torch.randn(self.batch_size, self.nz, device=self.device).requires_grad_()
        y = torch.randint(0, self.num_classes, (self.batch_size,), device=self.device).sort()[0]
        return z, y

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """`n` pool images, augmented as the reference's training transform does."""
        x, _ = self.pool.sample(n, self.device)
        return self.sample_augment(x) if self.sample_augment is not None else x

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.pool.load_state_dict(state["pool"])
