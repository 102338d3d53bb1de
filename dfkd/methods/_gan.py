"""Shared machinery of the GAN-generator methods (DAFL, DFAD, ZSKT, DFQ): a generator, its optimizer, BN taps."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.bnstats import BNInputs
from dfkd.generators import Generator, GeneratorSynthesizer, LossDict, default_width
from dfkd.losses import information_entropy
from dfkd.methods._verify import clean_mask, verified_batch
from dfkd.methods.base import Method, Needs, frozen, step_logs
from dfkd.teacher import Teacher, teacher_size

GAN_DEFAULTS: dict[str, Any] = {
    "nz": 100,
    "ngf": 64,  # every reference generator: 128-128-64 channels
    "head": "tanh_bn",
    "bn_eps": 1e-5,
    "lr_g": 1e-3,
    "betas_g": [0.9, 0.999],
    "grad_clip": None,
    # DAFL's information-entropy class-balance term added to the generator loss: a remedy for mode collapse
    # (dfkd.watch), off by default; methods with their own balance term (dafl's `ie`, dfq's `balance`) use theirs.
    "balance": 0.0,
    # TA-DFKD's teacher verification (dfkd.methods._verify), off by default: the student trains on the samples the
    # teacher verifies as clean (a Gaussian-mixture split of its per-sample loss, clean above `ta_threshold`, the
    # paper's 0.5), redrawn until a batch is full or `ta_max_draws` batches were drawn; the generator's loss is
    # computed on the clean samples of its batch. Shin & Choi, AAAI 2024.
    "ta_verify": False,
    "ta_threshold": 0.5,
    "ta_max_draws": 16,
}
#: The CPU recipe's generator: width 16, not 64. The reference width costs 30-70x a LeNet-5 teacher and student
#: together on a CPU; the CPU recipes of these methods were measured with it. Measured (2026-12-02, one thread on a
#: loaded machine): `dfkd distill --teacher examples/mnist_lenet5_bn.pt --method M --budget-minutes 2 -p ngf=W
#: --eval-data examples/mnist_test.npz`: dfad 14.7 % at width 16 (230 steps) against 8.9 % at 64 (30 steps), dfq
#: 17.4 % (270 steps) against 9.7 % (90 steps).
GAN_CPU: dict[str, Any] = {"ngf": 16}
CPU_WIDTH_REASON = ("generator width 16, not 64: demo teacher, 2 CPU-minutes: dfad 14.7 % against 8.9 %, dfq 17.4 % "
                    "against 9.7 % (more steps in the time)")


def generator_width(p: dict[str, Any], teacher: Teacher) -> int:
    """`ngf`; None only in runs saved before recipes resolved it, which keep the size rule they were made with."""
    return p["ngf"] or default_width(teacher_size(teacher))


class GANMethod(Method):
    """A method whose transfer data comes from a generator G(z) trained against the teacher (and the student).

    Subclasses implement `generator_loss(x)` and, where the default (G steps, then S steps on fresh samples) is
    not the paper's schedule, `round()`.
    """

    defaults: ClassVar[dict[str, Any]] = GAN_DEFAULTS
    cpu: ClassVar[dict[str, Any]] = GAN_CPU
    heldout: ClassVar[bool] = True
    needs: ClassVar[Needs] = {
        key: (lambda p: bool(p["ta_verify"]), "teacher verification is off; -p ta_verify=true turns it on")
        for key in ("ta_threshold", "ta_max_draws")}
    cpu_reason: ClassVar[str] = CPU_WIDTH_REASON
    cpu_any_cost: ClassVar[bool] = True  # generator width, batches, steps: a step's cost
    fit_steps_to_budget: ClassVar[bool] = False  # the recipe's student steps per generator step stay
    #: The run's learning-rate schedule decays the generator too (DFAD, ZSKT); DAFL's and DFQ's references keep
    #: their generator's rate constant and decay only the student.
    decay_generator: ClassVar[bool] = True
    #: The student is in eval mode during generator steps (zju-vipa's DFQ synthesizer): its BN statistics then
    #: move only on student batches. Else it stays in train mode, as in DFAD's, DAFL's and ZSKT's references.
    student_eval_in_g: ClassVar[bool] = False
    #: The subclass's own generator loss weighs the class-balance term `balance` (DFQ); else it is added here.
    own_balance: ClassVar[bool] = False

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        p = self.p
        generator = Generator(teacher.spec, nz=p["nz"], ngf=generator_width(p, teacher), head=p["head"],
                              bn_eps=p["bn_eps"])
        self.synth: GeneratorSynthesizer = GeneratorSynthesizer(
            generator, self._objective, p["batch_size"], p["lr_g"], tuple(p["betas_g"]), device,
            steps=p["g_steps"], grad_clip=p["grad_clip"])
        if self.decay_generator:
            self.track_lr(self.synth.optimizer)
        self.bn = BNInputs(teacher, self.name, p["input_stats"]) if self.uses_bn else None
        self._cache: dict[str, torch.Tensor] = {}

    def _objective(self, x: torch.Tensor, y: torch.Tensor | None) -> LossDict:
        del y
        if self.p["ta_verify"]:
            x = self._verified(x)
        if self.bn is not None:
            self.bn.set_active(True)
        was_training = self.student.training
        if self.student_eval_in_g:
            self.student.eval()
        try:
            with frozen(self.student):
                losses = self.generator_loss(x)
        finally:
            self.student.train(was_training)
            if self.bn is not None:
                self.bn.set_active(False)
        return self._with_balance(x, losses)

    def _with_balance(self, x: torch.Tensor, losses: LossDict) -> LossDict:
        """Add `balance` * DAFL's information entropy of the batch-mean teacher prediction (in nats), when set.

        Chen et al., "Data-Free Learning of Student Networks", ICCV 2019: minimising sum(pbar ln pbar) spreads
        the generator's batches over the classes.
        """
        weight = float(self.p["balance"] or 0.0)
        if self.own_balance or weight == 0.0:
            return losses
        balance = information_entropy(self.teacher(x), log_base=math.e)
        return {**losses, "loss": losses["loss"] + weight * balance, "loss/balance": balance}

    def _verified(self, x: torch.Tensor) -> torch.Tensor:
        """The samples of generated batch `x` the teacher verifies as clean (TA-DFKD); the mask is kept as `ta_mask`."""
        with torch.no_grad():
            self.ta_mask = clean_mask(self.teacher(x), float(self.p["ta_threshold"]))
        return x[self.ta_mask]

    def student_batch(self, n: int) -> torch.Tensor:
        """`n` fresh generated images; with `ta_verify`, only teacher-verified clean ones (up to `n`)."""
        x = self.synth.sample(n)
        return self.verified_from(x) if self.p["ta_verify"] else x

    def verified_from(self, x: torch.Tensor) -> torch.Tensor:
        """The clean samples of generated batch `x`, topped up from fresh batches (TA-DFKD); sets `ta_clean`."""
        first = [x]

        def draw(n: int) -> torch.Tensor:
            return first.pop() if first else self.synth.sample(n)

        x, self.ta_clean = verified_batch(draw, self.teacher, len(x), float(self.p["ta_threshold"]),
                                          int(self.p["ta_max_draws"]))
        return x

    def fresh_student_step(self) -> dict[str, float]:
        """One student step on a fresh batch (`student_batch`); logs the clean fraction under `ta_verify`."""
        losses = self.student_step(self.student_batch(self.p["batch_size"]))
        if self.p["ta_verify"]:
            losses = {**losses, "loss/ta_clean": self.ta_clean}
        return step_logs("student", losses)

    def generator_loss(self, x: torch.Tensor) -> LossDict:
        """The generator's objective on a generated batch `x` (teacher and student forwards happen here)."""
        raise NotImplementedError

    def generator_step(self) -> dict[str, float]:
        x, losses = self.synth.synthesize()
        self.last_images = x
        return step_logs("gen", losses)

    def round(self) -> dict[str, float]:
        n = self.student_steps_per_round
        logs = self.generator_step()
        for _ in self.student_steps(n):
            logs.update(self.fresh_student_step())
        return logs

    def close(self) -> None:
        if self.bn is not None:
            self.bn.close()
        super().close()
