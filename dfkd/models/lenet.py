"""LeNet-5 and LeNet-5-half as used by DAFL, DFAD and ZSKD, with optional BatchNorm twins."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.models._base import MaxPool2, ZooModel, register_model


def _stage(cin: int, cout: int, bn: bool, pool: bool, padding: int = 0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, padding=padding)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(MaxPool2())
    return nn.Sequential(*layers)


class LeNet5(ZooModel):
    """LeNet-5 (LeCun et al. 1998) in the DAFL/DFAD form: conv 5x5 c1-c2-c3, FC f, FC classes.

    At 32x32 the convolutions are unpadded (the reference form); at smaller sizes the first one is padded so the
    third convolution still sees 5x5 maps. `forward_features` is the c3-d output of the third convolution, as in
    DAFL (its activation prior reads those 120 features).

    Args:
        num_classes: classes.
        in_channels: image channels.
        input_size: image side (>= 28).
        widths: (c1, c2, c3, f); LeNet-5 is (6, 16, 120, 84), LeNet-5-half (3, 8, 60, 42), the three-quarter
            rung (5, 12, 90, 63).
        bn: add BatchNorm after every convolution.
    """

    stages = ("stage1", "stage2", "stage3")

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 32,
        widths: tuple[int, int, int, int] = (6, 16, 120, 84),
        bn: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3, f = widths
        pad = max(0, (32 - input_size + 1) // 2)
        self.stage1 = _stage(in_channels, c1, bn, pool=True, padding=pad)
        self.stage2 = _stage(c1, c2, bn, pool=True)
        # Keeps the third convolution at 5x5 for any input size >= 28 (an identity at 32 and 28).
        self.pool = nn.AdaptiveAvgPool2d(5)
        self.stage3 = _stage(c2, c3, bn, pool=False)
        self.fc = nn.Sequential(nn.Linear(c3, f), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(f, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(x))
        if x.shape[-2] != 5 or x.shape[-1] != 5:  # the identity costs 0.5 ms a batch of 128 on a CPU
            x = self.pool(x)
        return torch.flatten(self.stage3(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(features))


_FULL = (6, 16, 120, 84)
_HALF = (3, 8, 60, 42)
_THREE_QUARTER = (5, 12, 90, 63)


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 32) -> LeNet5:
    """LeNet-5: conv 6-16-120, FC 84 (~62K parameters)."""
    return LeNet5(num_classes, in_channels, input_size, _FULL, bn=False)


@register_model("lenet5_half")
def lenet5_half(num_classes: int = 10, in_channels: int = 1, input_size: int = 32) -> LeNet5:
    """LeNet-5-half: conv 3-8-60, FC 42 (~16K parameters)."""
    return LeNet5(num_classes, in_channels, input_size, _HALF, bn=False)


@register_model("lenet5_3q")
def lenet5_3q(num_classes: int = 10, in_channels: int = 1, input_size: int = 32) -> LeNet5:
    """LeNet-5 at three-quarter width: conv 5-12-90, FC 63 (~35K parameters).

    Not from the literature: the rung of the default-student ladder between LeNet-5-half (~16K) and LeNet-5
    (~62K), for teachers of about 140K-250K parameters (`dfkd.students.SIZED_STUDENTS`).
    """
    return LeNet5(num_classes, in_channels, input_size, _THREE_QUARTER, bn=False)


@register_model("lenet5_bn")
def lenet5_bn(num_classes: int = 10, in_channels: int = 1, input_size: int = 32) -> LeNet5:
    """LeNet-5 with BatchNorm after each convolution (~62K parameters; for BN-statistics matching methods)."""
    return LeNet5(num_classes, in_channels, input_size, _FULL, bn=True)


@register_model("lenet5_half_bn")
def lenet5_half_bn(num_classes: int = 10, in_channels: int = 1, input_size: int = 32) -> LeNet5:
    """LeNet-5-half with BatchNorm after each convolution (~16K parameters)."""
    return LeNet5(num_classes, in_channels, input_size, _HALF, bn=True)


@register_model("lenet5_scaled")
def lenet5_scaled(num_classes: int = 10, in_channels: int = 1, input_size: int = 32,
                  widths: tuple[int, int, int, int] | list[int] = _FULL, bn: bool = False) -> LeNet5:
    """LeNet-5 with any widths (c1, c2, c3, f): the search space of `dfkd search` (LeNet-5-half is (3, 8, 60, 42))."""
    return LeNet5(num_classes, in_channels, input_size, tuple(int(w) for w in widths), bn=bool(bn))
