"""Image priors on synthetic inputs: total variation and L2 norm."""

from __future__ import annotations

import torch
from torch import Tensor

from dfkd.losses._registry import LOSSES


def _diffs(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Horizontal, vertical and the two diagonal finite differences, as NVlabs `get_image_prior_losses`."""
    return (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )


@LOSSES.register("tv_l1")
def tv_l1(x: Tensor) -> Tensor:
    """Anisotropic total variation: sum over four directions of the mean absolute difference.

    Yin et al., "Dreaming to Distill" (DeepInversion), CVPR 2020; NVlabs `get_image_prior_losses`.

    Args:
        x: images.

    Returns:
        sum_d mean |diff_d|, a scalar.

    Shape:
        - x: (B, C, H, W) with H, W >= 2
        - output: ()
    """
    return torch.stack([d.abs().mean() for d in _diffs(x)]).sum()


@LOSSES.register("tv_l2")
def tv_l2(x: Tensor) -> Tensor:
    """Total variation as the sum over four directions of the (not squared) Frobenius norm of the difference.

    Yin et al., "Dreaming to Distill" (DeepInversion), CVPR 2020; NVlabs `get_image_prior_losses`.

    Args:
        x: images.

    Returns:
        sum_d ||diff_d||_F, a scalar.

    Shape:
        - x: (B, C, H, W) with H, W >= 2
        - output: ()
    """
    return torch.stack([torch.norm(d) for d in _diffs(x)]).sum()


@LOSSES.register("l2")
def l2_prior(x: Tensor, per_sample: bool = True) -> Tensor:
    """L2 norm of the images.

    Yin et al., "Dreaming to Distill" (DeepInversion), CVPR 2020; NVlabs ImageNet (per sample) and
    CIFAR (whole batch) scripts.

    Args:
        x: images.
        per_sample: True: mean over samples of each sample's L2 norm (ImageNet path); False: Frobenius
            norm of the whole batch (CIFAR path).

    Returns:
        The norm, a scalar.

    Shape:
        - x: (B, *)
        - output: ()
    """
    if per_sample:
        return torch.norm(x.reshape(x.shape[0], -1), dim=1).mean()
    return torch.norm(x)
