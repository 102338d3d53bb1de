"""Shared machinery of the learnable-latent methods (CMI, Fast-DFKD): generator, BN taps, pool, round shape."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.augment import make_augment
from dfkd.bnstats import BN_DEFAULTS, BNInputs
from dfkd.generators import Generator
from dfkd.generators.latent import LatentSynthesizer
from dfkd.generators.pool import ImagePool
from dfkd.generators.store import DEFAULT_RAM_BUDGET_MIB
from dfkd.methods._budget import IterationPlanner
from dfkd.methods._gan import CPU_WIDTH_REASON, GAN_CPU, generator_width
from dfkd.methods.base import Method, frozen, step_logs
from dfkd.teacher import Teacher

LATENT_DEFAULTS: dict[str, Any] = {
    "nz": 256,
    "ngf": 64,  # zju-vipa's Generator: 128-128-64 channels
    "synth_batch_size": 256,
    "betas_g": [0.5, 0.999],
    "flip_p": 0.5,  # horizontal flips in synthesis views and pool samples; 0 for 1-channel teachers
    "pool_size": 60_000,  # images kept: all of a reference-length run (200-220 rounds x 256); they keep all
    "pool_dtype": "float16",
    "pool_dir": None,  # a folder for the pool's files (None: the run folder)
    "ram_budget_mib": DEFAULT_RAM_BUDGET_MIB,  # pool (and CMI's bank) are read from disk past this, each (1 GiB)
    "T": 20.0,
    "momentum": 0.9,
    **BN_DEFAULTS,
}


class LatentMethod(Method):
    """A method whose batches come from a generator + learnable z optimised per round, kept in an image pool.

    A round: synthesis (student in eval mode and frozen, teacher BN inputs recorded), the best batch goes to the
    pool, then `s_steps` student KD steps on pool samples with the crop (+ flip) training augmentation.
    Subclasses implement `make_synthesizer()` and `objective(x, y)`.
    """

    uses_bn: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = LATENT_DEFAULTS
    cpu: ClassVar[dict[str, Any]] = GAN_CPU
    cpu_reason: ClassVar[str] = CPU_WIDTH_REASON
    cpu_any_cost: ClassVar[bool] = True  # generator width, batches, steps: a step's cost
    deviations: ClassVar[tuple[str, ...]] = (
        "the pool is an ImagePool (float16, up to pool_size images, on disk past ram_budget_mib), not PNG files",
        "1-channel teachers get no flips (grey-scale digits and documents are not mirror-symmetric)")

    @classmethod
    def paper_params(cls, teacher: Teacher | None = None) -> dict[str, Any]:
        p = super().paper_params(teacher)
        if teacher is not None and teacher.spec.channels == 1:
            p["flip_p"] = 0.0  # digits and other grey-scale documents are not mirror-symmetric
        return p

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        p, spec = self.p, teacher.spec
        self.generator = Generator(spec, nz=p["nz"], ngf=generator_width(p, teacher), head="sigmoid")
        self.pool = ImagePool(p["pool_size"], getattr(torch, p["pool_dtype"]), p["pool_dir"], p["ram_budget_mib"])
        self.augment = make_augment("crop_flip", spec.hw, flip_p=p["flip_p"], fill=spec.black)
        self.bn = BNInputs(teacher, self.name, p["input_stats"])
        self.synth: LatentSynthesizer = self.make_synthesizer()
        self.planner = IterationPlanner(self.name, p["g_steps"], None, self.notice)

    def make_synthesizer(self) -> LatentSynthesizer:
        raise NotImplementedError

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Synthesis loss of a generated batch `x` for targets `y`, and a memo kept with the best batch."""
        raise NotImplementedError

    @contextmanager
    def synthesis(self) -> Iterator[None]:
        """Record teacher BN inputs; the student is in eval mode (as the reference) and gets no gradient."""
        self.bn.set_active(True)
        self.student.eval()
        try:
            with frozen(self.student):
                yield
        finally:
            self.student.train()
            self.bn.set_active(False)

    def synthesize(self) -> dict[str, float]:
        """One synthesis round; its best batch is in the pool and in `last_images`.

        Under a time budget its g_steps are fitted to it (`IterationPlanner`; the first batch, its speed unknown,
        ends at the planner's cap on the budget's clock); under a step budget the recipe's.
        """
        self.planner.fit(self.synth, self.time_budget, self.clock)
        with self.synthesis(), self.planner.timing(self.clock):
            x, losses = self.synth.synthesize()
            self.planner.calls = self.synth.done_steps
            self.after_synthesis()
        self.last_images = x
        return step_logs("gen", losses)

    def after_synthesis(self) -> None:
        """Hook at the end of synthesis, BN records still available (Fast-DFKD updates its EMA here)."""

    def round(self) -> dict[str, float]:
        n = self.student_steps_per_round
        logs = self.synthesize()
        for _ in self.student_steps(n):
            logs.update(step_logs("student", self.student_step(self.synth.sample(self.p["batch_size"]))))
        return logs

    def close(self) -> None:
        self.bn.close()
        super().close()
