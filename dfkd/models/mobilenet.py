"""A small MobileNetV2-style network (Sandler et al. 2018) for phones and boards: inverted residual blocks."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.models._base import ZooModel, register_model


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1; identity shortcut when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden) + _conv_bn(hidden, cout, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Tiny(ZooModel):
    """MobileNetV2 for 32x32 inputs at a chosen width; stride 1 stem, three downsampling stages.

    Args:
        num_classes: classes.
        in_channels: image channels.
        width: channel multiplier.
        imagenet_stem: a stride-2 stem and a 3x3 stride-2 max-pool (inputs of 64 px and more).
    """

    stages = ("stage1", "stage2", "stage3")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 0.5,
                 imagenet_stem: bool = False) -> None:
        super().__init__()

        def c(n: int) -> int:
            return max(8, int(n * width))

        stem = _conv_bn(in_channels, c(32), 3, stride=2 if imagenet_stem else 1)
        self.stem = nn.Sequential(*stem, *([nn.MaxPool2d(3, 2, 1)] if imagenet_stem else []))
        plan = (("stage1", c(32), c(24), 1, 2), ("stage2", c(24), c(48), 2, 3), ("stage3", c(48), c(96), 2, 3))
        for name, cin, cout, stride, n in plan:
            blocks = [InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1, 6) for i in range(n)]
            setattr(self, name, nn.Sequential(*blocks))
        self.head = nn.Sequential(*_conv_bn(c(96), c(320), 1), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(c(320), num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return torch.flatten(self.head(x), 1)


@register_model("mobilenet_v2_tiny")
def mobilenet_v2_tiny(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                      imagenet_stem: bool = False) -> MobileNetV2Tiny:
    """MobileNetV2 at width 0.5 for 32x32 images (~0.11M parameters); imagenet_stem for 64 px and more."""
    return MobileNetV2Tiny(num_classes, in_channels, width=0.5, imagenet_stem=imagenet_stem)
