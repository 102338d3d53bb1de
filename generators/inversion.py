"""Model inversion (DeepInversion family): a learnable batch of input pixels optimised against the teacher.

Each `synthesize()` starts a fresh batch, optimises it for `iterations` Adam steps on an objective the method
supplies (BN statistics, class scores, image priors, a competition term), and keeps the lowest-loss batch, which it
pushes into an image pool the student samples from. NVlabs/DeepInversion `DeepInversionClass.get_images`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.augment import JitterFlip
from dfkd.generators.base import LossDict, Synthesizer
from dfkd.generators.pool import ImagePool, PoolServed
from dfkd.precision import backward, step
from dfkd.spec import InputSpec

#: objective(x, y) -> losses with "loss": x is the augmented view of the batch the teacher sees, y its targets.
InversionObjective = Callable[[Tensor, Tensor], LossDict]
#: labeler(x) -> soft labels kept with each batch in the pool (e.g. the teacher's logits), or None.
Labeler = Callable[[Tensor], Tensor]


def balanced_targets(n: int, num_classes: int) -> Tensor:
    """`n` class targets, every class `n // K` or `n // K + 1` times (which classes get one more is random).

    Args:
        n: batch size (any).
        num_classes: K.

    Returns:
        Sorted class indices (sorted so image grids read class by class).

    Shape:
        - output: (n,)
    """
    reps = -(-n // num_classes)
    return torch.randperm(num_classes).repeat(reps)[:n].sort().values


def init_batch(spec: InputSpec, n: int, kind: str = "randn") -> Tensor:
    """The starting pixels: "randn" N(0, 1) in normalised space (NVlabs) or "zeroq" (randint[0,255) - 127.5) / 5418.75.

    Args:
        spec: the teacher's input spec.
        n: batch size.
        kind: "randn" or "zeroq".

    Returns:
        A batch in normalised input space.

    Shape:
        - output: (n, C, H, W)
    """
    if kind == "randn":
        return torch.randn(spec.shape(n))
    if kind == "zeroq":
        return (torch.randint(0, 255, spec.shape(n)).float() - 127.5) / 5418.75
    raise ValueError(f"unknown inversion init {kind!r}: use randn or zeroq")


def warmup_cosine(i: int, total: int, warmup: int) -> float:
    """NVlabs `lr_cosine_policy`: linear warm-up over `warmup` iterations, then cosine to 0 at `total`."""
    if i < warmup:
        return (i + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(total - warmup, 1)))


def low_res(x: Tensor) -> Tensor:
    """2x average-pooled view, upsampled back (nearest) so fixed-size teachers still get their input size."""
    return F.interpolate(F.avg_pool2d(x, 2), size=x.shape[-2:], mode="nearest")


def keep_best(best: tuple[Tensor, Tensor, LossDict] | None, value: Tensor, x: Tensor,
              losses: LossDict) -> tuple[Tensor, Tensor, LossDict]:
    """(loss, batch, losses) of the lowest loss so far, chosen on the device (no host sync per iteration).

    Args:
        best: the best so far, or None at the first iteration.
        value: this iteration's total loss (0-dim, detached).
        x: this iteration's batch (detached; copied, as the optimiser changes it in place).
        losses: this iteration's losses.

    Returns:
        The new best: this iteration's where its loss is lower (a NaN loss never wins), else `best`.
    """
    if best is None:
        return value, x.clone(), {k: v.detach() for k, v in losses.items()}
    better = value < best[0]
    return (torch.where(better, value, best[0]), torch.where(better, x, best[1]),
            {k: torch.where(better, v.detach(), best[2][k]) for k, v in losses.items()})


class InversionSynthesizer(PoolServed, Synthesizer):
    """Optimises input batches against the teacher; serves the student from a pool of the best ones.

    Args:
        spec: the teacher's input spec (shape, pixel range for clipping).
        objective: the method's loss on the augmented batch and its targets.
        num_classes: classes to draw balanced targets from.
        batch_size: images per synthesized batch.
        iterations: optimisation steps per batch (all stages together).
        lr: Adam learning rate.
        betas: Adam betas.
        jitter: random roll of up to this many pixels before each teacher forward (half of it in the low-res stage).
        flip_p: probability of a horizontal flip before each forward.
        clip: clamp pixels to the valid range after each step.
        warmup: fraction of each stage's iterations spent on linear learning-rate warm-up (cosine decay after).
        lowres: fraction of the iterations optimised through a 2x average-pooled view (NVlabs setting 0).
        schedule: "cosine" (warm-up + cosine per stage), "constant" (NVlabs' CIFAR script) or "plateau" (ZeroQ:
            ReduceLROnPlateau on the loss).
        patience: plateau patience in iterations.
        min_lr: plateau's smallest learning rate.
        init: starting pixels, see `init_batch`.
        pool: where each batch goes (None: a pool of 64 batches).
        labeler: soft labels stored with each batch in the pool.
        device: where the batch is optimised.

    Shape:
        - synthesize: (batch_size, C, H, W)
        - sample: (n, C, H, W)
    """

    def __init__(self, spec: InputSpec, objective: InversionObjective, num_classes: int, batch_size: int,
                 iterations: int, lr: float, betas: tuple[float, float] = (0.5, 0.9), *, jitter: int = 2,
                 flip_p: float = 0.0, clip: bool = True, warmup: float = 0.05, lowres: float = 0.0,
                 schedule: str = "cosine", patience: int = 100, min_lr: float = 1e-4, init: str = "randn",
                 pool: ImagePool | None = None, labeler: Labeler | None = None,
                 device: torch.device | str = "cpu") -> None:
        if schedule not in ("cosine", "constant", "plateau"):
            raise ValueError(f"unknown inversion schedule {schedule!r}: use cosine, constant or plateau")
        self.spec, self.objective, self.num_classes = spec, objective, num_classes
        self.batch_size, self.iterations, self.lr, self.betas = batch_size, iterations, lr, tuple(betas)
        self.jitter, self.flip_p, self.clip, self.warmup, self.lowres = jitter, flip_p, clip, warmup, lowres
        self.schedule, self.patience, self.min_lr, self.init = schedule, patience, min_lr, init
        self.pool = pool if pool is not None else ImagePool(64 * batch_size)
        self.labeler, self.device = labeler, torch.device(device)
        self.time_limit: float | None = None  # seconds a batch may take; None = no limit
        self.clock: Callable[[], float] = time.perf_counter  # what time_limit counts (a method sets its budget's)
        self.batches = 0
        self._stop = False

    # --- control ------------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Make the running (or next) `synthesize()` return its best batch after the current iteration."""
        self._stop = True

    def _should_stop(self, start: float) -> bool:
        return self._stop or (self.time_limit is not None and self.clock() - start > self.time_limit)

    def stages(self, iterations: int) -> list[tuple[int, bool]]:
        """(iterations, low resolution?) per stage: the low-res stage first, when there is one."""
        low = int(round(self.lowres * iterations)) if iterations > 1 else 0
        return [(n, lo) for n, lo in ((low, True), (iterations - low, False)) if n > 0]

    # --- synthesis ----------------------------------------------------------------------------------------
    def synthesize(self, iterations: int | None = None) -> tuple[Tensor, LossDict]:
        """Optimise one fresh batch, push its best version into the pool, and return it.

        Args:
            iterations: cap for this batch (default: `self.iterations`).

        Returns:
            (the lowest-loss batch of the last stage that ran, detached; the losses of that iteration, or {} when
            no iteration ran).
        """
        y = balanced_targets(self.batch_size, self.num_classes).to(self.device)
        x = init_batch(self.spec, self.batch_size, self.init).to(self.device)
        x = (self.spec.clip(x) if self.clip else x).requires_grad_(True)
        start = self.clock()
        best: tuple[Tensor | float, Tensor, LossDict] = (math.inf, x.detach().clone(), {})
        for n, lo in self.stages(self.iterations if iterations is None else iterations):
            # A later stage's best replaces an earlier one's: low-res losses are not comparable with full-res ones.
            best = self._stage(x, y, n, lo, start) or best
        self._stop = False
        images = best[1]
        labels = self.labeler(images) if self.labeler is not None else None
        self.pool.add(images, labels)
        self.batches += 1
        return images, best[2]

    def _optimizer(self, x: Tensor, iterations: int) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.Adam([x], lr=self.lr, betas=self.betas, eps=1e-8)
        plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=self.patience, min_lr=self.min_lr)
                   if self.schedule == "plateau" else None)
        return opt, plateau

    def _stage(self, x: Tensor, y: Tensor, iterations: int, lowres: bool,
               start: float) -> tuple[Tensor, Tensor, LossDict] | None:
        best: tuple[Tensor, Tensor, LossDict] | None = None
        opt, plateau = self._optimizer(x, iterations)
        augment = JitterFlip(self.jitter // 2 if lowres else self.jitter, self.flip_p)
        warmup = max(1, int(round(self.warmup * iterations))) if self.warmup > 0 else 0
        for i in range(iterations):
            if i > 0 and self._should_stop(start):  # one iteration at least: a pooled batch is never pure noise
                break
            if self.schedule == "cosine":
                opt.param_groups[0]["lr"] = self.lr * warmup_cosine(i, iterations, warmup)
            losses = self.objective(augment(low_res(x) if lowres else x), y)
            loss = losses["loss"]
            best = keep_best(best, loss.detach(), x.detach(), losses)  # x before this step is what `loss` scores
            opt.zero_grad(set_to_none=True)
            backward(loss)
            step(opt)
            if plateau is not None:
                plateau.step(loss.detach())  # reads the loss back: the plateau schedule waits for the device
            if self.clip:
                with torch.no_grad():
                    x.copy_(self.spec.clip(x))
        return best
