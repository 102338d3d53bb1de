"""The DCGAN-lite generator of DAFL/DFAD/ZSKT/zju-vipa, with its output heads, sized to the input."""

from __future__ import annotations

import math

import torch
from torch import nn

from dfkd._registry import Registry
from dfkd.spec import InputSpec

GENERATORS: Registry[type[nn.Module]] = Registry("generator")


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 upsampling by broadcasting: the same values as `nn.Upsample(scale_factor=2)`.

    On the CPU, `upsample_nearest2d` spends most of its time in a memory-format copy; this view-and-reshape form
    halved the generator's forward time at batch 512 (the generator is the cost of GAN methods on a CPU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


def layout(hw: tuple[int, int], ngf: int) -> tuple[tuple[int, int], list[int]]:
    """Start grid (height, width) and per-upsampling output widths of a generator making `hw` images.

    Up to 32 px: the references' 32 px generator (start at ceil(size / 4), two upsamplings to 2 * ngf and ngf
    channels: DAFL, DFAD, ZSKT, zju-vipa `Generator`). Larger: a fixed small start (5-8 px: 7 at 224, 8 at 64) and
    as many x2 upsamplings as it takes, as zju-vipa's `DeepGenerator` for 224 px ImageNet (7 x 7, five
    upsamplings), so the first Linear stays small (1.6 M parameters at nz 256 / ngf 64, not 103 M); widths halve
    with each upsampling past the second, down to max(ngf / 4, 8), so the full-resolution maps stay affordable
    (the reference keeps ngf channels at every stage). A non-square image takes the upsamplings of its longer side
    and a start grid of the same aspect (28 x 56: 4 x 7, three upsamplings); the output is cropped to `hw`.
    """
    size = max(hw)
    if size <= 32:
        ups, widths = 2, [2 * ngf, ngf]
    else:
        ups, floor = math.ceil(math.log2(size / 8)), max(ngf // 4, 8)
        widths = [max(2 * ngf >> j, floor) for j in range(ups)]
    return (math.ceil(hw[0] / 2**ups), math.ceil(hw[1] / 2**ups)), widths


@GENERATORS.register("dcgan")
class Generator(nn.Module):
    """Linear -> BN -> [upsample x2, conv3x3, BN, LeakyReLU(0.2)] x k -> conv3x3 -> output head.

    k = 2 up to 32 px (the references' generator), more for larger inputs from a small start (see `layout`).

    Heads: "tanh_bn" (Tanh then non-affine BatchNorm, so images live in normalised input space; DAFL, DFAD),
    "bn" (affine BatchNorm, no Tanh; ZSKT) or "sigmoid" (pixels in [0, 1], then the teacher's normalisation;
    zju-vipa). With `num_classes`, the generator is
    class-conditional: a learned class embedding multiplies z.

    Args:
        spec: the teacher's input spec (channels, size, normalisation).
        nz: latent size.
        ngf: base width (the reference is 64: 128-128-64 channels).
        head: "tanh_bn", "bn" or "sigmoid".
        bn_eps: eps of the two inner BatchNorms (DAFL's code uses 0.8; the default 1e-5 elsewhere).
        num_classes: make it class-conditional when given.

    Shape:
        - Input: z (B, nz) [and labels y (B,)].
        - Output: (B, spec.channels, spec.size, spec.width), in the teacher's normalised input space.
    """

    def __init__(self, spec: InputSpec, nz: int = 100, ngf: int = 64, head: str = "tanh_bn", bn_eps: float = 1e-5,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if head not in ("tanh_bn", "bn", "sigmoid"):
            raise ValueError(f"unknown generator head {head!r}")
        self.spec, self.nz, self.head_kind = spec, nz, head
        self.init_size, widths = layout(spec.hw, ngf)
        self.embed = nn.Embedding(num_classes, nz) if num_classes else None
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        layers: list[nn.Module] = []
        for c_in, c_out in zip([2 * ngf, *widths], widths):
            layers += [Upsample2x(), nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, eps=bn_eps),
                       nn.LeakyReLU(0.2, inplace=True)]
        self.blocks = nn.Sequential(*layers, nn.Conv2d(widths[-1], spec.channels, 3, padding=1))
        self.out_bn = None if head == "sigmoid" else nn.BatchNorm2d(spec.channels, affine=head == "bn")

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional generator needs labels y")
            z = z * self.embed(y)
        x = self.bn0(self.l1(z).view(z.shape[0], -1, *self.init_size))
        x = self.blocks(x)
        if tuple(x.shape[-2:]) != self.spec.hw:
            x = x[..., : self.spec.size, : self.spec.width]
        if self.head_kind == "tanh_bn":
            return self.out_bn(torch.tanh(x))
        if self.head_kind == "bn":
            return self.out_bn(x)
        return self.spec.normalize(torch.sigmoid(x))


def default_width(teacher_params: int) -> int:
    """Generator width for a teacher of this many parameters.

    The reference width 64 costs 30-70x a LeNet-5 teacher and student together on a CPU; a generator comparable in
    capacity to the networks it serves is what ZSKT's author recommends. LeNet scale (< 200K) -> 16, up to 3M -> 32,
    larger teachers -> the reference 64.
    """
    if teacher_params < 200_000:
        return 16
    return 32 if teacher_params < 3_000_000 else 64
