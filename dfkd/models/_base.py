"""The contract every zoo model follows, and the model registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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


class MaxPool2(nn.MaxPool2d):
    """`nn.MaxPool2d(2)` (same output, same state_dict, same exports), faster on CPU when no gradient is wanted.

    On CPU, `max_pool2d_with_indices` is the slowest kernel of a small convnet's forward: at batch 128 it took 45 %
    of a LeNet-5's (2.1 ms a call, more than the convolution before it; one thread, torch 2.14). Without autograd
    the elementwise maximum of the four strided 2x2 corners gives the same values in a tenth of the time (a frozen
    teacher's LeNet-5 forward went from 8.3 to 4.1 ms). With autograd the library kernel stays: its indices make
    the backward cheap (the corners' backward took twice its forward + backward). CUDA, TorchScript, tracing and
    torch.export keep the library kernel too, so exported graphs hold a MaxPool op.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch
            return F.max_pool2d(x, 2)
        else:
            if (x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
                    and not torch.jit.is_tracing() and not torch.compiler.is_compiling()):
                return _corner_max(x)
            return F.max_pool2d(x, 2)


def use_fast_pools(model: nn.Module) -> int:
    """Swap every plain `nn.MaxPool2d(2)` in `model` for `MaxPool2` (same outputs); returns how many.

    For a user's frozen teacher, whose forward a run calls on every batch. Pools with other settings, subclasses
    and pools carrying hooks are left alone.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MaxPool2d and _is_plain_2x2(child) and not _has_hooks(child):
                setattr(parent, name, MaxPool2())
                swapped += 1
    return swapped


def _is_plain_2x2(pool: nn.MaxPool2d) -> bool:
    def pair(v: Any) -> tuple[Any, Any]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]

    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (pair(pool.kernel_size) == (2, 2) and pair(stride) == (2, 2) and pair(pool.padding) == (0, 0)
            and pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, a) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))


def _corner_max(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor, as max_pool2d
    x = x[..., :h, :w]
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


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
