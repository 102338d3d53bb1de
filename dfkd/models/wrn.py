"""Wide ResNets (Zagoruyko & Komodakis 2016) in the ZSKT/zju-vipa form: pre-activation blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.models._base import ZooModel, register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, with a 1x1 convolution shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(ZooModel):
    """WRN-depth-k: three groups of (depth-4)/6 blocks with widths 16k, 32k, 64k.

    Args:
        depth: 16, 22, 28, 40, ... ((depth - 4) divisible by 6).
        widen: width multiplier k.
        num_classes: classes.
        in_channels: image channels.
        imagenet_stem: a 7x7 stride-2 first convolution and a 3x3 stride-2 max-pool (inputs of 64 px and more).
    """

    stages = ("block1", "block2", "block3")

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3,
                 imagenet_stem: bool = False) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        k, stride = (7, 2) if imagenet_stem else (3, 1)
        self.conv1 = nn.Conv2d(in_channels, widths[0], k, stride, k // 2, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        cin = widths[0]
        for g, stride in enumerate((1, 2, 2)):
            blocks = [PreActBlock(cin if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1)
                      for i in range(n)]
            cin = widths[g + 1]
            setattr(self, f"block{g + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(cin)
        self.classifier = nn.Linear(cin, num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.maxpool(self.conv1(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1), 1)


def _wrn(depth: int, widen: int, millions: float):  # noqa: ANN202 - a registry factory
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
              imagenet_stem: bool = False) -> WideResNet:
        return WideResNet(depth, widen, num_classes, in_channels, imagenet_stem)

    build.__doc__ = (f"Wide ResNet WRN-{depth}-{widen} (~{millions}M parameters), CIFAR form unless "
                     "imagenet_stem.")
    return build


for _d, _k, _m in ((16, 1, 0.17), (16, 2, 0.69), (40, 1, 0.56), (40, 2, 2.2)):
    register_model(f"wrn_{_d}_{_k}")(_wrn(_d, _k, _m))
