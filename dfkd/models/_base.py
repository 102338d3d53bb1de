"""The contract every zoo model follows, and the model registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dfkd._registry import Registry
from dfkd.errors import DfkdError

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class ZooModel(nn.Module):
    """Base of every zoo classifier.

    Subclasses define `forward_features` (the features the data-free literature taps, shape (B, D)), a final
    `classifier` (an `nn.Linear`) and, where something stands between the two, `forward_head`; `stages` names
    the modules whose outputs are the block outputs (attention transfer).

    `classifier` carries no class-level annotation on purpose: `torch.jit.script` reads class annotations and
    cannot resolve the string `'nn.Linear'` that postponed evaluation makes of it.
    """

    stages: tuple[str, ...] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model constructor `fn(num_classes, in_channels, input_size) -> nn.Module` under `name`."""
    return MODELS.register(name)


def create(name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, **kwargs: Any) -> nn.Module:
    """Build zoo model `name`; keyword arguments that are None mean "the model's own default".

    Args:
        name: a name from `list_models()`.
        num_classes: number of output classes.
        in_channels: image channels (1 or 3).
        input_size: image height = width; every model supports 28 and 32.
        **kwargs: extra architecture arguments.

    Returns:
        The model, in train mode, with freshly initialised weights.
    """
    fn = MODELS.get(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if input_size < 16:
        raise DfkdError(f"model {name!r} needs inputs of at least 16x16 pixels, got {input_size}")
    return fn(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs)


def list_models() -> list[str]:
    """Names of every registered zoo model."""
    return MODELS.names()
