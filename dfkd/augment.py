"""Differentiable augmentation of synthetic images (in normalised input space) before the teacher sees them.

Inversion methods optimise pixels or a generator through these, so every kind keeps the autograd graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.validate import AUGMENT_KINDS  # the choices of -p augment, checked before a run


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


class RandomCropFlip(nn.Module):
    """Per-sample random crop from a zero-padded batch plus a per-sample horizontal flip, by index gathering.

    The distribution of kornia's `RandomCrop(size, padding=p)` + `RandomHorizontalFlip(p=flip_p)` (zju-vipa CMI,
    Fast-DFKD) - a uniform offset in [0, 2p] along each axis of the padded image, a flip per sample - at a third of
    its CPU time (7.6 -> 2.5 ms forward+backward for 64 MNIST images): one pad and one gather, no affine warp.

    The padding is a black border, as the references pad their [0, 1] images before normalising them: `fill` is
    that 0 pixel in the normalised space these images live in (`InputSpec.black`). A 0 there is the training set's
    mean colour, a grey frame around MNIST-like images whose real background is black.

    Args:
        size: output (H, W).
        padding: padding on every side, in pixels.
        flip_p: probability that a sample is flipped horizontally.
        fill: the padding's value per channel (or one for all); 0 by default.

    Shape:
        - input: (B, C, H_in, W_in) with H_in + 2 * padding >= H and W_in + 2 * padding >= W
        - output: (B, C, H, W)
    """

    def __init__(self, size: tuple[int, int], padding: int, flip_p: float = 0.5,
                 fill: Sequence[float] | float = 0.0) -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.size, self.padding, self.flip_p = size, padding, flip_p
        self.fill = (float(fill),) if isinstance(fill, (int, float)) else tuple(float(f) for f in fill)

    def forward(self, x: Tensor) -> Tensor:
        b, (h, w), p = x.shape[0], self.size, self.padding
        span_y, span_x = x.shape[2] + 2 * p - h + 1, x.shape[3] + 2 * p - w + 1
        if span_y < 1 or span_x < 1:
            raise ValueError(f"cannot crop {self.size} from {tuple(x.shape[2:])} padded by {p}")
        # Offsets come from the CPU generator so torch.manual_seed makes runs repeatable on any device.
        oy = torch.randint(0, span_y, (b,))
        ox = torch.randint(0, span_x, (b,))
        flip = torch.rand(b) < self.flip_p
        rows = oy[:, None] + torch.arange(h)
        cols = ox[:, None] + torch.arange(w)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(b)[:, None, None]
        padded = self._pad(x, p) if p else x
        out = padded[batch.to(x.device), :, rows[:, :, None].to(x.device), cols[:, None, :].to(x.device)]
        return out.permute(0, 3, 1, 2)  # advanced indices first: (B, H, W, C) -> (B, C, H, W)

    def _pad(self, x: Tensor, p: int) -> Tensor:
        if len(set(self.fill)) == 1:  # one value (grey-scale, or the old 0): a single constant pad
            return F.pad(x, (p, p, p, p), value=self.fill[0])
        fill = x.new_tensor(self.fill).view(1, -1, 1, 1)
        return F.pad(x - fill, (p, p, p, p)) + fill

    def extra_repr(self) -> str:
        return f"size={self.size}, padding={self.padding}, flip_p={self.flip_p}, fill={self.fill}"


def make_augment(
    kind: str,
    size: int | tuple[int, int],
    jitter: int | None = None,
    flip_p: float = 0.5,
    scale: tuple[float, float] = (0.25, 1.0),
    fill: Sequence[float] | float = 0.0,
) -> nn.Module:
    """Build a differentiable augmentation module.

    Kinds: "none" (identity); "jitter_flip" (roll by up to `jitter` px + flip, NVlabs DeepInversion);
    "crop_flip" (`RandomCropFlip`: RandomCrop(size, padding=size//8) + RandomHorizontalFlip, zju-vipa CMI/Fast);
    "resized_crop" (kornia RandomResizedCrop(size, scale) + RandomHorizontalFlip, Fast-DFKD ImageNet).
    "crop_flip" and "resized_crop" draw a crop/flip per sample.

    Args:
        kind: one of `AUGMENT_KINDS`.
        size: output image size (H, W) or a single int for square images.
        jitter: maximum roll for "jitter_flip"; None means min(size) // 8 (4 px at 32x32, as zju-vipa).
        flip_p: horizontal-flip probability for every kind but "none".
        scale: area range of "resized_crop".
        fill: the padding of "crop_flip" per channel; pass the spec's `black` for normalised images.

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
    if kind == "crop_flip":
        return RandomCropFlip(hw, min(hw) // 8, flip_p, fill)
    if kind == "resized_crop":
        return _kornia_resized_crop(hw, flip_p, scale)
    raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(AUGMENT_KINDS)}")


def _kornia_resized_crop(hw: tuple[int, int], flip_p: float, scale: tuple[float, float]) -> nn.Module:
    import kornia.augmentation as K  # heavy import, only when a kornia augmentation is requested

    return nn.Sequential(K.RandomResizedCrop(hw, scale=scale), K.RandomHorizontalFlip(p=flip_p))
