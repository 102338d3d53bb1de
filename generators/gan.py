"""GAN-generator synthesis: a generator G(z) trained against the teacher (and the student), one step a round."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dfkd.generators.base import LossDict, Synthesizer
from dfkd.precision import backward, step, unscale


class GeneratorSynthesizer(Synthesizer):
    """Trains `generator` with an objective the method supplies; serves fresh samples of it.

    Args:
        generator: maps z (B, nz) [and labels] to images in the teacher's normalised space.
        objective: `objective(x, y) -> loss dict` on a generated batch (y: the labels of a conditional generator,
            else None); the method computes teacher/student terms there.
        batch_size: generator batch.
        lr: generator learning rate (Adam).
        betas: Adam betas.
        device: where to sample z.
        steps: generator steps a round.
        grad_clip: clip the generator's gradient norm (ZSKT uses 5), or None.
        num_classes: sample labels for a class-conditional generator.
    """

    def __init__(self, generator: nn.Module, objective: Callable[[torch.Tensor, torch.Tensor | None], LossDict],
                 batch_size: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 device: torch.device | str = "cpu", steps: int = 1, grad_clip: float | None = None,
                 num_classes: int | None = None) -> None:
        self.generator = generator.to(device)
        self.objective = objective
        self.batch_size, self.steps, self.grad_clip = batch_size, steps, grad_clip
        self.device, self.num_classes = torch.device(device), num_classes
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.nz: int = generator.nz

    def noise(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents z ~ N(0, I) and, for a conditional generator, uniform labels."""
        z = torch.randn(n, self.nz, device=self.device)
        y = torch.randint(0, self.num_classes, (n,), device=self.device) if self.num_classes else None
        return z, y

    def step_on(self, z: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, LossDict]:
        """One generator update on given latents; returns the batch it made (detached) and its losses."""
        x = self.generator(z, y) if y is not None else self.generator(z)
        losses = self.objective(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        backward(losses["loss"])
        if self.grad_clip:
            unscale(self.optimizer)
            nn.utils.clip_grad_norm_(self.generator.parameters(), self.grad_clip)
        step(self.optimizer)
        return x.detach(), losses

    def synthesize(self) -> tuple[torch.Tensor, LossDict]:
        x, losses = torch.empty(0), {}
        for _ in range(self.steps):
            x, losses = self.step_on(*self.noise(self.batch_size))
        return x, losses

    @torch.no_grad()
    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """G(z) without gradient."""
        return self.generator(z, y) if y is not None else self.generator(z)

    def sample(self, n: int) -> torch.Tensor:
        return self.generate(*self.noise(n))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
