"""BatchNorm-statistics ("feature distribution") losses on plain tensors.

Every loss takes `layers`: one `(x, running_mean, running_var)` tuple per BatchNorm layer, where `x` is
the layer's INPUT, (B, C, H, W) or (B, C). Running statistics are constants: they are detached here so
no gradient reaches the teacher's buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dfkd.losses._registry import LOSSES
from dfkd.precision import fp32

BNLayer = tuple[Tensor, Tensor, Tensor]
EmaStats = tuple[Tensor, Tensor]


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance over every dim but the channel dim (1).

    Args:
        x: a BatchNorm input.

    Returns:
        (mean, var), the statistics BatchNorm itself uses in training mode.

    Shape:
        - x: (B, C, *)
        - output: (C,), (C,)
    """
    x = fp32(x)  # the statistics are matched in fp32, also under autocast
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dim=dims), x.var(dim=dims, correction=0)


def _check(layers: Sequence[BNLayer]) -> None:
    if len(layers) == 0:
        raise ValueError("BN-statistics loss got no layers: the model has no hooked BatchNorm layers")


def _di_term(mean: Tensor, var: Tensor, rm: Tensor, rv: Tensor) -> Tensor:
    return torch.norm(var - rv.detach(), 2) + torch.norm(mean - rm.detach(), 2)


@LOSSES.register("bn_di")
def bn_deepinversion(layers: Sequence[BNLayer], first_multiplier: float = 1.0) -> Tensor:
    """DeepInversion feature-distribution loss.

    Yin et al., "Dreaming to Distill" (DeepInversion), CVPR 2020; NVlabs/DeepInversion `DeepInversionFeatureHook`.

    R = sum_l w_l (||var_l - rv_l||_2 + ||mu_l - rm_l||_2), plain (not squared) L2 norms over channels,
    biased batch variance, w_0 = `first_multiplier`, w_l = 1 otherwise.

    Args:
        layers: `(x, running_mean, running_var)` per BatchNorm layer, in forward order.
        first_multiplier: weight of the first layer (NVlabs ImageNet `first_bn_multiplier` = 10; 1 = CIFAR script).

    Returns:
        The loss, a scalar.

    Shape:
        - x: (B, C, H, W) or (B, C); running_mean, running_var: (C,)
        - output: ()
    """
    _check(layers)
    weights = [first_multiplier] + [1.0] * (len(layers) - 1)
    return torch.stack([w * _di_term(*batch_stats(x), rm, rv) for w, (x, rm, rv) in zip(weights, layers)]).sum()


@LOSSES.register("bn_dfq")
def bn_dfq(layers: Sequence[BNLayer], eps: float = 1e-5) -> Tensor:
    """Per-channel Gaussian KL between batch statistics and BatchNorm running statistics.

    Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation", CVPRW 2020
    (da2so re-implementation, `hook_for_BNLoss`).

    KL(N(mu, s^2) || N(rm, rv)) = ((mu - rm)^2 + s^2) / (2 rv) - log(s / sqrt(rv)) - 1/2 with the biased
    batch variance s^2; reduced by SUMMING over channels and over layers. `eps` is added to both
    variances (the reference adds none) so that dead channels stay finite; the KL is still exactly 0
    when the batch statistics equal the running ones.

    Args:
        layers: `(x, running_mean, running_var)` per BatchNorm layer.
        eps: added to both variances.

    Returns:
        The loss, a scalar.

    Shape:
        - x: (B, C, H, W) or (B, C); running_mean, running_var: (C,)
        - output: ()
    """
    _check(layers)
    total = torch.zeros((), device=layers[0][0].device, dtype=layers[0][0].dtype)
    for x, rm, rv in layers:
        mean, var = batch_stats(x)
        var, rv = var + eps, rv.detach() + eps
        kl = ((mean - rm.detach()) ** 2 + var) / (2 * rv) - 0.5 * torch.log(var / rv) - 0.5
        total = total + kl.sum()
    return total


def _sample_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    flat = fp32(x).reshape(x.shape[0], x.shape[1], -1)  # fp32, also under autocast
    # ZeroQ uses torch.var's default (unbiased); a single spatial position has no spread at all.
    correction = 1 if flat.shape[2] > 1 else 0
    return flat.mean(dim=2), torch.sqrt(flat.var(dim=2, correction=correction) + eps)


def _zeroq_term(mean_i: Tensor, std_i: Tensor, target_mean: Tensor, target_std: Tensor) -> Tensor:
    batch = mean_i.shape[0]
    return ((target_mean - mean_i).norm() ** 2 + (target_std - std_i).norm() ** 2) / batch


