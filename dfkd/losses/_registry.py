"""The loss registry: short names ("kl", "bn_di", ...) to loss functions."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from dfkd._registry import Registry

LossFn = Callable[..., Tensor]

LOSSES: Registry[LossFn] = Registry("loss")
