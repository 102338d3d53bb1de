"""VGG-11 with BatchNorm in the CIFAR form of RepDistiller/zju-vipa (Simonyan & Zisserman 2015)."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.models._base import MaxPool2, ZooModel, register_model

_CFG_11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG(ZooModel):
    """Five conv groups (max-pool after the first four, global average pool after the last), Linear head.

    Args:
        cfg: channels of each convolution, grouped by stage (five groups).
        num_classes: classes.
        in_channels: image channels.
    """

    stages = ("block0", "block1", "block2", "block3", "block4")

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        cin = in_channels
        for i, group in enumerate(cfg):
            layers: list[nn.Module] = []
            for c in group:
                layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                cin = c
            layers.append(MaxPool2() if i < len(cfg) - 1 else nn.AdaptiveAvgPool2d(1))
            setattr(self, f"block{i}", nn.Sequential(*layers))
        self.classifier = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Spelled out rather than a loop over `stages`: TorchScript has no getattr by a runtime name.
        x = self.block4(self.block3(self.block2(self.block1(self.block0(x)))))
        return torch.flatten(x, 1)


@register_model("vgg11_bn")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> VGG:
    """VGG-11-BN, CIFAR form (~9.2M parameters)."""
    return VGG(_CFG_11, num_classes, in_channels)
