"""ResNet-18/34 (He et al. 2016): the CIFAR form of DAFL/DFAD/zju-vipa (3x3 stem, no max-pool) or the ImageNet form.

The ImageNet form (`imagenet_stem=True`: 7x7 stride-2 convolution and a 3x3 stride-2 max-pool, as in torchvision)
is what inputs of 64 px and more need: the CIFAR form keeps full resolution through layer1 and costs ~15x more at
224 px. Both forms have the same parameter names, so files record the switch in their architecture arguments.
"""

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
        imagenet_stem: 7x7 stride-2 stem and max-pool (ImageNet form) instead of the CIFAR 3x3 stride-1 stem.
    """

    stages = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3,
                 imagenet_stem: bool = False) -> None:
        super().__init__()
        k, stride = (7, 2) if imagenet_stem else (3, 1)
        self.conv1 = nn.Conv2d(in_channels, 64, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
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
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, imagenet_stem: bool = False) -> ResNet:
    """ResNet-18 (~11.2M parameters), CIFAR form unless imagenet_stem."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, imagenet_stem)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, imagenet_stem: bool = False) -> ResNet:
    """ResNet-34 (~21.3M parameters), CIFAR form unless imagenet_stem."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, imagenet_stem)