@LOSSES.register("bn_zeroq")
def bn_zeroq(layers: Sequence[BNLayer], eps: float = 1e-6) -> Tensor:
    """ZeroQ per-sample BatchNorm-statistics loss (squared).

    Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020; amirgholami/ZeroQ `distill_data.py`.

    For every sample i and channel c: mu_ic, sigma_ic = sqrt(var_ic + eps) over the spatial positions
    (unbiased variance, as torch.var's default in the reference). Loss = sum_l (||rm - mu||_F^2 +
    ||sqrt(rv + eps) - sigma||_F^2) / B. Add `input_prior_zeroq` for the image term of the paper.

    Args:
        layers: `(x, running_mean, running_var)` per BatchNorm layer (x = conv output = BN input).
        eps: added to every variance before the square root.

    Returns:
        The loss, a scalar.

    Shape:
        - x: (B, C, H, W) or (B, C) (the latter: mean x, std sqrt(eps)); running stats: (C,)
        - output: ()
    """
    _check(layers)
    total = torch.zeros((), device=layers[0][0].device, dtype=layers[0][0].dtype)
    for x, rm, rv in layers:
        mean_i, std_i = _sample_stats(x, eps)
        total = total + _zeroq_term(mean_i, std_i, rm.detach(), torch.sqrt(rv.detach() + eps))
    return total


@LOSSES.register("input_zeroq")
def input_prior_zeroq(x: Tensor, eps: float = 1e-6) -> Tensor:
    """ZeroQ input-image term: per-sample channel statistics pulled to mean 0 and std 1.

    Cai et al., "ZeroQ", CVPR 2020; amirgholami/ZeroQ `distill_data.py`.

    Args:
        x: images in normalised input space.
        eps: added to the variance before the square root.

    Returns:
        (||mu||_F^2 + ||1 - sigma||_F^2) / B, a scalar.

    Shape:
        - x: (B, C, H, W)
        - output: ()
    """
    mean_i, std_i = _sample_stats(x, eps)
    return _zeroq_term(mean_i, std_i, torch.zeros_like(mean_i[0]), torch.ones_like(std_i[0]))


@LOSSES.register("bn_momentum")
def bn_momentum(
    layers: Sequence[BNLayer],
    ema: Sequence[EmaStats | None] | None,
    m: float = 0.9,
) -> Tensor:
    """Fast-DFKD BatchNorm loss against a momentum blend of the current and past batch statistics.

    Fang et al., "Up to 100x Faster Data-free Knowledge Distillation" (Fast-DFKD), AAAI 2022;
    zju-vipa/Fast-Datafree `DeepInversionHook(module, mmt_rate)`.

    Per layer: ||rv - ((1-m) var + m ema_var)||_2 + ||rm - ((1-m) mu + m ema_mu)||_2; a layer whose
    EMA is None (first round) uses the plain DeepInversion term.

    Args:
        layers: `(x, running_mean, running_var)` per BatchNorm layer.
        ema: `(ema_mean, ema_var)` or None per layer, or None for all layers; see `update_bn_ema`.
        m: momentum (`--bn_mmt`, 0.9 in all Fast-DFKD scripts).

    Returns:
        The loss, a scalar.

    Shape:
        - x: (B, C, H, W) or (B, C); running stats and EMA stats: (C,)
        - output: ()
    """
    _check(layers)
    ema = [None] * len(layers) if ema is None else ema
    if len(ema) != len(layers):
        raise ValueError(f"bn_momentum: {len(ema)} EMA entries for {len(layers)} BatchNorm layers")
    total = torch.zeros((), device=layers[0][0].device, dtype=layers[0][0].dtype)
    for (x, rm, rv), prev in zip(layers, ema):
        mean, var = batch_stats(x)
        if prev is not None:
            mean = (1 - m) * mean + m * prev[0].detach()
            var = (1 - m) * var + m * prev[1].detach()
        total = total + _di_term(mean, var, rm, rv)
    return total


def update_bn_ema(
    layers: Sequence[BNLayer],
    ema: Sequence[EmaStats | None] | None,
    m: float = 0.9,
) -> list[EmaStats]:
    """Fold this round's batch statistics into the Fast-DFKD EMA (call once after each synthesis round).

    Args:
        layers: `(x, running_mean, running_var)` per BatchNorm layer, from the round's last forward.
        ema: the previous EMA (None, or None entries, on the first round).
        m: momentum; new = m * old + (1 - m) * current.

    Returns:
        The new detached `(ema_mean, ema_var)` per layer.

    Shape:
        - x: (B, C, H, W) or (B, C)
        - output: list of ((C,), (C,))
    """
    ema = [None] * len(layers) if ema is None else ema
    if len(ema) != len(layers):
        raise ValueError(f"update_bn_ema: {len(ema)} EMA entries for {len(layers)} BatchNorm layers")
    out: list[EmaStats] = []
    for (x, _, _), prev in zip(layers, ema):
        mean, var = (s.detach() for s in batch_stats(x))
        if prev is not None:
            mean, var = m * prev[0].detach() + (1 - m) * mean, m * prev[1].detach() + (1 - m) * var
        out.append((mean, var))
    return out
