"""TA-DFKD's teacher verification: train on the generated samples the teacher answers cleanly, drop the rest.

Shin & Choi, "Teacher as a Lenient Expert: Teacher-Agnostic Data-Free Knowledge Distillation", AAAI 2024. DFKD
methods that impose class priors on their generator fail catastrophically on some well-trained teachers; TA-DFKD
instead lets the teacher *verify* samples. Per generated batch (reference code `Sample_Selection.split`):

1. each sample's loss is the teacher's cross-entropy against its own arg-max, -log max softmax(t(x));
2. the losses are min-max normalised over the batch;
3. a two-component 1-D Gaussian mixture is fitted to them (DivideMix's clean/noisy split: at most 10 EM
   iterations, tolerance 1e-2, variance floor 5e-4);
4. a sample is clean when its posterior under the lower-mean component exceeds `ta_threshold` (paper: 0.5).

The student trains only on clean samples, drawn batch after batch until a full batch is clean; the generator's
adversarial loss is computed on the clean samples of its batch. The GAN methods take this as `-p ta_verify=true`
(off by default; `dfkd.methods._gan`).

Kept apart from the reference: the mixture starts from a deterministic 2-means split (scikit-learn's default
starts from a randomly seeded k-means, so the reference's selection is not reproducible); the refill stops after
`ta_max_draws` batches (the reference loops until full) and trains on the clean samples found; and at least
`MIN_KEEP` samples (the most confident) are kept, so that batch statistics stay defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: The reference's GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4).
GMM_ITERS, GMM_TOL, GMM_REG = 10, 1e-2, 5e-4
#: The fewest samples kept from a batch (BatchNorm statistics of one sample have no variance).
MIN_KEEP = 2


def verification_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the teacher's logits against its own arg-max (= -log of its top probability)."""
    return F.cross_entropy(t_logits.float(), t_logits.argmax(1), reduction="none")


def _normal_log_pdf(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + var.log() + (x[:, None] - mean) ** 2 / var)


def _estimate(x: torch.Tensor, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nk = resp.sum(0) + 1e-10
    mean = (resp * x[:, None]).sum(0) / nk
    var = (resp * (x[:, None] - mean) ** 2).sum(0) / nk + GMM_REG
    return nk / len(x), mean, var


def clean_probability(loss: torch.Tensor) -> torch.Tensor:
    """Posterior of the lower-mean component of a 2-component Gaussian mixture fitted to min-max-normalised `loss`.

    Shape:
        - Input: (N,) per-sample losses.
        - Output: (N,) probabilities in [0, 1]; all ones when the losses do not spread (nothing to split).
    """
    x = loss.detach().double().flatten()
    spread = x.max() - x.min() if len(x) else x.new_zeros(())
    if len(x) < 2 or spread <= 0:
        return torch.ones_like(x)
    x = (x - x.min()) / spread
    centers = x.new_tensor([0.0, 1.0])
    for _ in range(GMM_ITERS):  # 2-means from the two ends: the mixture's deterministic start
        hard = ((x[:, None] - centers).abs().argmin(1) == 1).double()
        centers = torch.stack([_masked_mean(x, 1 - hard, centers[0]), _masked_mean(x, hard, centers[1])])
    weights, mean, var = _estimate(x, torch.stack([1 - hard, hard], 1))
    bound = -math.inf
    for _ in range(GMM_ITERS):
        joint = _normal_log_pdf(x, mean, var) + weights.log()
        norm = torch.logsumexp(joint, 1, keepdim=True)
        resp = (joint - norm).exp()
        weights, mean, var = _estimate(x, resp)
        new_bound = float(norm.mean())
        if abs(new_bound - bound) < GMM_TOL:
            break
        bound = new_bound
    joint = _normal_log_pdf(x, mean, var) + weights.log()
    post = (joint - torch.logsumexp(joint, 1, keepdim=True)).exp()
    return post[:, int(mean.argmin())].to(loss.dtype)


def _masked_mean(x: torch.Tensor, w: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    return (w * x).sum() / w.sum() if w.sum() > 0 else fallback


def clean_mask(t_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Which samples the teacher verifies as clean: posterior of the low-loss component above `threshold`.

    At least `MIN_KEEP` samples (the lowest-loss ones) are kept when the batch has that many.

    Shape:
        - Input: (N, K) teacher logits.
        - Output: (N,) bool.
    """
    loss = verification_loss(t_logits)
    mask = clean_probability(loss) > threshold
    keep = min(MIN_KEEP, len(loss))
    if int(mask.sum()) < keep:
        mask[loss.argsort()[:keep]] = True
    return mask


@torch.no_grad()
def verified_batch(draw: Callable[[int], torch.Tensor], teacher: Callable[[torch.Tensor], torch.Tensor], n: int,
                   threshold: float, max_draws: int) -> tuple[torch.Tensor, float]:
    """Up to `n` clean samples, from batches of `n` drawn with `draw(n)` until `n` are clean or `max_draws` were drawn.

    Returns:
        The clean images, and the fraction of the drawn samples that were clean.
    """
    xs, kept, drawn = [], 0, 0
    for _ in range(max_draws):
        x = draw(n)
        mask = clean_mask(teacher(x), threshold)
        xs.append(x[mask])
        kept, drawn = kept + int(mask.sum()), drawn + len(x)
        if kept >= n:
            break
    return torch.cat(xs)[:n], kept / max(drawn, 1)
