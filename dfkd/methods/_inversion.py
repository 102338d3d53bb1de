"""Shared machinery of the model-inversion methods (DeepInversion, ADI, ZeroQ): a round, a pool, scaled defaults.

A round optimises one new batch of input pixels against the teacher (the method's `inversion_loss`), merges it into
the image pool with the teacher's logits, then takes `s_steps` student KD steps on uniform minibatches of the
pool, each with zju-vipa's training augmentation (`kd_augment` "crop_flip": RandomCrop with 1/8 padding plus a
horizontal flip, none for 1-channel teachers; the teacher labels the augmented view) - the ADI protocol of the
DeepInversion maintainers ("generate one new batch every 50 KD iterations and merge into the existing set",
NVlabs/DeepInversion#6).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.augment import make_augment
from dfkd.bnstats import BN_DEFAULTS, BNInputs
from dfkd.generators import ImagePool, InversionSynthesizer, LossDict
from dfkd.generators.store import DEFAULT_RAM_BUDGET_MIB
from dfkd.methods._budget import IterationPlanner
from dfkd.methods.base import Method, frozen, step_logs
from dfkd.teacher import Teacher

INVERSION_DEFAULTS: dict[str, Any] = {
    "batch_size": 256,  # student KD minibatch, and the synthesized batch unless synth_batch_size is set
    "synth_batch_size": None,  # None: batch_size (config.json holds the resolved value)
    "iterations": 2000,  # optimisation steps per synthesized batch
    "lr_inv": 0.1,
    "betas_inv": [0.5, 0.9],
    "jitter": 2,
    "flip_p": 0.0,
    "clip": True,
    "warmup": 0.05,  # NVlabs: 100 of 2000 iterations
    "lowres": 0.0,  # fraction of iterations on the 2x-pooled view (NVlabs setting 0: 2/3)
    "init": "randn",
    "inv_schedule": "cosine",  # or "plateau" (ReduceLROnPlateau on the loss, as ZeroQ)
    "plateau_patience": 100,
    "plateau_min_lr": 1e-4,
    "synth_seconds": None,  # cap on the seconds one batch may take (None: no cap)
    "pool_size": 256_000,  # images kept: the maintainers distilled from 1000 batches x 256
    "pool_dtype": "float16",
    "pool_dir": None,  # a folder for the pool's files (None: the run folder)
    "ram_budget_mib": DEFAULT_RAM_BUDGET_MIB,  # the pool is read from disk once it would pass this (1 GiB)
    "s_steps": 50,  # student KD steps per new batch
    "T": 3.0,  # KD temperature (NVlabs/DeepInversion#9)
    "schedule": "cosine",
    "weight_decay": 1e-4,  # zju-vipa's student SGD (`datafree_kd.py`)
    "kd_augment": "crop_flip",  # zju-vipa's training transform on pool samples
    **BN_DEFAULTS,
}


class InversionMethod(Method):
    """A method whose transfer data are input batches optimised against the teacher and kept in a pool.

    Subclasses implement `inversion_loss(x, y)`; the student distils from the pool at temperature `T`.
    """

    defaults: ClassVar[dict[str, Any]] = INVERSION_DEFAULTS
    deviations: ClassVar[tuple[str, ...]] = (
        "the pool keeps images as float16 (pool_dtype), on disk past ram_budget_mib",)
    uses_bn: ClassVar[bool] = True
    ignores: ClassVar[dict[str, str]] = {"g_steps": "its synthesis steps per batch are -p iterations"}
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "synth_batch_size": 8, "iterations": 4, "s_steps": 2}

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        p = self.p
        self.bn = BNInputs(teacher, self.name, self.p["input_stats"]) if self.uses_bn else None
        self.pool = ImagePool(p["pool_size"], getattr(torch, p["pool_dtype"]), p["pool_dir"], p["ram_budget_mib"])
        self.synth: InversionSynthesizer = InversionSynthesizer(
            teacher.spec, self._objective, teacher.num_classes, p["synth_batch_size"] or p["batch_size"],
            p["iterations"], p["lr_inv"], tuple(p["betas_inv"]), jitter=p["jitter"], flip_p=p["flip_p"],
            clip=p["clip"], warmup=p["warmup"], lowres=p["lowres"], schedule=p["inv_schedule"],
            patience=p["plateau_patience"], min_lr=p["plateau_min_lr"], init=p["init"],
            pool=self.pool, labeler=self._labels, device=device)
        self.synth.time_limit = p["synth_seconds"]
        self.planner = IterationPlanner(self.name, p["iterations"], p["synth_seconds"], self.notice)
        flip = 0.0 if teacher.spec.channels == 1 else 0.5  # grey-scale digits are not mirror-symmetric
        self.kd_augment = None if p["kd_augment"] == "none" else \
            make_augment(p["kd_augment"], teacher.spec.hw, flip_p=flip, fill=teacher.spec.black).to(device)

    @classmethod
    def finalize(cls, params: dict[str, Any]) -> dict[str, Any]:
        params = super().finalize(params)
        if params.get("synth_batch_size") is None:
            params = {**params, "synth_batch_size": params["batch_size"]}
        return params

    def inversion_loss(self, x: torch.Tensor, y: torch.Tensor) -> LossDict:
        """The synthesis objective on the augmented batch `x` with targets `y` (teacher/student forwards here)."""
        raise NotImplementedError

    def bn_layers(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The teacher's BN inputs of the last forward (empty for a BN-free teacher)."""
        return self.bn.layers() if self.bn is not None else []

    def _objective(self, x: torch.Tensor, y: torch.Tensor) -> LossDict:
        self.planner.calls += 1
        if self.bn is not None:
            self.bn.set_active(True)
        try:
            with frozen(self.student):
                return self.inversion_loss(x, y)
        finally:
            if self.bn is not None:
                self.bn.set_active(False)

    @torch.no_grad()
    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        # Logits of the images exactly as the pool stores them, so a student step sees a matching pair.
        return self.teacher(x.to(self.pool.dtype).float())

    def synthesis_step(self) -> dict[str, float]:
        """Synthesize one batch into the pool (the student in eval mode, its weights untouched)."""
        was_training = self.student.training
        self.student.eval()
        iterations, self.synth.time_limit = self.planner.plan(self.time_budget)
        self.synth.clock = self.clock
        try:
            with self.planner.timing(self.clock):
                x, losses = self.synth.synthesize(iterations)
        finally:
            self.student.train(was_training)
        self.last_images = x
        return step_logs("synth", losses)

    def round(self) -> dict[str, float]:
        n = self.student_steps_per_round
        logs = self.synthesis_step()
        for _ in self.student_steps(n):
            x, t_logits = self.pool.sample(self.p["batch_size"], self.device)
            if self.kd_augment is not None:
                with torch.no_grad():
                    x, t_logits = self.kd_augment(x), None  # the teacher labels the view the student sees
            logs.update(step_logs("student", self.student_step(x, t_logits)))
        logs["pool/images"] = float(len(self.pool))
        return logs

    def close(self) -> None:
        if self.bn is not None:
            self.bn.close()
        super().close()
