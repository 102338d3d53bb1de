"""Differentiable augmentation of synthetic images (in normalised input space) before the teacher sees them.

Inversion methods optimise pixels or a generator through these, so every kind keeps the autograd graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

AUGMENT_KINDS = ("none", "jitter_flip", "crop_flip", "resized_crop")


class JitterFlip(nn.Module):
    """Random integer roll of the whole batch plus a random horizontal flip.

    Yin et al., "Dreaming to Distill" (DeepInversion), CVPR 2020; NVlabs `torch.roll` jitter and `--do_flip`.
    One offset and one flip decision per batch, as in the reference; both are index permutations, so
    gradients pass through unchanged.

    Args:
        jitter: maximum shift in pixels along each spatial dim (offsets drawn from [-jitter, jitter]).
        flip_p: probability of flipping the batch horizontally; 0 disables flipping.

    Shape:
        - input: (B, C, H, W)
        - output: (B, C, H, W)
    """

    def __init__(self, jitter: int, flip_p: float = 0.5) -> None:
        super().__init__()
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.jitter = jitter
        self.flip_p = flip_p

    def forward(self, x: Tensor) -> Tensor:
        # Offsets come from the CPU generator so torch.manual_seed makes runs repeatable on any device.
        dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist()
        if dy or dx:
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if self.flip_p > 0 and torch.rand(()).item() < self.flip_p:
            x = torch.flip(x, dims=(3,))
        return x

    def extra_repr(self) -> str:
        return f"jitter={self.jitter}, flip_p={self.flip_p}"


def make_augment(
    kind: str,
    size: int | tuple[int, int],
    jitter: int | None = None,
    flip_p: float = 0.5,
    scale: tuple[float, float] = (0.25, 1.0),
) -> nn.Module:
    """Build a differentiable augmentation module.

    Kinds: "none" (identity); "jitter_flip" (roll by up to `jitter` px + flip, NVlabs DeepInversion);
    "crop_flip" (kornia RandomCrop(size, padding=size//8) + RandomHorizontalFlip, zju-vipa CMI/Fast);
    "resized_crop" (kornia RandomResizedCrop(size, scale) + RandomHorizontalFlip, Fast-DFKD ImageNet).
    The kornia kinds draw a crop/flip per sample.

    Args:
        kind: one of `AUGMENT_KINDS`.
        size: output image size (H, W) or a single int for square images.
        jitter: maximum roll for "jitter_flip"; None means min(size) // 8 (4 px at 32x32, as zju-vipa).
        flip_p: horizontal-flip probability for every kind but "none".
        scale: area range of "resized_crop".

    Returns:
        A module mapping (B, C, H, W) images to (B, C, *size) images, for any C and device.

    Shape:
        - input: (B, C, H, W)
        - output: (B, C, size[0], size[1])
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if kind == "none":
        return nn.Identity()
    if kind == "jitter_flip":
        return JitterFlip(min(hw) // 8 if jitter is None else jitter, flip_p)
    if kind in ("crop_flip", "resized_crop"):
        return _kornia_augment(kind, hw, flip_p, scale)
    raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(AUGMENT_KINDS)}")


def _kornia_augment(kind: str, hw: tuple[int, int], flip_p: float, scale: tuple[float, float]) -> nn.Module:
    import kornia.augmentation as K  # heavy import, only when a kornia augmentation is requested

    if kind == "crop_flip":
        crop: nn.Module = K.RandomCrop(hw, padding=min(hw) // 8)
    else:
        crop = K.RandomResizedCrop(hw, scale=scale)
    return nn.Sequential(crop, K.RandomHorizontalFlip(p=flip_p))
