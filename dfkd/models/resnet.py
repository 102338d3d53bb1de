"""CIFAR-style ResNet-18/34 (He et al. 2016) as in DAFL/DFAD/zju-vipa: 3x3 stem, no max-pool (METHODS.md §10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.models._base import ZooModel, register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(ZooModel):
    """CIFAR ResNet with BasicBlocks; widths 64-128-256-512, strides 1-2-2-2, global average pooling.

    Args:
        blocks: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        num_classes: classes.
        in_channels: image channels.
    """

    stages = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, width, stride if j == 0 else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.classifier = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """CIFAR ResNet-18 (~11.2M parameters)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ResNet:
    """CIFAR ResNet-34 (~21.3M parameters)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels)
