"""Zero-shot softmax-space sampling (ZSKD "data impressions"): Dirichlet soft targets, then inputs optimised to them.

Nayak et al., "Zero-Shot Knowledge Distillation in Deep Networks", ICML 2019 (vcl-iisc/ZSKD). The class similarity
comes from the teacher's final-layer weights; soft targets for class k are drawn from Dir(beta * C[k] + 1e-4) at
two concentrations; a batch of pixels is optimised so the teacher's temperature-softened output matches them. The
batches go to an `ImagePool` the student samples from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.generators.base import LossDict, Synthesizer
from dfkd.generators.inversion import balanced_targets
from dfkd.generators.pool import ImagePool, PoolServed
from dfkd.losses import soft_cross_entropy
from dfkd.precision import backward, step
from dfkd.spec import InputSpec

#: Added to every concentration so no class has a zero parameter (vcl-iisc/ZSKD `generateDirch`).
ALPHA_FLOOR = 1e-4


def _minmax(x: Tensor, dim: int | None = None) -> Tensor:
    lo = x.min() if dim is None else x.min(dim, keepdim=True).values
    hi = x.max() if dim is None else x.max(dim, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def class_similarity(weight: Tensor) -> Tensor:
    """Cosine similarity of the class vectors of a final Linear layer, min-max normalised to [0, 1].

    ZSKD `dirichmat.py`: each class's weight vector to unit L2 norm, C = W^T W, then (C - min) / (max - min) over
    the whole matrix.

    Args:
        weight: the layer's weight as torch stores it, one row per class.

    Returns:
        The symmetric similarity matrix; its diagonal (self-similarity) is 1.

    Shape:
        - weight: (K, D)
        - output: (K, K)
    """
    w = F.normalize(weight.detach().float(), dim=1)
    return _minmax(w @ w.T)


def concentration(similarity: Tensor, beta: float) -> Tensor:
    """Dirichlet parameters per class: beta * (row k of C, min-max normalised) + 1e-4.

    Args:
        similarity: the class similarity matrix.
        beta: the scale (ZSKD uses 1.0 and 0.1; smaller gives peakier targets).

    Returns:
        Row k holds the concentration of the targets for class k.

    Shape:
        - similarity: (K, K)
        - output: (K, K)
    """
    return beta * _minmax(similarity, dim=1) + ALPHA_FLOOR


def dirichlet_targets(similarity: Tensor, classes: Tensor, beta: float) -> Tensor:
    """One soft target per entry of `classes`, y ~ Dir(concentration(C, beta)[class]) (torch's RNG).

    Args:
        similarity: the class similarity matrix.
        classes: the class each target is drawn for.
        beta: the concentration scale.

    Returns:
        Probability vectors (rows sum to 1).

    Shape:
        - similarity: (K, K)
        - classes: (B,)
        - output: (B, K)
    """
    alpha = concentration(similarity, beta)[classes]
    y = torch.distributions.Dirichlet(alpha).sample()
    return y / y.sum(1, keepdim=True)  # exact sums despite gamma draws that underflow for tiny alpha


def mixed_targets(similarity: Tensor, classes: Tensor, betas: Sequence[float]) -> Tensor:
    """Targets where sample i uses beta `betas[i % len(betas)]`: each beta gets an equal share of every class.

    Shape:
        - classes: (B,), sorted or not
        - output: (B, K)
    """
    y = torch.empty(classes.shape[0], similarity.shape[0], device=similarity.device)
    for j, beta in enumerate(betas):
        y[j::len(betas)] = dirichlet_targets(similarity, classes[j::len(betas)], beta)
    return y


def impression_loss(logits: Tensor, targets: Tensor, T: float) -> Tensor:
    """ZSKD's input objective CE(y, softmax(logits / T)), batch mean (no T^2: it is not a KD loss).

    Shape:
        - logits, targets: (B, K)
        - output: ()
    """
    return soft_cross_entropy(logits, targets, T=T, scale_T2=False)


class DirichletSynthesizer(PoolServed, Synthesizer):
    """Makes batches of data impressions and keeps them in a pool.

    Each `synthesize()` draws balanced classes and mixed-beta Dirichlet targets, starts from uniform pixels in
    [0, 1] and takes `iterations` Adam steps on `impression_loss` (pixels parameterised in [0, 1], as the
    reference, so `lr` is in pixel units; clamped to [0, 1] after each step where the reference min-max rescales).

    Args:
        teacher: maps a normalised batch to logits (frozen by the caller).
        spec: the teacher's input spec.
        similarity: the class similarity matrix (`class_similarity`).
        pool: where each batch goes (in normalised space).
        batch_size: impressions per batch.
        iterations: optimisation steps per batch.
        lr: Adam learning rate on [0, 1] pixels.
        T: temperature of the teacher's softmax in the objective.
        betas: the concentration scales, sharing every batch equally.
        device: where the batch is optimised.

    Shape:
        - synthesize: (batch_size, C, H, W), normalised space
        - sample: (n, C, H, W)
    """

    def __init__(self, teacher: Callable[[Tensor], Tensor], spec: InputSpec, similarity: Tensor, pool: ImagePool,
                 batch_size: int, iterations: int, lr: float, T: float = 20.0,
                 betas: Sequence[float] = (1.0, 0.1), device: torch.device | str = "cpu") -> None:
        self.teacher, self.spec, self.pool = teacher, spec, pool
        self.device = torch.device(device)
        self.similarity = similarity.to(self.device)
        self.batch_size, self.iterations, self.lr, self.T = batch_size, iterations, lr, T
        self.betas = tuple(float(b) for b in betas)
        self.batches = 0
        self.time_limit: float | None = None  # seconds a batch may take (one iteration at least); None = no limit
        self.last_iterations = 0  # iterations the last batch took

    def targets(self, n: int) -> Tensor:
        """`n` soft targets over balanced classes, the betas sharing them equally."""
        classes = balanced_targets(n, self.similarity.shape[0]).to(self.device)
        return mixed_targets(self.similarity, classes, self.betas)

    def optimise(self, y: Tensor, iterations: int | None = None) -> tuple[Tensor, LossDict]:
        """Pixels optimised towards targets `y` for `iterations` steps (default: the recipe's) or `time_limit`.

        Returns:
            The batch (normalised, detached) and its losses.
        """
        x01 = torch.rand(self.spec.shape(y.shape[0]), device=self.device, requires_grad=True)
        opt = torch.optim.Adam([x01], lr=self.lr)
        first = None
        start, self.last_iterations = time.perf_counter(), 0
        for i in range(self.iterations if iterations is None else iterations):
            if i > 0 and self.time_limit is not None and time.perf_counter() - start > self.time_limit:
                break
            self.last_iterations += 1
            loss = impression_loss(self.teacher(self.spec.normalize(x01)), y, self.T)
            first = loss.detach() if first is None else first
            opt.zero_grad(set_to_none=True)
            backward(loss)
            step(opt)
            with torch.no_grad():
                x01.clamp_(0.0, 1.0)
        x = self.spec.normalize(x01.detach())
        with torch.no_grad():
            last = impression_loss(self.teacher(x), y, self.T)
        return x, {"loss": last, "loss/ce": last, "loss/ce_start": last if first is None else first}

    def synthesize(self, iterations: int | None = None) -> tuple[Tensor, LossDict]:
        """One batch of impressions (`iterations` steps, default the recipe's) into the pool."""
        x, losses = self.optimise(self.targets(self.batch_size), iterations)
        self.pool.add(x)
        self.batches += 1
        return x, losses
